"""Detectors for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

# nudenet's YOLOv8n: the last features of the class branch at each of the three scales (its Detect module's cv3)
NUDENET_LAYERS = [f"/model.22/cv3.{i}/cv3.{i}.1/act/Mul_output_0" for i in range(3)]
NUDENET_FACE = 1  # FACE_FEMALE in nudenet's labels


def nudenet_file() -> Path:
    """The YOLOv8n detector the nudenet wheel ships (320n.onnx; dynamic input, 18 classes, (4 + 18) x N output)."""
    import nudenet

    return Path(nudenet.__file__).parent / "320n.onnx"
