"""Targets beyond one class (onnxcam.targets), each checked against Grad-CAM from PyTorch hooks with the score
written as pytorch-grad-cam's targets define it, against finite differences on ONNX files torch did not write,
and for parity with single-class runs."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnxcam
from onnxcam.core.errors import ExplainError
from onnxcam.exporters import export_onnx
from onnxcam.targets import Classes, Contrast, Detection, Segmentation, Similarity

BATCH = 3  # not the export's batch of 2


def hook_gradcam(model: nn.Module, layer: str, x: torch.Tensor, scores) -> np.ndarray:
    """Grad-CAM from a forward hook and a full backward pass, per (image, score) pair: `scores(output)` gives a
    list of (image, scalar tensor). Upsampled bilinearly and min-max scaled, as pytorch-grad-cam does."""
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.__setitem__("A", o))
    try:
        output = model(x)
    finally:
        handle.remove()
    maps = []
    for image, score in scores(output):
        (gradient,) = torch.autograd.grad(score, captured["A"], retain_graph=True)
        weights = gradient[image].double().mean(dim=(1, 2), keepdim=True)
        cam = (weights * captured["A"][image].detach().double()).sum(0).clamp(min=0)
        cam = F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
        spread = cam.max() - cam.min()
        maps.append(((cam - cam.min()) / spread if spread > 0 else cam * 0).numpy())
    return np.stack(maps)


def _images(seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


class TinySegmenter(nn.Module):
    """An encoder at half resolution and a 1x1 classifier: K x 16 x 16 per image, like an FCN's output."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                     nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, x):
        return self.classifier(self.encoder(x))


