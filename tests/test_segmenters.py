"""torchvision's segmenters with no names given (issue 19): FCN-ResNet50, DeepLabV3 (ResNet-50 and MobileNetV3) and
LRASPP end in F.interpolate(size=input.shape[-2:]), a Resize whose sizes are computed from Shape. Each exports through
the legacy exporter and onnxcam's export_torch (dynamo), its default target is a feature map before the class maps,
and its Segmentation maps match pytorch-grad-cam's GradCAM with SemanticSegmentationTarget (its segmentation
tutorial's recipe) at the module that outputs the same tensor, on the same weights (random: no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.anchors import min_max, module_computing
from support.dense import SegmentationOutput, torchvision_segmenter
from support.torch_export import legacy_export
from support.torchvision_shim import import_torchvision
from torch import nn

import onnxcam
from onnxcam.exporters import export_onnx, export_torch
from onnxcam.targets import Segmentation

BATCH = 3  # not the export's batch of 2
SIZE = 96
CLASSES = 4
TOLERANCE = 1e-3  # after min-max scaling, as the issue asks
LEGACY = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
DYNAMO = ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]  # export_torch: minutes for all four


def _images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)


def _check_against_pytorch_grad_cam(model: nn.Module, path) -> None:
    import_torchvision()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    explainer = onnxcam.Explainer(path, provider="cpu")
    spec = explainer.spec
    assert spec.layers and spec.layouts == ["nchw"]
    x = _images()
    scores, _, activation = explainer.model.run(x, np.full(BATCH, -1, np.int64), spec.activations)
    assert activation.shape[1] != CLASSES  # a feature map, not the class maps before the upsampling
    winners = scores.argmax(1)
    classes = [int(np.bincount(w.ravel(), minlength=CLASSES).argmax()) for w in winners]  # each image's largest
    explanation = explainer.explain(x, targets=[Segmentation(c) for c in classes])
    masks = [(w == c).astype(np.float32) for w, c in zip(winners, classes)]
    np.testing.assert_array_equal(explanation.masks, np.stack(masks).astype(bool))

    wrapped = SegmentationOutput(model).eval()
    layer = wrapped.get_submodule(module_computing(wrapped, torch.from_numpy(x), activation))
    with GradCAM(model=wrapped, target_layers=[layer]) as cam:
        reference = cam(input_tensor=torch.from_numpy(x),
                        targets=[SemanticSegmentationTarget(c, m) for c, m in zip(classes, masks)])
    assert np.ptp(reference, axis=(1, 2)).min() > 0
    difference = np.abs(min_max(explanation.heatmaps) - min_max(reference)).max()
    assert difference <= TOLERANCE, difference


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_export_with_no_names_matches_pytorch_grad_cam(name, tmp_path):
    model = torchvision_segmenter(name, CLASSES)
    legacy_export(SegmentationOutput(model), tmp_path / "plain.onnx", (3, SIZE, SIZE))
    export_onnx(tmp_path / "plain.onnx", tmp_path / "explainable.onnx")
    _check_against_pytorch_grad_cam(model, tmp_path / "explainable.onnx")


@pytest.mark.parametrize("name", DYNAMO)
def test_export_torch_with_no_names_matches_pytorch_grad_cam(name, tmp_path):
    model = torchvision_segmenter(name, CLASSES)
    spec = export_torch(model, tmp_path / "explainable.onnx", input_shape=(3, SIZE, SIZE))  # a dict output
    assert spec.layers[0].startswith("classifier.")  # the head's features (DeepLabHead, LRASPPHead)
    _check_against_pytorch_grad_cam(model, tmp_path / "explainable.onnx")


class Upsampled(nn.Module):
    """A strided encoder, a 1x1 classifier and F.interpolate(size=x.shape[-2:]): at opsets 9 and 10 the legacy
    exporter writes an Upsample or Resize whose float scales are computed from Shape (output size / input size)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.classifier = nn.Conv2d(8, CLASSES, 1)

    def forward(self, x):
        return F.interpolate(self.classifier(torch.relu(self.encoder(x))), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


@pytest.mark.parametrize("opset", [9, 10, 11])
def test_scales_computed_from_shape_are_folded(opset, tmp_path):
    """The scales are constant once the image size is fixed (exporters.shapes folds them): the gradient at the
    encoder equals PyTorch autograd's."""
    model = Upsampled().eval()
    legacy_export(model, tmp_path / "plain.onnx", (3, 32, 32), opset=opset, input="x", output="y")
    spec = export_onnx(tmp_path / "plain.onnx", tmp_path / "explainable.onnx", layers=["/encoder/Conv_output_0"])
    x = np.random.default_rng(1).standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    explainable = onnxcam.Explainer(tmp_path / "explainable.onnx", provider="cpu").model
    _, selected, gradient = explainable.run(x, np.full(BATCH, -1, np.int64), spec.gradients)
    captured = {}
    model.encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("A", o))
    flat = model(torch.from_numpy(x)).reshape(BATCH, -1)
    (expected,) = torch.autograd.grad(flat[torch.arange(BATCH), torch.from_numpy(selected)].sum(), captured["A"])
    np.testing.assert_allclose(gradient, expected.numpy(), rtol=1e-4, atol=1e-6 * np.abs(expected.numpy()).max())


class Interpolated(nn.Module):
    """An encoder of stride 4, then F.interpolate back to the image in `mode` (the Resize rule's interpolation
    matrices, read from ONNX Runtime, applied by MatMul along the rows and the columns)."""

    def __init__(self, mode: str, align_corners: bool | None):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x):
        return F.interpolate(torch.tanh(self.encoder(x)), size=x.shape[-2:], mode=self.mode,
                             align_corners=self.align_corners)


@pytest.mark.parametrize(("mode", "align_corners"), [("bilinear", False), ("bilinear", True), ("nearest", None),
                                                     ("bicubic", False)])
def test_integer_upsampling_gradients_match_autograd(mode, align_corners, tmp_path):
    """Grids of 10 x 12 cells upsampled 4x, against PyTorch autograd of a random mix of the output (every cell of the
    upsampled map weighted, the edges' included)."""
    model = Interpolated(mode, align_corners).eval()
    legacy_export(model, tmp_path / "plain.onnx", (3, 40, 48), input="x", output="y")
    spec = export_onnx(tmp_path / "plain.onnx", tmp_path / "explainable.onnx", layers=["/Tanh_output_0"])
    x = np.random.default_rng(2).standard_normal((BATCH, 3, 40, 48)).astype(np.float32)
    seed = np.random.default_rng(3).standard_normal((BATCH, 6, 40, 48)).astype(np.float32)
    explainable = onnxcam.Explainer(tmp_path / "explainable.onnx", provider="cpu").model
    activation, *cuts = explainable.run(x, np.full(BATCH, -1, np.int64), [*spec.activations, *spec.cuts])[2:]
    gradients = explainable.head.gradients(spec.scores, [activation], cuts, np.arange(BATCH), seed)
    features = torch.tanh(model.encoder(torch.from_numpy(x)))
    output = F.interpolate(features, size=x.shape[-2:], mode=mode, align_corners=align_corners)
    (expected,) = torch.autograd.grad((output * torch.from_numpy(seed)).sum(), features)
    np.testing.assert_allclose(gradients[0], expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
