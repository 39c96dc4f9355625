"""ONNX files onnxcam did not write, as users meet them (tests/fixtures/foreign, made by make_foreign.py): each is
exported with no names given (a size only where the file has none), explained at a batch no size in the file
has, its gradient checked against finite differences of the original file with the target fed from outside,
and its heatmaps checked to be H x W of the image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import run_cli
from support.finite_differences import directional_check

import onnxcam
from onnxcam.core.layouts import fits_image, grid_of
from onnxcam.exporters import export_onnx
from onnxcam.exporters.autodiff import expose_dequantized

FOREIGN = Path(__file__).parent / "fixtures" / "foreign"
ENTRIES = json.loads((FOREIGN / "MANIFEST.json").read_text())
BATCH = 3
QUANTIZED = ("quantize_static", "quantize_dynamic")  # steps: their STE gradients are checked in test_quantized.py


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
    _, selected, activation, gradient = explainer.model.runner.run(
        [spec.scores, spec.selected, spec.activations[0], spec.gradients[0]],
        {spec.input: batch, spec.class_input: np.full(BATCH, -1, np.int64)})
    assert np.abs(gradient).max() > 0
    if _is_quantized(entry):
        pytest.skip("a quantized file's score is a step function: its STE gradient is checked in test_quantized.py")
    original = onnx.load(str(FOREIGN / entry["name"]))
    if not any(spec.layers[0] in node.output for node in original.graph.node):
        original = expose_dequantized(original)  # a QOperator file's float twin of its codes
    exported, differences = directional_check(original, spec.layers[0], {spec.input: batch}, activation, gradient,
                                              selected, spec.logits or spec.scores)
    tolerance = 0.1 if activation.dtype == np.float16 else 0.03  # half precision: the file's own rounding
    assert np.linalg.norm(exported - differences) <= tolerance * np.linalg.norm(differences), (exported, differences)


def _shape(path: Path, name: str) -> list[int | None]:
    output = next(o for o in onnx.load(str(path), load_external_data=False).graph.output if o.name == name)
    return [d.dim_value or None for d in output.type.tensor_type.shape.dim]


def test_a_dynamic_size_must_be_given(tmp_path):
    entry = next(e for e in ENTRIES if e["spatial"] != "static")
    with pytest.raises(onnxcam.ExportError, match="dynamic spatial dimensions.*input_size"):
        export_onnx(FOREIGN / entry["name"], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_command_line_on_a_dynamic_nonsquare_file(tmp_path):
    """The PaddleOCR classifier (3 x 48 x 192, dynamic sizes): the size is given as HxW, the choices made are
    printed, and the overlays keep each photo's own size."""
    paddle = FOREIGN / "paddle_ppocr_cls_mobile_v2.onnx"
    refused = run_cli("export", paddle, "-o", tmp_path / "no.onnx")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "--input-size" in refused.stderr
    assert not (tmp_path / "no.onnx").exists()
    done = run_cli("export", paddle, "-o", tmp_path / "cls.onnx", "--input-size", "48x192")
    assert done.returncode == 0, done.stderr
    assert "input 'x' nchw 48x192 float32, scores 'save_infer_model/scale_0.tmp_1' (2 classes)" in done.stdout
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.random.default_rng(1).integers(0, 256, (30, 100, 3), dtype=np.uint8))
    explained = run_cli("explain", tmp_path / "cls.onnx", photo, "-o", tmp_path / "out", "--provider", "cpu")
    assert explained.returncode == 0, explained.stderr
    assert cv2.imread(str(tmp_path / "out" / "photo.png")).shape == (30, 100, 3)
    listed = run_cli("inspect", paddle, "--input-size", "48x192")
    assert listed.returncode == 0, listed.stderr
    starred = [line for line in listed.stdout.splitlines() if line.startswith("*")]
    assert len(starred) == 1 and "[nchw]" in starred[0]


def test_nhwc_input_needs_no_names_and_can_be_overridden(tmp_path):
    keras = FOREIGN / "keras_resnet.onnx"
    spec = export_onnx(keras, tmp_path / "auto.onnx")
    assert spec.input_layout == "nhwc"
    with pytest.raises(onnxcam.ExportError):  # read as 32 channels of 32 x 3 images: nothing lies on a grid
        export_onnx(keras, tmp_path / "wrong.onnx", input_layout="nchw")
    batch = np.random.default_rng(2).standard_normal((3, 32, 32, 3)).astype(np.float32)
    assert onnxcam.Explainer(tmp_path / "auto.onnx", provider="cpu").explain(batch).heatmaps.shape == (3, 32, 32)
    with pytest.raises(onnxcam.ExplainError, match="N x 32 x 32 x C"):
        onnxcam.Explainer(tmp_path / "auto.onnx", provider="cpu").explain(batch.transpose(0, 3, 1, 2))


def test_a_named_target_off_the_grid_is_refused_unless_its_layout_is_given(tmp_path):
    """Attention probabilities B x heads x 17 x 17 of a ViT on a 32 x 32 image with a 4 x 4 grid of patches look
    like a 17 x 17 map: refused, with the reason, unless the user says the layout."""
    vit = FOREIGN / "hf_vit_dynamo.onnx"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(vit)))
    softmax = next(n.output[0] for n in model.graph.node if n.op_type == "Softmax")
    with pytest.raises(onnxcam.ExportError, match="is attention between tokens, not a grid over the image"):
        export_onnx(vit, tmp_path / "x.onnx", layers=[softmax])
    assert not (tmp_path / "x.onnx").exists()
    assert export_onnx(vit, tmp_path / "x.onnx", layers=[softmax], layouts=["nchw"]).layers == [softmax]


