"""Detectors exported with no names (exporters.discovery.detection_default): the task is guessed from a YOLO head's
shape, the default targets are the class branch's maps at each scale, confirmed by the detections of random images,
and the gradients they give are checked against finite differences of the original file."""

from __future__ import annotations

import time
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from support.finite_differences import directional_check
from support.tiny_detectors import TinyYoloV5, TinyYoloV8
from support.torch_export import legacy_export

import onnxcam
from onnxcam.core.detections import yolo_layout
from onnxcam.exporters import export_onnx
from onnxcam.targets import Detection

BATCH = 3  # not the export's batch of 2
SIZE = 64


def test_the_task_is_guessed_from_a_yolo_heads_shape_only():
    assert yolo_layout((22, 2100), (320, 320)) == "yolov8"  # nudenet's YOLOv8n: 18 classes, 40^2 + 20^2 + 10^2
    assert yolo_layout((84, 8400), (640, 640)) == "yolov8"  # COCO at 640
    assert yolo_layout((25200, 85), (640, 640)) == "yolov5"  # three anchor boxes per cell
    assert yolo_layout((7, 84), (SIZE, SIZE)) == "yolov8"
    assert yolo_layout((84, 8400), (320, 320)) is None  # the anchors of another size
    assert yolo_layout((2100, 22), (320, 320)) is None  # YOLOv8's anchors as rows: not a raw head
    assert yolo_layout((4, 2100), (320, 320)) is None  # boxes, no class
    assert yolo_layout((1000,), (224, 224)) is None
    assert yolo_layout((21, 520, 520), (520, 520)) is None