class TinyYolo(nn.Module):
    """Two scales of anchors, the YOLOv8 layout B x (4 + K) x N (boxes in pixels, sigmoid class scores), or
    the YOLOv5 one, B x N x (5 + K) with objectness."""

    def __init__(self, classes: int = 3, v5: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.v5, extra = v5, 5 if v5 else 4
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.heads = nn.ModuleList([nn.Conv2d(8, extra + classes, 1), nn.Conv2d(8, extra + classes, 1)])
        for stride in (2, 4):  # anchor centres of a 32 x 32 input, in pixels
            ys, xs = torch.meshgrid(torch.arange(32 // stride), torch.arange(32 // stride), indexing="ij")
            centre = torch.stack([xs, ys]).reshape(1, 2, -1).float() * stride + stride / 2
            self.register_buffer(f"centre{stride}", centre)

    def forward(self, x):
        fine = self.backbone(x)
        rows = []
        for head, features, stride in zip(self.heads, (fine, self.down(fine)), (2, 4), strict=True):
            out = head(features).flatten(2)
            centre = getattr(self, f"centre{stride}")
            boxes = torch.cat([centre + out[:, :2].tanh() * stride, (out[:, 2:4].sigmoid() + 0.5) * 4 * stride], 1)
            rows.append(torch.cat([boxes, out[:, 4:].sigmoid()], 1))
        joined = torch.cat(rows, 2)
        return joined.transpose(1, 2) if self.v5 else joined


class TinyEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.project = nn.Linear(8, 6)

    def forward(self, x):
        return self.project(self.features(x).mean(dim=(2, 3)))


def _explainable(model: nn.Module, tmp_path, layer: str) -> onnxcam.Explainer:
    """`model` through TorchScript's exporter and export_onnx (seconds; the dynamo exporter takes tens here), the
    output of module `layer` as target."""
    plain, path = tmp_path / "plain.onnx", tmp_path / "explain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), plain, dynamo=False, input_names=["input"],
                          output_names=["out"], dynamic_axes={"input": {0: "N"}, "out": {0: "N"}})
    tensor = f"/{layer.split('.', maxsplit=1)[0]}/{layer}/Relu_output_0"
    export_onnx(plain, path, layers=[tensor])
    return onnxcam.Explainer(path, provider="cpu")


@pytest.fixture(scope="module")
def explainer(small_onnx):
    return onnxcam.Explainer(small_onnx, provider="cpu")


def test_several_classes_equal_single_class_runs(explainer):
    x = _images(0).numpy()
    result = explainer.explain(x, targets=Classes(4, 1))
    assert result.heatmaps.shape == (2 * BATCH, 32, 32)
    np.testing.assert_array_equal(result.image_index, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(result.classes, [4, 1] * BATCH)
    for position, class_index in enumerate((4, 1)):
        single = explainer.explain(x, targets=class_index)
        np.testing.assert_array_equal(result.heatmaps[position::2], single.heatmaps)
        np.testing.assert_array_equal(result.scores[position::2], single.logits[:, class_index])


def test_top_classes_and_per_image_targets_match_pytorch(explainer, small_model):
    x = _images(1)
    result = explainer.explain(x.numpy(), targets=[Classes(top=3), 2, None])
    logits = small_model(x).detach()
    top = torch.argsort(logits[0], descending=True)[:3].tolist()
    expected_targets = [*top, 2, int(logits[2].argmax())]
    np.testing.assert_array_equal(result.classes, expected_targets)
    np.testing.assert_array_equal(result.image_index, [0, 0, 0, 1, 2])
    pairs = list(zip(result.image_index.tolist(), expected_targets, strict=True))
    expected = hook_gradcam(small_model, "features.8", x, lambda out: [(i, out[i, c]) for i, c in pairs])
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)


def test_labels_above_a_probability_for_multi_label_models(explainer, small_model):
    x = _images(2)
    result = explainer.explain(x.numpy(), targets=Classes(above=0.5))
    positive = torch.sigmoid(small_model(x)).detach() > 0.5
    np.testing.assert_array_equal(result.image_index, positive.nonzero()[:, 0].numpy())
    np.testing.assert_array_equal(result.classes, positive.nonzero()[:, 1].numpy())


def test_contrast_is_finer_cam(explainer, small_model):
    """pytorch-grad-cam's FinerWeightedTarget with one comparison class: y_c - alpha y_d, d the best other class."""
    x = _images(3)
    result = explainer.explain(x.numpy(), targets=Contrast(0, strength=0.8))
    logits = small_model(x)
    others = [int(torch.argsort(row, descending=True)[row.argsort(descending=True) != 0][0]) for row in logits]
    expected = hook_gradcam(small_model, "features.8", x,
                            lambda out: [(i, out[i, 0] - 0.8 * out[i, d]) for i, d in enumerate(others)])
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)
    np.testing.assert_allclose(result.scores, [float(logits[i, 0] - 0.8 * logits[i, d]) for i, d in enumerate(others)],
                               rtol=1e-5)


def test_segmentation_matches_pytorch(tmp_path):
    model = TinySegmenter().eval()
    explainer = _explainable(model, tmp_path, "encoder.3")
    x = _images(4)
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:10, 2:12] = True
    for target, masks in [(Segmentation(2), None), (Segmentation(1, mask=mask), mask)]:
        result = explainer.explain(x.numpy(), targets=target)
        output = model(x)
        chosen = [(output[i].argmax(0) == target.class_index) if masks is None else torch.from_numpy(masks)
                  for i in range(BATCH)]
        # SemanticSegmentationTarget: (model_output[category, :, :] * mask).sum()
        expected = hook_gradcam(model, "encoder.3", x, lambda out, c=target.class_index, chosen=chosen: [
            (i, (out[i, c] * chosen[i]).sum()) for i in range(BATCH)])
        np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)
        np.testing.assert_array_equal(result.masks, torch.stack([torch.as_tensor(c) for c in chosen]).numpy())
        np.testing.assert_allclose(result.scores, [float((output[i, target.class_index] * chosen[i]).sum())
                                                   for i in range(BATCH)], rtol=1e-4, atol=1e-5)


def _reference_detections(rows: np.ndarray, threshold: float, iou: float) -> list[tuple[int, int, float]]:
    """(anchor, class, score) kept by greedy per-class NMS, best first; rows are N x (4 + K) of cx cy w h scores."""
    boxes = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], 1)
    labels, scores = rows[:, 4:].argmax(1), rows[:, 4:].max(1)
    kept: list[int] = []
    for n in np.argsort(-scores, kind="stable"):
        if scores[n] < threshold:
            break
        for k in kept:
            if labels[k] != labels[n]:
                continue
            low, high = np.maximum(boxes[n, :2], boxes[k, :2]), np.minimum(boxes[n, 2:], boxes[k, 2:])
            inter = np.prod(np.clip(high - low, 0, None))
            union = np.prod(boxes[n, 2:] - boxes[n, :2]) + np.prod(boxes[k, 2:] - boxes[k, :2]) - inter
            if inter / union > iou:
                break
        else:
            kept.append(int(n))
    return [(n, int(labels[n]), float(scores[n])) for n in kept]


