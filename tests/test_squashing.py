"""The class score before the squashing (issue 19): a classifier or segmenter whose output is a Softmax,
LogSoftmax or Sigmoid of its logits is explained from the logits, as Grad-CAM defines the score (Selvaraju et al.,
section 3: y^c "before the softmax"), and one option keeps the probabilities. The references are the same
weights without the squashing (the logits model), and PyTorch autograd of the probability."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli, small_net
from onnx import helper, numpy_helper
from support.torch_export import legacy_export
from test_targets import TinySegmenter
from torch import nn

import onnxcam
from onnxcam.exporters import export_onnx, export_torch
from onnxcam.runtimes.explainable import ExplainableModel
from onnxcam.targets import Classes, Segmentation

BATCH = 3  # not the export's batch of 2
FOREIGN = "tests/fixtures/foreign"


SURE = 40.0  # added to class 1's logit: its probability rounds to 1.0 in float32 (the logits' gradients are unchanged)


class Squashed(nn.Module):
    """`model` followed by a squashing module (nn.Identity for the logits model: the same tensor names), with
    `shift` added to class 1's logit (a confident classifier)."""

    def __init__(self, model: nn.Module, squashing: nn.Module, shift: float = 0.0):
        super().__init__()
        self.model, self.squashing, self.shift = model, squashing, shift

    def forward(self, x):
        logits = self.model(x)
        return self.squashing(torch.cat([logits[:, :1], logits[:, 1:2] + self.shift, logits[:, 2:]], dim=1))


def _images(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, 3, size, size)).astype(np.float32)


def _legacy(model: nn.Module, path, size: int = 32):
    return legacy_export(model, path, (3, size, size), output="predictions")


@pytest.mark.parametrize("squashing", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1), nn.Sigmoid()],
                         ids=["softmax", "log_softmax", "sigmoid"])
def test_a_confident_classifier_is_explained_from_its_logits(tmp_path, squashing):
    """Probabilities that round to 1.0 in float32 have no gradient: the map is the logits model's, not a refusal."""
    confident = Squashed(small_net(), squashing, SURE).eval()
    x = _images()
    with torch.no_grad():
        output = confident(torch.from_numpy(x))
    if not isinstance(squashing, nn.LogSoftmax):  # the premise: saturated in float32
        assert (output.max(1).values == 1.0).all()
    spec = export_onnx(_legacy(confident, tmp_path / "squashed.onnx"), tmp_path / "squashed.explain.onnx")
    export_onnx(_legacy(Squashed(small_net(), nn.Identity(), SURE).eval(), tmp_path / "logits.onnx"),
                tmp_path / "logits.explain.onnx", layers=spec.layers)  # the same names: the same module tree
    assert spec.squashing == squashing.__class__.__name__.replace("LogSoftmax", "log_softmax").lower()
    squashed = onnxcam.Explainer(tmp_path / "squashed.explain.onnx").explain(x, "gradcam")
    logits = onnxcam.Explainer(tmp_path / "logits.explain.onnx").explain(x, "gradcam")
    assert np.abs(squashed.heatmaps).max() > 0
    np.testing.assert_allclose(squashed.heatmaps, logits.heatmaps, atol=1e-5)
    np.testing.assert_array_equal(squashed.classes, logits.classes)
    np.testing.assert_allclose(squashed.logits, output.numpy().reshape(BATCH, -1), rtol=1e-5, atol=1e-6)


def test_targets_that_read_probabilities_are_explained_from_the_logits(tmp_path):
    """Classes(top=2) picks from the probabilities and explains the logits: each map equals the logits model's map
    of the same class; so do Score-CAM's (its score changes are the logits')."""
    squashed = Squashed(small_net(), nn.Softmax(dim=1)).eval()
    spec = export_onnx(_legacy(squashed, tmp_path / "squashed.onnx"), tmp_path / "squashed.explain.onnx")
    export_onnx(_legacy(Squashed(small_net(), nn.Identity()).eval(), tmp_path / "logits.onnx"),
                tmp_path / "logits.explain.onnx", layers=spec.layers)
    x = _images(1)
    with_softmax = onnxcam.Explainer(tmp_path / "squashed.explain.onnx")
    plain = onnxcam.Explainer(tmp_path / "logits.explain.onnx")
    top = with_softmax.explain(x, targets=Classes(top=2))
    again = plain.explain(x[top.image_index], targets=list(top.classes))
    np.testing.assert_allclose(top.heatmaps, again.heatmaps, atol=1e-5)
    for method in ("scorecam", "ablationcam"):
        np.testing.assert_allclose(with_softmax.explain(x, method).heatmaps, plain.explain(x, method).heatmaps,
                                   atol=1e-5)