def test_large_models_are_written_with_their_data_beside_them(tmp_path):
    """Past protobuf's 2 GB the weights go to `<name>.data`; the limit is lowered here to see it happen."""
    from onnxcam.exporters.onnx_frontend import load_model, make_explainable, save_model

    model = make_explainable(load_model(FOREIGN / "external_data" / "model.onnx"))
    save_model(model, tmp_path / "big.onnx", limit=1024)
    assert (tmp_path / "big.onnx.data").stat().st_size > 1024
    assert not list(tmp_path.glob(".*tmp"))
    result = onnxcam.Explainer(tmp_path / "big.onnx", provider="cpu").explain(
        np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32))
    assert result.heatmaps.shape == (3, 32, 32)


VIT_LIKE = [e for e in ENTRIES if (e.get("family") or "").startswith(("vit", "deit")) and "Attention op" not in
            json.dumps(e.get("structure", ""))]


@pytest.mark.parametrize("entry", VIT_LIKE, ids=[e["name"] for e in VIT_LIKE])
def test_rollout_finds_the_attention_of_every_block(entry, tmp_path):
    """ViTs and DeiTs from both exporters and onnxslim: the attention probabilities are found by structure
    (one per block, over the CLS token(s) and the patch grid), whatever the normalisation looks like."""
    size = tuple(entry["size"]) if entry["spatial"] != "static" else None
    spec = export_onnx(FOREIGN / entry["name"], tmp_path / "explainable.onnx", input_size=size)
    prefix = 2 if entry["family"].startswith("deit") else 1
    assert spec.attention_layout == f"tokens:{prefix}:4x4" and len(spec.attentions) == 2
    images = [np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)] * 3
    maps = onnxcam.Explainer(tmp_path / "explainable.onnx", provider="cpu").explain(images, method="rollout").heatmaps
    assert maps.shape == (3, *spec.input_size) and maps.max() == pytest.approx(1)


def test_an_output_that_is_not_class_scores_needs_a_target(tmp_path):
    """A segmentation head (N x K x h x w) exports, but its flattened 'top-1 class' would be a pixel: explaining
    it without a target is refused in one line that says what to give instead."""
    rng = np.random.default_rng(4)
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["features"], pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["features"], ["relu"]),
             onnx.helper.make_node("Conv", ["relu", "k"], ["segments"])]
    graph = onnx.helper.make_graph(
        nodes, "segmenter", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 16, 16])],
        [onnx.helper.make_tensor_value_info("segments", onnx.TensorProto.FLOAT, ["N", 4, 16, 16])],
        [onnx.numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.standard_normal((4, 6, 1, 1)).astype(np.float32), "k")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    spec = export_onnx(model, tmp_path / "segmenter.onnx", layers=["relu"])
    assert spec.score_shape == [4, 16, 16]
    explainer = onnxcam.Explainer(tmp_path / "segmenter.onnx", provider="cpu")
    with pytest.raises(onnxcam.ExplainError, match="not class scores: explain it with a target"):
        explainer.explain(rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    from onnxcam.targets import Segmentation

    maps = explainer.explain(rng.standard_normal((3, 3, 16, 16)).astype(np.float32), targets=Segmentation(1))
    assert maps.heatmaps.shape == (3, 16, 16)


def test_a_file_fixed_at_batch_one_is_explained_one_image_at_a_time(tmp_path):
    """Many deployed files fix the batch at 1: the Explainer refuses other batch sizes in one line, and the
    command line runs such a file one image at a time."""
    rng = np.random.default_rng(5)
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["conv"], ["relu"]),
             onnx.helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
             onnx.helper.make_node("Flatten", ["pooled"], ["flat"]),
             onnx.helper.make_node("Gemm", ["flat", "fc"], ["scores"], transB=1)]
    graph = onnx.helper.make_graph(
        nodes, "fixed", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9),
              tmp_path / "fixed.onnx")
    assert run_cli("export", tmp_path / "fixed.onnx", "-o", tmp_path / "x.onnx").returncode == 0
    explainer = onnxcam.Explainer(tmp_path / "x.onnx", provider="cpu")
    assert explainer.fixed_batch == 1
    with pytest.raises(onnxcam.ExplainError, match="fixed at batches of 1; got 3 images"):
        explainer.explain(rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"photo{i}.png"), rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    done = run_cli("explain", tmp_path / "x.onnx", *(tmp_path / f"photo{i}.png" for i in range(3)), "-o",
                   tmp_path / "out", "--provider", "cpu")
    assert done.returncode == 0, done.stderr
    assert all(cv2.imread(str(tmp_path / "out" / f"photo{i}.png")).shape == (20, 30, 3) for i in range(3))


def test_command_line_explains_photos_for_an_nhwc_uint8_file(tmp_path):
    """The streaming job preprocesses photos into the model's own layout and type, as the Python API does."""
    keras = FOREIGN / "keras_mobilenetv2_uint8.onnx"
    assert run_cli("export", keras, "-o", tmp_path / "x.onnx").returncode == 0
    photo = tmp_path / "photo.png"
    image = np.random.default_rng(6).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    cv2.imwrite(str(photo), image[..., ::-1])
    done = run_cli("explain", tmp_path / "x.onnx", photo, "-o", tmp_path / "out", "--provider", "cpu",
                   "--save", "heatmaps", "--heatmap-format", "npy")
    assert done.returncode == 0, done.stderr
    saved = np.load(next((tmp_path / "out").glob("photo*.npy")))
    expected = onnxcam.Explainer(tmp_path / "x.onnx", provider="cpu").explain(image).heatmaps[0]
    np.testing.assert_allclose(saved.astype(np.float32), expected, atol=2e-3)
