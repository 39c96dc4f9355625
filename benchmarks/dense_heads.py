"""What explaining a detector's or a segmenter's output costs against its plain inference (issue 19), side by side
in one run: every detection of nudenet's YOLOv8n at 640 x 640 (exported with no names: the class branch of each
scale) on scikit-image's astronaut, and the Segmentation map of one class of torchvision's DeepLabV3-MobileNetV3
(random weights, exported with no names) at 520 x 520, the size its documentation resizes to.

    python benchmarks/dense_heads.py             # writes benchmarks/results/dense-heads.md and .json

Both sides are ONNX Runtime sessions in this process on the same preprocessed batch of one image, opened with the
same options (onnxcam.runtimes.create_session: threads that do not spin between runs, so that neither side's pool
takes the cores from the other's): the plain file as given (the floor), and
onnxcam.Explainer(...).explain(batch, targets=...) on its explainable export (a forward-only run for the outputs
and the target activations, the head alone for the maps' gradients, numpy for the maps). Timed in interleaved
rounds (core.timing.interleaved); the median is reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the model builders shared with the tests

from provenance import begin, describe, end, write  # noqa: E402

import onnxcam  # noqa: E402
from onnxcam.core.timing import interleaved  # noqa: E402
from onnxcam.exporters import export_onnx  # noqa: E402
from onnxcam.runtimes import create_session  # noqa: E402
from onnxcam.targets import Detection, Segmentation  # noqa: E402

YOLO_SIZE = (640, 640)
SEGMENT_SIZE = 520
LIMITS = {"yolov8n": 1.5, "deeplabv3_mobilenet_v3": 1.3}  # the bounds on explained / plain


def yolo(folder: Path):
    """(plain session, its feed, explainer, batch, target) for nudenet's YOLOv8n on the astronaut."""
    from skimage import data
    from support.detectors import nudenet_file

    explainable = folder / "yolov8n.explain.onnx"
    spec = export_onnx(nudenet_file(), explainable, input_size=YOLO_SIZE)
    explainer = onnxcam.Explainer(explainable, provider="cpu")
    batch = explainer.prepare([data.astronaut()])
    plain = create_session(nudenet_file(), "cpu")
    return plain, {plain.get_inputs()[0].name: batch}, explainer, batch, Detection(), spec.layers


def deeplab(folder: Path):
    """The same for torchvision's DeepLabV3-MobileNetV3 (21 classes, random weights), its first image's most
    frequent class explained."""
    from support.dense import SegmentationOutput, torchvision_segmenter
    from support.torch_export import legacy_export

    model = torchvision_segmenter("deeplabv3_mobilenet_v3_large")
    plain_path = legacy_export(SegmentationOutput(model), folder / "deeplabv3.onnx", (3, SEGMENT_SIZE, SEGMENT_SIZE))
    spec = export_onnx(plain_path, folder / "deeplabv3.explain.onnx")
    explainer = onnxcam.Explainer(folder / "deeplabv3.explain.onnx", provider="cpu")
    batch = np.random.default_rng(0).standard_normal((1, 3, SEGMENT_SIZE, SEGMENT_SIZE)).astype(np.float32)
    plain = create_session(plain_path, "cpu")
    (scores,) = plain.run(None, {"input": batch})
    target = Segmentation(int(np.bincount(scores[0].argmax(0).ravel()).argmax()))
    return plain, {"input": batch}, explainer, batch, target, spec.layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per case, about")
    args = parser.parse_args()
    run = begin()
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name, build in (("yolov8n", yolo), ("deeplabv3_mobilenet_v3", deeplab)):
            plain, feed, explainer, batch, target, layers = build(Path(folder))
            maps = len(explainer.explain(batch, targets=target).heatmaps)
            times = interleaved({"plain": lambda: plain.run(None, feed),
                                 "explained": lambda: explainer.explain(batch, targets=target)},
                                args.repeats, args.budget)
            plain_ms, explained_ms = (1000 * float(np.median(times[k])) for k in ("plain", "explained"))
            ratio = explained_ms / plain_ms
            figures[name] = {"plain_ms": plain_ms, "explained_ms": explained_ms, "ratio": ratio, "maps": maps,
                             "rounds": len(times["plain"]), "layers": layers, "limit": LIMITS[name]}
            rows.append(f"| {name} | {', '.join(layers)} | {maps} | {plain_ms:.1f} | {explained_ms:.1f} | "
                        f"{ratio:.2f}x | {LIMITS[name]}x | {'yes' if ratio <= LIMITS[name] else 'NO'} |")
    end(run)
    lines = ["# Dense heads: explained against plain inference", "", *describe(run), "",
             "One image; the median of interleaved rounds; ONNX Runtime's CPU provider, its default threads.", "",
             "| model | layers (no names given) | maps | plain ms | explained ms | ratio | limit | within |",
             "|---|---|---|---|---|---|---|---|", *rows]
    write("dense-heads", "\n".join(lines), {"run": run, **figures})


if __name__ == "__main__":
    main()
