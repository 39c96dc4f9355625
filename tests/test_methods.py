"""Every method, through the whole Explainer path, equals a plain PyTorch hook-based implementation
of its paper's formula (forward hook for A, tensor hook for dy/dA, full backward pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import onnxcam
from onnxcam.core import heatmaps
from onnxcam.core.methods import gradcam, gradcam_plus_plus
from onnxcam.methods import METHODS


def _relu(x):
    return x.clamp(min=0)


def _principal_projection(features):
    """First principal component projection, sign chosen to make the largest-magnitude value positive."""
    batch, channels, height, width = features.shape
    rows = features.reshape(batch, channels, -1).transpose(1, 2)
    centred = rows - rows.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = centred @ vh[:, 0, :, None]
    projection = projection[..., 0]
    peak = projection.gather(1, projection.abs().argmax(dim=1, keepdim=True))
    return (projection * torch.where(peak < 0, -1.0, 1.0)).reshape(batch, height, width)


def reference_cam(method: str, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The papers' formulas, written independently of the numpy core, in float64."""
    if method == "gradcam":  # Selvaraju et al. eq. 1-2
        return _relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(1))
    if method == "gradcam++":  # Chattopadhay et al. eq. 19
        g2, g3 = G ** 2, G ** 3
        denominator = 2 * g2 + A.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1), 0)
        weights = (alpha * _relu(G)).sum(dim=(2, 3), keepdim=True)
        return _relu((weights * A).sum(1))
    if method == "xgradcam":  # Fu et al. eq. 14
        total = A.sum(dim=(2, 3), keepdim=True)
        weights = (A / torch.where(total != 0, total, 1) * G).sum(dim=(2, 3), keepdim=True)
        return _relu((weights * A).sum(1))
    if method == "hirescam":
        return _relu((G * A).sum(1))
    if method == "gradcam-elementwise":
        return _relu(G * A).sum(1)
    if method == "layercam":
        return _relu((_relu(G) * A).sum(1))
    if method == "eigencam":
        return _relu(_principal_projection(A))
    if method == "eigengradcam":
        return _relu(_principal_projection(A * G))
    raise AssertionError(method)


def reference_heatmaps(model, layers, x, method, classes):
    captured, grads = {}, {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = output
            output.register_hook(lambda grad: grads.__setitem__(name, grad))
        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in layers]
    try:
        logits = model(x)
        selected = torch.where(torch.as_tensor(classes) < 0, logits.argmax(1), torch.as_tensor(classes))
        logits.gather(1, selected[:, None]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for name in layers:
        cam = reference_cam(method, captured[name].detach().double(), grads[name].double())
        cam = F.interpolate(cam[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        low = cam.amin(dim=(1, 2), keepdim=True)
        spread = cam.amax(dim=(1, 2), keepdim=True) - low
        maps.append(torch.where(spread > 0, (cam - low) / torch.where(spread > 0, spread, 1), 0))
    combined = torch.stack(maps).mean(0)
    if len(maps) > 1:
        low = combined.amin(dim=(1, 2), keepdim=True)
        combined = (combined - low) / (combined.amax(dim=(1, 2), keepdim=True) - low)
    return combined.numpy(), selected.numpy()


@pytest.fixture(scope="module")
def two_layer_onnx(tmp_path_factory, small_model):
    path = tmp_path_factory.mktemp("two") / "two.onnx"
    onnxcam.exporters.export_torch(small_model, path, input_shape=(3, 32, 32),
                                   layers=["features.6", "features.8"])
    return path


@pytest.mark.parametrize("method", [name for name, method in METHODS.items() if method.formula is not None])
def test_method_matches_pytorch_reference(method, small_onnx, small_model):
    explainer = onnxcam.Explainer(small_onnx, provider="cpu")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = [-1, 0, 4]
    result = explainer.explain(x.numpy(), method=method, targets=classes)
    expected, selected = reference_heatmaps(small_model, ["features.8"], x.clone(), method, classes)
    np.testing.assert_array_equal(result.classes, selected)
    assert result.heatmaps.shape == (3, 32, 32) and result.heatmaps.dtype == np.float32
    assert result.heatmaps.max() == pytest.approx(1.0)
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "eigencam"])
def test_several_target_layers_are_averaged(method, two_layer_onnx, small_model):
    explainer = onnxcam.Explainer(two_layer_onnx, provider="cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = explainer.explain(x.numpy(), method=method)
    expected, _ = reference_heatmaps(small_model, ["features.6", "features.8"], x.clone(), method, [-1, -1])
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)


def test_seed_worked_example_two_channels():
    """Seed 1: alpha = (1/3, -2/3) over two 3x3 channels gives ReLU of the weighted sum, by hand."""
    A = np.array([[[[1, 0, 2], [3, 5, 0], [1, 1, 1]], [[0, 1, 0], [3, 1, 0], [1, 0, 1]]]], dtype=np.float64)
    G = np.broadcast_to(np.array([1 / 3, -2 / 3])[None, :, None, None], A.shape)
    expected = np.array([[1 / 3, 0, 2 / 3], [0, 1, 0], [0, 1 / 3, 0]])
    np.testing.assert_allclose(gradcam(A, G)[0], expected, atol=1e-12)


def test_gradcam_plus_plus_alpha_is_not_swamped_by_an_epsilon():
    """With gradients of order 1e-6, an additive 1e-7 in the denominator would change alpha entirely;
    only exact zeros may be guarded."""
    rng = np.random.default_rng(3)
    A = rng.random((2, 4, 5, 5))
    G = rng.standard_normal((2, 4, 5, 5)) * 1e-6
    G[0, 1] = 0.0  # an all-zero channel: denominator 0, alpha must be 0, not NaN
    expected = reference_cam("gradcam++", torch.from_numpy(A), torch.from_numpy(G)).numpy()
    got = gradcam_plus_plus(A, G)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)


def test_normalisation_never_yields_nan():
    maps = np.zeros((2, 3, 3), dtype=np.float32)
    maps[1] = 0.5
    out = heatmaps([maps], (6, 6))
    assert np.isfinite(out).all()
    assert (out[0] == 0).all()  # an all-zero map stays zero
    assert (out[1] == 1).all()  # a flat positive map is uniformly hot


def test_uint8_images_are_preprocessed_from_metadata(small_onnx, small_model):
    """RGB uint8 images go through the recorded resize and mean/std; the logits match PyTorch on the same pixels."""
    explainer = onnxcam.Explainer(small_onnx, provider="cpu")
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    result = explainer.explain(images)
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        np.testing.assert_allclose(result.logits, small_model(x).numpy(), rtol=1e-4, atol=1e-5)
    single = explainer.explain(images[0])
    np.testing.assert_allclose(single.heatmaps[0], result.heatmaps[0], atol=1e-5)


def test_user_mistakes_are_refused_clearly(small_onnx, tmp_path):
    explainer = onnxcam.Explainer(small_onnx, provider="cpu")
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(onnxcam.ExplainError, match="class index 5 is out of range"):
        explainer.explain(x, targets=[0, 5])
    with pytest.raises(onnxcam.ExplainError, match=r"unknown method 'gradcam\+'"):
        explainer.explain(x, method="gradcam+")
    with pytest.raises(onnxcam.ExplainError, match="expected a float32 batch"):
        explainer.explain(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(onnxcam.ExplainError, match="3 targets given for 2 images"):
        explainer.explain(x, targets=[0, 1, 2])
