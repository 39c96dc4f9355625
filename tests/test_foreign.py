"""ONNX files onnxcam did not write, as users meet them (tests/fixtures/foreign, made by make_foreign.py): each is
exported with no names given (a size only where the file has none), explained at a batch no size in the file
has, its gradient checked against finite differences of the original file with the target fed from outside,
and its heatmaps checked to be H x W of the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcam
from onnxcam.core.layouts import fits_image, grid_of
from onnxcam.exporters import export_onnx
from onnxcam.exporters.autodiff import expose_dequantized
from onnxcam.testing.finite_differences import directional_check

FOREIGN = Path(__file__).parent / "fixtures" / "foreign"
ENTRIES = json.loads((FOREIGN / "MANIFEST.json").read_text())
BATCH = 3
QUANTIZED = ("QDQ", "QOperator", "dynamic quantization", "int8")  # steps: checked against the float model instead


def _is_quantized(entry) -> bool:
    return any(word in entry.get("notes", "") for word in QUANTIZED)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_foreign_file_is_explained(entry, tmp_path):
    size = tuple(entry["size"]) if entry["spatial"] != "static" else None
    spec = export_onnx(FOREIGN / entry["name"], tmp_path / "explainable.onnx", input_size=size)
    assert spec.input_size == tuple(entry["size"]) and spec.input_layout == entry["layout"]
    assert spec.num_classes == entry["classes"]
    assert fits_image(grid_of(spec.layouts[0], _shape(tmp_path / "explainable.onnx", spec.activations[0])),
                      spec.input_size)

    explainer = onnxcam.Explainer(tmp_path / "explainable.onnx", provider="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (64, 30), (33, 33))]
    result = explainer.explain(images)
    assert result.heatmaps.shape == (BATCH, *spec.input_size) and result.heatmaps.dtype == np.float32
    assert np.isfinite(result.heatmaps).all()

    batch = explainer.prepare(images)
    _, selected, activation, gradient = explainer.runner.run(
        [spec.scores, spec.selected, spec.activations[0], spec.gradients[0]],
        {spec.input: batch, spec.class_input: np.full(BATCH, -1, np.int64)})
    assert np.abs(gradient).max() > 0
    if _is_quantized(entry):
        pytest.skip("a quantized file's score is a step function: its STE gradient is checked in test_quantized.py")
    original = onnx.load(str(FOREIGN / entry["name"]))
    original = original if any(spec.layers[0] in n.output for n in original.graph.node) else expose_dequantized(original)
    pairs = np.array(directional_check(original, spec.layers[0], {spec.input: batch}, activation, gradient,
                                       selected, spec.scores))
    tolerance = 0.1 if spec.input_type == "float16" else 0.02
    np.testing.assert_allclose(pairs[:, 0], pairs[:, 1], rtol=tolerance, atol=tolerance * np.abs(pairs).max())


def _shape(path: Path, name: str) -> list[int | None]:
    output = next(o for o in onnx.load(str(path), load_external_data=False).graph.output if o.name == name)
    return [d.dim_value or None for d in output.type.tensor_type.shape.dim]


def test_a_dynamic_size_must_be_given(tmp_path):
    entry = next(e for e in ENTRIES if e["spatial"] != "static")
    with pytest.raises(onnxcam.ExportError, match="dynamic spatial dimensions.*input_size"):
        export_onnx(FOREIGN / entry["name"], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