@pytest.mark.parametrize(("v5", "threshold"), [(False, 0.55), (True, 0.3)], ids=["yolov8", "yolov5"])
def test_detections_match_pytorch(v5, threshold, tmp_path):
    model = TinyYolo(v5=v5).eval()
    explainer = _explainable(model, tmp_path, "backbone.3")
    x = _images(5)
    images = [np.zeros((64, 48, 3), np.uint8)] * BATCH  # boxes come back in the pixels of the images as given
    result = explainer.explain(x.numpy(), targets=Detection(threshold, 0.3, max_detections=4))
    output = model(x)
    rows = output.detach().numpy() if v5 else output.detach().numpy().transpose(0, 2, 1)
    if v5:  # objectness times class probability
        rows = np.concatenate([rows[..., :4], rows[..., 5:] * rows[..., 4:5]], axis=2)
    found = [(i, *d) for i in range(BATCH) for d in _reference_detections(rows[i], threshold, 0.3)[:4]]
    assert len(found) >= 2
    np.testing.assert_array_equal(result.image_index, [i for i, *_ in found])
    np.testing.assert_array_equal(result.classes, [c for _, _, c, _ in found])
    np.testing.assert_allclose(result.scores, [s for *_, s in found], rtol=1e-5)

    def score(out, i, n, c):
        return out[i, n, 4] * out[i, n, 5 + c] if v5 else out[i, 4 + c, n]

    expected = hook_gradcam(model, "backbone.3", x, lambda out: [(i, score(out, i, n, c)) for i, n, c, _ in found])
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)
    corners = np.stack([np.concatenate([rows[i, n, :2] - rows[i, n, 2:4] / 2, rows[i, n, :2] + rows[i, n, 2:4] / 2])
                        for i, n, _, _ in found])
    np.testing.assert_allclose(result.boxes, np.clip(corners, 0, 32), rtol=1e-5, atol=1e-4)
    scaled = explainer.explain([image.copy() for image in images], targets=Detection(score_threshold=0.0))
    assert (scaled.boxes[:, [0, 2]] <= 48).all() and (scaled.boxes[:, [1, 3]] <= 64).all()


def test_similarity_matches_pytorch(tmp_path):
    model = TinyEmbedder().eval()
    concept = np.random.default_rng(6).standard_normal(6).astype(np.float32)
    x = _images(6)
    result = _explainable(model, tmp_path, "features.3").explain(x.numpy(), targets=Similarity(concept))
    c = torch.from_numpy(concept)
    # SimilarityToConceptTarget: cos(model_output, concept_features)
    expected = hook_gradcam(model, "features.3", x, lambda out: [(i, F.cosine_similarity(out[i], c, dim=0))
                                                               for i in range(BATCH)])
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)
    np.testing.assert_allclose(result.scores, F.cosine_similarity(model(x), c[None]).detach().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(result.classes, [-1] * BATCH)


def _helper_model(path, head: str, classes: int = 3) -> None:
    """A graph written with onnx.helper: Conv, Tanh (the target), Conv, then a segmentation output (B x K x 6 x 6)
    or a YOLOv8-style one (B x (4 + K) x 36, class scores through a Sigmoid)."""
    rng = np.random.default_rng(7)
    channels = 4 + classes if head == "detect" else classes
    initializers = [numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w1"),
                    numpy_helper.from_array(rng.standard_normal((channels, 5, 3, 3)).astype(np.float32) * 0.5, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["conv"], ["feat"]),
             helper.make_node("Conv", ["feat", "w2"], ["raw" if head == "detect" else "y"], pads=[1, 1, 1, 1])]
    if head == "detect":
        initializers.append(numpy_helper.from_array(np.array([0, channels, 36], np.int64), "shape"))
        initializers.append(numpy_helper.from_array(np.array([4, classes], np.int64), "split"))
        nodes += [helper.make_node("Reshape", ["raw", "shape"], ["flat"], allowzero=0),
                  helper.make_node("Split", ["flat", "split"], ["box", "cls"], axis=1),
                  helper.make_node("Sigmoid", ["cls"], ["prob"]),
                  helper.make_node("Concat", ["box", "prob"], ["y"], axis=1)]
    shape = ["N", 4 + classes, 36] if head == "detect" else ["N", classes, 6, 6]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("head", ["segment", "detect"])
def test_head_gradient_matches_finite_differences(head, tmp_path):
    """The head's gradient (exporters.head) against central differences of the score through the file's own graph."""
    import onnxruntime as ort

    plain, explainable = tmp_path / "plain.onnx", tmp_path / "explain.onnx"
    _helper_model(plain, head)
    export_onnx(plain, explainable, layers=["feat"])
    explainer = onnxcam.Explainer(explainable, provider="cpu")
    x = np.random.default_rng(8).standard_normal((BATCH, 3, 6, 6)).astype(np.float32)
    target = Segmentation(1) if head == "segment" else Detection(score_threshold=0.0, max_detections=2)
    spec = explainer.spec
    output, feat = explainer.model.runner.run([spec.scores, *spec.activations], {spec.input: x, spec.class_input:
                                                                          np.full(BATCH, -1, np.int64)})
    picks = [(i, p) for i in range(BATCH) for p in target.picks(output[i])]
    index = np.array([i for i, _ in picks])
    seeds = np.stack([p.seed for _, p in picks])
    (gradient,) = explainer.model.head.gradients(spec.scores, [feat], [], index, seeds)
    tail = onnx.load(str(plain))  # the nodes after the target, run on a perturbed target
    tail.graph.ClearField("input")
    tail.graph.input.append(helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 5, 6, 6]))
    kept = [n for n in tail.graph.node if n.output[0] not in ("conv", "feat")]
    tail.graph.ClearField("node")
    tail.graph.node.extend(kept)
    session = ort.InferenceSession(tail.SerializeToString(), providers=["CPUExecutionProvider"])
    direction = np.random.default_rng(9).standard_normal(gradient.shape).astype(np.float32)
    step = 1e-2

    def score(sign):
        out = session.run(None, {"feat": (feat[index] + sign * step * direction).astype(np.float32)})[0]
        return (out.astype(np.float64) * seeds).reshape(len(picks), -1).sum(1)

    numeric = (score(1) - score(-1)) / (2 * step)
    analytic = (gradient.astype(np.float64) * direction).reshape(len(picks), -1).sum(1)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=2e-3)