def _exported(model: torch.nn.Module, path, dynamo: bool):
    """`model` through one of torch's ONNX exporters with a dynamic batch, as a user writes a detector's file."""
    if not dynamo:
        return legacy_export(model, path, (3, SIZE, SIZE), input="images", output="output0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), path, dynamo=True, input_names=["images"],
                          output_names=["output0"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                          verbose=False)
    return path


def _class_branch(model: TinyYoloV8) -> list[torch.nn.Module]:
    return [branch[0] for branch in model.cv3]  # its first features: conv, norm, SiLU


def _merged_scales(model: TinyYoloV5) -> list[torch.nn.Module]:
    return [model.backbone.p5, model.backbone.merge4, model.backbone.merge3]  # as the graph computes them


def _yolov11() -> TinyYoloV8:
    return TinyYoloV8(separable_classes=True)


@pytest.mark.parametrize(("factory", "expected", "dynamo"), [
    (TinyYoloV8, _class_branch, False), (TinyYoloV8, _class_branch, True), (_yolov11, _class_branch, False),
    (TinyYoloV5, _merged_scales, False)], ids=["yolov8-legacy", "yolov8-dynamo", "yolov11-legacy", "yolov5-legacy"])
def test_a_yolo_head_with_no_names_explains_its_detections(factory, expected, dynamo, tmp_path):
    """With no names, a YOLOv8-style file gets its class branch's first maps at each scale (a detection's score reaches
    them at the 3 x 3 cells its next convolution reads; the maps after are read at one cell by the 1x1 class
    prediction), a YOLOv11-style one its first depthwise-separable block's output, read by the next one's 3 x 3
    depthwise convolution; a YOLOv5-style file, whose one 1x1 prediction per scale gives boxes and classes
    together, the maps before each scale's 3 x 3 block, which feed one another (the coarser scales are read into
    the finer ones). At batch 3 the gradients of the detections' scores agree with finite differences of the
    original file."""
    model = factory().eval()
    plain = _exported(model, tmp_path / "plain.onnx", dynamo)
    spec = export_onnx(plain, tmp_path / "explain.onnx")
    assert spec.layouts == ["nchw"] * 3
    explainer = onnxcam.Explainer(tmp_path / "explain.onnx", provider="cpu")
    x = np.random.default_rng(1).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    values = explainer.model.runner.run([spec.scores, *spec.activations, *spec.cuts],
                                        {spec.input: x, spec.class_input: np.full(BATCH, -1, np.int64)})
    output, activations, cuts = values[0], values[1:4], values[4:]

    captured = []  # the modules' outputs, by hooks
    handles = [module.register_forward_hook(lambda m, i, o: captured.append(o.detach().numpy()))
               for module in expected(model)]
    try:
        model(torch.from_numpy(x))
    finally:
        for handle in handles:
            handle.remove()
    for activation, hooked in zip(activations, captured, strict=True):
        np.testing.assert_allclose(activation, hooked, rtol=1e-4, atol=1e-4)

    target = Detection(score_threshold=0.2 if factory is TinyYoloV5 else 0.5, max_detections=4)
    picks = [(i, p) for i in range(BATCH) for p in target.picks(output[i])]
    assert len(picks) >= 6
    index = np.array([i for i, _ in picks])
    seeds = np.stack([p.seed for _, p in picks])
    gradients = explainer.model.head.gradients(spec.scores, activations, cuts, index, seeds)
    original = onnx.load(str(plain))
    exported, numeric = [], []
    for layer, activation, gradient in zip(spec.layers, activations, gradients, strict=True):
        pair = directional_check(original, layer, {spec.input: x[index]}, activation[index], gradient, None,
                                 spec.scores, seeds=seeds)
        exported.append(pair[0])
        numeric.append(pair[1])
    exported, numeric = np.concatenate(exported), np.concatenate(numeric)
    assert np.linalg.norm(exported - numeric) <= 0.02 * np.linalg.norm(numeric), (exported, numeric)

    result = explainer.explain(x, targets=target)
    np.testing.assert_array_equal(result.image_index, index)
    assert result.heatmaps.shape == (len(picks), SIZE, SIZE) and np.isfinite(result.heatmaps).all()


def test_nudenet_yolov8n_with_no_names_explains_each_detection_in_its_box(tmp_path):
    """nudenet's YOLOv8n exported with no names: its class branch's maps at the three scales, found in a few
    seconds; each detection's map peaks inside its box, and equals the map of an export naming those layers."""
    pytest.importorskip("nudenet")
    skimage = pytest.importorskip("skimage.data")
    from support.detectors import NUDENET_FACE, NUDENET_LAYERS, nudenet_file

    named = tmp_path / "named.onnx"
    export_onnx(nudenet_file(), named, input_size=(320, 320), layers=NUDENET_LAYERS)
    start = time.perf_counter()
    spec = export_onnx(nudenet_file(), tmp_path / "default.onnx", input_size=(320, 320))
    seconds = time.perf_counter() - start
    assert spec.layers == [f"/model.22/cv3.{i}/cv3.{i}.0/act/Mul_output_0" for i in range(3)]
    assert seconds < 30, seconds  # about 2.5 s on two shared CPUs, 1.4 s of them probing
    image = skimage.astronaut()
    images = [image, image[:, ::-1].copy()]
    target = Detection(score_threshold=0.3)
    result = onnxcam.Explainer(tmp_path / "default.onnx", provider="cpu").explain(images, targets=target)
    assert sorted(result.image_index[result.classes == NUDENET_FACE].tolist()) == [0, 1]
    scale = 320 / image.shape[0]
    for heat, (x1, y1, x2, y2) in zip(result.heatmaps, result.boxes * scale, strict=True):
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert y1 <= peak[0] <= y2 and x1 <= peak[1] <= x2
    same = tmp_path / "same.onnx"
    export_onnx(nudenet_file(), same, input_size=(320, 320), layers=spec.layers)
    np.testing.assert_array_equal(onnxcam.Explainer(same, provider="cpu").explain(images, targets=target).heatmaps,
                                  result.heatmaps)
    by_name = onnxcam.Explainer(named, provider="cpu").explain(images, targets=target)  # cv3's last features
    np.testing.assert_array_equal(by_name.boxes, result.boxes)
    for heat, other in zip(result.heatmaps, by_name.heatmaps, strict=True):
        assert np.corrcoef(heat.reshape(-1), other.reshape(-1))[0, 1] > 0.5


def _pointwise_detector(path, classes: int = 2) -> None:
    """A YOLOv8-shaped head over a 64 x 64 image whose every layer is a 1x1 convolution: a detection's score reaches
    each map at its own cell only, so no default can be confirmed."""
    rng = np.random.default_rng(3)
    anchors = 64 + 16 + 4
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"w{i}")
               for i, s in enumerate([(8, 3, 1, 1), (4 + classes, 8, 1, 1)])]
    constants = [numpy_helper.from_array(np.array([0, 4 + classes, -1], np.int64), "flat"),
                 numpy_helper.from_array(np.array([4, classes], np.int64), "split")]
    nodes = [helper.make_node("Conv", ["images", "w0"], ["conv"], strides=[8, 8]),
             helper.make_node("Relu", ["conv"], ["p3"]),
             helper.make_node("MaxPool", ["p3"], ["p4"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("MaxPool", ["p4"], ["p5"], kernel_shape=[2, 2], strides=[2, 2])]
    for scale in ("p3", "p4", "p5"):
        nodes += [helper.make_node("Conv", [scale, "w1"], [f"{scale}_head"]),
                  helper.make_node("Reshape", [f"{scale}_head", "flat"], [f"{scale}_rows"])]
    nodes += [helper.make_node("Concat", ["p3_rows", "p4_rows", "p5_rows"], ["raw"], axis=2),
              helper.make_node("Split", ["raw", "split"], ["box", "cls"], axis=1),
              helper.make_node("Sigmoid", ["cls"], ["prob"]),
              helper.make_node("Concat", ["box", "prob"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "pointwise", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                  ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                                             ["N", 4 + classes, anchors])], [*weights, *constants])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_a_detector_whose_default_cannot_be_confirmed_is_refused_in_one_line(tmp_path):
    _pointwise_detector(tmp_path / "plain.onnx")
    with pytest.raises(onnxcam.ExportError) as error:
        export_onnx(tmp_path / "plain.onnx", tmp_path / "explain.onnx")
    message = str(error.value)
    assert "\n" not in message and "at more than one cell" in message and "p3 N x 8 x 8 x 8" in message
    assert message.endswith("name target layers (set layers)")
    assert not (tmp_path / "explain.onnx").exists()
    spec = export_onnx(tmp_path / "plain.onnx", tmp_path / "explain.onnx", layers=["p3"])  # named, it exports
    assert spec.layers == ["p3"]


def test_the_task_can_be_given_and_is_checked(tmp_path):
    plain = _exported(TinyYoloV8().eval(), tmp_path / "plain.onnx", dynamo=False)
    spec = export_onnx(plain, tmp_path / "classify.onnx", task="classify")  # the top-1 value's default, as before
    assert len(spec.layers) == 1
    with pytest.raises(onnxcam.ExportError, match="task segment needs maps of class scores over the 64x64 image; "
                                                  r"the output is 7 x 84 per image \(set task\)"):
        export_onnx(plain, tmp_path / "segment.onnx", task="segment")
    with pytest.raises(onnxcam.ExportError, match="unknown task 'detection'"):
        export_onnx(plain, tmp_path / "bad.onnx", task="detection")


def test_the_command_line_says_the_task_it_guessed_and_stars_the_defaults(tmp_path):
    from conftest import run_cli

    plain = _exported(TinyYoloV8().eval(), tmp_path / "plain.onnx", dynamo=False)
    layers = [f"/cv3.{i}/cv3.{i}.0/cv3.{i}.0.2/Mul_output_0" for i in range(3)]
    done = run_cli("export", plain, "-o", tmp_path / "explain.onnx")
    assert done.returncode == 0, done.stderr
    assert (f"scores 'output0' (a YOLOv8/v11 head, 3 classes at 84 anchors, task detect guessed from its shape), "
            f"layers {', '.join(layers)}") in done.stdout
    done = run_cli("export", plain, "-o", tmp_path / "classify.onnx", "--task", "classify")
    assert done.returncode == 0, done.stderr
    assert "scores 'output0' (588 classes, task classify), layers " in done.stdout
    done = run_cli("inspect", plain)
    assert done.returncode == 0, done.stderr
    assert sorted(line.split()[1] for line in done.stdout.splitlines() if line.startswith("*")) == layers


def test_export_torch_gives_a_detector_the_onnx_default(tmp_path):
    from onnxcam.exporters import export_torch

    spec = export_torch(TinyYoloV8().eval(), tmp_path / "explain.onnx", input_shape=(3, SIZE, SIZE))
    assert len(spec.layers) == 3 and spec.layouts == ["nchw"] * 3
    x = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    result = onnxcam.Explainer(tmp_path / "explain.onnx", provider="cpu").explain(x, targets=Detection(0.5))
    assert len(result.heatmaps) >= 2 and np.isfinite(result.heatmaps).all()