def test_a_segmenter_with_a_softmax_is_explained_from_its_logits(tmp_path):
    segmenter = TinySegmenter().eval()
    for module in segmenter.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data *= 4  # a confident segmenter: saturated probabilities
    spec = export_onnx(_legacy(Squashed(segmenter, nn.Softmax(dim=1)).eval(), tmp_path / "squashed.onnx"),
                       tmp_path / "squashed.explain.onnx")
    export_onnx(_legacy(Squashed(segmenter, nn.Identity()).eval(), tmp_path / "logits.onnx"),
                tmp_path / "logits.explain.onnx", layers=spec.layers)
    x = _images(2)
    squashed = onnxcam.Explainer(tmp_path / "squashed.explain.onnx").explain(x, targets=Segmentation(1))
    logits = onnxcam.Explainer(tmp_path / "logits.explain.onnx").explain(x, targets=Segmentation(1))
    np.testing.assert_array_equal(squashed.masks, logits.masks)
    np.testing.assert_allclose(squashed.heatmaps, logits.heatmaps, atol=1e-5)


def test_the_option_keeps_the_probability(tmp_path):
    """explain_probabilities: the gradient is that of the probability, p_c (grad z_c - sum_j p_j grad z_j), as
    PyTorch autograd gives it."""
    model = Squashed(small_net(), nn.Softmax(dim=1)).eval()
    spec = export_torch(model, tmp_path / "probabilities.onnx", input_shape=(3, 32, 32), layers=["model.features.8"],
                        explain_probabilities=True)
    assert spec.explained is None and spec.squashing is None
    x = _images(3)
    explainable = ExplainableModel(tmp_path / "probabilities.onnx")
    scores, selected, gradient = explainable.run(x, np.full(BATCH, -1, np.int64), spec.gradients)
    captured = {}
    model.get_submodule("model.features.8").register_forward_hook(lambda m, i, o: captured.__setitem__("A", o))
    output = model(torch.from_numpy(x))
    (expected,) = torch.autograd.grad(output[torch.arange(BATCH), output.argmax(1)].sum(), captured["A"])
    np.testing.assert_allclose(gradient, expected.numpy(), rtol=1e-4, atol=1e-7)


def test_the_torch_front_end_explains_a_module_ending_in_softmax(tmp_path):
    """export_torch's default layer is probed on the logits (a saturated softmax has no gradient to probe)."""
    spec = export_torch(Squashed(small_net(), nn.Softmax(dim=1), SURE).eval(), tmp_path / "softmax.onnx",
                        input_shape=(3, 32, 32))
    assert spec.squashing == "softmax"
    reference = export_torch(Squashed(small_net(), nn.Identity(), SURE).eval(), tmp_path / "logits.onnx",
                             input_shape=(3, 32, 32))
    x = _images(4)
    np.testing.assert_allclose(onnxcam.Explainer(tmp_path / "softmax.onnx").explain(x).heatmaps,
                               onnxcam.Explainer(tmp_path / "logits.onnx").explain(x).heatmaps, atol=1e-5)
    assert reference.layers == spec.layers


def _confident_keras(tmp_path):
    """tf2onnx's Keras MobileNetV2 (NHWC, softmax output) with a bias raising class 0's logit by SURE before the
    softmax: a confident model; and the same file with the Softmax cut off (its logits as the output)."""
    model = onnx.load(f"{FOREIGN}/keras_mobilenetv2.onnx")
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    bias = np.zeros(10, np.float32)
    bias[0] = SURE
    model.graph.initializer.append(numpy_helper.from_array(bias, "confident_bias"))
    model.graph.node.insert(list(model.graph.node).index(softmax),
                            helper.make_node("Add", [softmax.input[0], "confident_bias"], ["confident_logits"]))
    softmax.input[0] = "confident_logits"
    onnx.save(model, tmp_path / "keras_confident.onnx")
    output = model.graph.output[0]
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(softmax.input[0], output.type.tensor_type.elem_type,
                                                            None))
    model.graph.node.remove(softmax)
    onnx.save(model, tmp_path / "keras_logits.onnx")
    return tmp_path / "keras_confident.onnx", tmp_path / "keras_logits.onnx"


def test_a_confident_keras_classifier_explains_as_its_logits_do(tmp_path):
    confident, logits = _confident_keras(tmp_path)
    spec = export_onnx(confident, tmp_path / "confident.explain.onnx")
    export_onnx(logits, tmp_path / "logits.explain.onnx", layers=spec.layers)
    images = np.random.default_rng(5).integers(0, 256, (BATCH, *spec.input_size, 3), dtype=np.uint8)
    explained = onnxcam.Explainer(tmp_path / "confident.explain.onnx").explain(list(images))
    assert (explained.logits.max(1) == 1.0).all()  # the premise: saturated in float32
    reference = onnxcam.Explainer(tmp_path / "logits.explain.onnx").explain(list(images))
    np.testing.assert_allclose(explained.heatmaps, reference.heatmaps, atol=1e-5)


def test_export_says_what_it_explains(tmp_path):
    confident, _ = _confident_keras(tmp_path)
    done = run_cli("export", confident, "-o", tmp_path / "out.onnx")
    assert done.returncode == 0, done.stderr
    spec = onnxcam.Explainer(tmp_path / "out.onnx").spec
    assert f"scores '{spec.scores}' (10 classes) = softmax('{spec.logits}'); explained before the softmax, layers " \
        in done.stdout
    kept = run_cli("export", confident, "-o", tmp_path / "kept.onnx", "--explain-probabilities")
    assert kept.returncode == 0 and "explained before" not in kept.stdout, kept.stderr
    assert onnxcam.Explainer(tmp_path / "kept.onnx").spec.squashing is None