def test_bad_targets_get_one_line(explainer, tmp_path):
    x = _images(9).numpy()
    with pytest.raises(ExplainError, match="Segmentation needs an output of K x h x w per image; this one is 5"):
        explainer.explain(x, targets=Segmentation(0))
    with pytest.raises(ExplainError, match="class index 7 is out of range"):
        explainer.explain(x, targets=Classes(1, 7))
    with pytest.raises(ExplainError, match="class index 9 is out of range"):
        explainer.explain(x, targets=Classes(9))
    with pytest.raises(ExplainError, match="the concept has 3 values; the embedding has 5"):
        explainer.explain(x, targets=Similarity(np.ones(3)))
    with pytest.raises(ExplainError, match="2 targets given for 3 images"):
        explainer.explain(x, targets=[Classes(1, 2), 0])
    with pytest.raises(ExplainError, match="exactly one"):
        Classes(1, top=2)
    with pytest.raises(ExplainError, match="the model has no output 'probs'; its outputs: logits"):
        explainer.explain(x, targets=Classes(top=2, output="probs"))


def test_nudenet_yolov8n_detects_and_explains_the_astronauts_face(tmp_path):
    pytest.importorskip("nudenet")
    skimage = pytest.importorskip("skimage.data")
    from support.detectors import NUDENET_FACE, NUDENET_LAYERS, nudenet_file

    explainable = tmp_path / "320n.explain.onnx"
    export_onnx(nudenet_file(), explainable, input_size=(320, 320), layers=NUDENET_LAYERS)
    explainer = onnxcam.Explainer(explainable, provider="cpu")
    image = skimage.astronaut()
    result = explainer.explain([image, image[:, ::-1].copy()], targets=Detection(score_threshold=0.3))
    face = [row for row, label in enumerate(result.classes) if label == NUDENET_FACE]
    assert sorted(result.image_index[face].tolist()) == [0, 1]
    for row in face:
        x1, y1, x2, y2 = result.boxes[row]
        centre = (200, 130) if result.image_index[row] == 0 else (image.shape[1] - 200, 130)  # face, by eye
        assert x1 < centre[0] < x2 and y1 < centre[1] < y2 and result.scores[row] > 0.5
        heat = result.heatmaps[row]
        peak = np.unravel_index(heat.argmax(), heat.shape)
        scale = 320 / image.shape[0]
        assert y1 * scale <= peak[0] <= y2 * scale and x1 * scale <= peak[1] <= x2 * scale


def test_annotations_draw_the_box_label_and_mask_outline():
    from onnxcam.core.images import annotate

    image = np.zeros((100, 120, 3), np.uint8)
    boxed = annotate(image, box=(10, 30, 60, 80), label="face 0.9", colour=(0, 255, 0))
    assert (boxed[55, 10] == [0, 255, 0]).all() and (boxed[55, 35] == 0).all()  # the edge, not the inside
    assert (boxed[:30, 10:60] != 0).any()  # the label sits above the box
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:9] = True  # at the output's resolution: 20 to 80 by 30 to 90 in the image
    outlined = annotate(image, mask=mask, colour=(255, 0, 0))
    assert (outlined[50, 30] == [255, 0, 0]).all() and (outlined[50, 60] == 0).all()
    assert (image == 0).all()


def test_cli_several_targets_and_a_bad_task(small_onnx, tmp_path):
    from conftest import random_images, run_cli

    from onnxcam.core.files import write_png

    picture = tmp_path / "picture.png"
    write_png(picture, random_images(1)[0])
    done = run_cli("explain", small_onnx, picture, "-o", tmp_path / "out", "--class", 1, "--class", 3)
    assert done.returncode == 0, done.stderr
    assert {"picture.class1.png", "picture.class3.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    done = run_cli("explain", small_onnx, picture, "-o", tmp_path / "bad", "--task", "segment", "--class", 1)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("error: Segmentation needs an output of K x h x w per image; "
                                                    "this one is 5")


def test_detections_after_nms_and_by_rank():
    """A head that already ran NMS (rows x1 y1 x2 y2 score class): no NMS again, the score column is the score."""
    rows = np.array([[1, 2, 5, 6, 0.4, 2], [0, 0, 4, 4, 0.9, 1], [2, 2, 3, 3, 0.1, 0], [1, 1, 5, 5, 0.8, 1]],
                    dtype=np.float32)
    picks = Detection(score_threshold=0.3).picks(rows)
    assert [p.target for p in picks] == [1, 1, 2] and [p.score for p in picks] == pytest.approx([0.9, 0.8, 0.4])
    np.testing.assert_array_equal(picks[1].box, [1, 1, 5, 5])
    expected = np.zeros_like(rows)
    expected[3, 4] = 1
    np.testing.assert_array_equal(picks[1].seed, expected)
    assert [p.score for p in Detection(score_threshold=0.3, ranks=[2, 0, 7]).picks(rows)] == pytest.approx([0.4, 0.9])
    assert [p.target for p in Detection(score_threshold=0.0, classes=[0]).picks(rows)] == [0]


def test_targets_from_plain_options():
    from onnxcam.targets import from_options

    assert from_options() is None and from_options([3]) == 3
    assert from_options([3, 5]) == Classes(3, 5) and from_options(top=5) == Classes(top=5)
    assert from_options([2], task="detect", score_threshold=0.5) == Detection(0.5, classes=[2])
    assert from_options([1], task="segment") == Segmentation(1)
    np.testing.assert_array_equal(from_options(task="embed", concept=[1, 2]).concept, [1, 2])
    for bad, message in [({"task": "segment"}, "one class"), ({"classes": [1], "top": 2}, "not both"),
                         ({"task": "embed"}, "concept"), ({"task": "pose"}, "unknown task 'pose'")]:
        with pytest.raises(ExplainError, match=message):
            from_options(**bad)


def test_a_vit_head_reads_the_residual_stream_as_a_cut(tmp_path):
    """A ViT's target (the first LayerNorm of its last block) does not hold the residual stream the rest of the
    block adds to: the head reads it as a cut tensor, and several classes still equal single-class runs."""
    from support.zoo_transformers import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image=32, patch=8, dim=32, depth=2, heads=2, classes=5).eval()
    plain, path = tmp_path / "vit.onnx", tmp_path / "vit.explain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), plain, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    spec = export_onnx(plain, path)
    assert len(spec.cuts) >= 1
    explainer = onnxcam.Explainer(path, provider="cpu")
    x = _images(10).numpy()
    result = explainer.explain(x, targets=Classes(1, 3))
    for position, class_index in enumerate((1, 3)):
        np.testing.assert_allclose(result.heatmaps[position::2], explainer.explain(x, targets=class_index).heatmaps,
                                   atol=1e-6)
