"""Vision Transformers: gradients against autograd, token layouts, and attention rollout against a
PyTorch reference written from the definitions (Abnar & Zuidema; Chefer et al.), at batch 3."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from support.zoo_transformers import deit, swin, vit
from test_methods import reference_cam

import onnxcam
from onnxcam.core.rollout import grad_rollout, rollout
from onnxcam.exporters import ExportError, default_layer, export_onnx, export_torch

BATCH = 3  # the export traces at 2


@pytest.fixture(scope="module")
def vit_model():
    return vit()


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory, vit_model):
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    spec = export_torch(vit_model, path, input_shape=(3, 32, 32), attention_gradients=True)
    return path, spec


@pytest.fixture(scope="module")
def swin_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("swin") / "swin.onnx"
    spec = export_torch(swin(), path, input_shape=(3, 32, 32), layers=["layers.1.blocks.1.norm1", "norm"])
    return path, spec


def _inputs(seed=0):
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _autograd(model, names, x, classes):
    captured = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
               for n in names]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    selected = torch.where(torch.as_tensor(classes) < 0, logits.argmax(1), torch.as_tensor(classes))
    grads = torch.autograd.grad(logits.gather(1, selected[:, None]).sum(), [captured[n] for n in names])
    return logits.detach(), selected, [captured[n].detach() for n in names], grads


def _run(path, x, classes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x.numpy(), "onnxcam_class": np.asarray(classes, np.int64)})))


def _close(got, expected):
    expected = expected.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_vit_default_target_and_layouts(vit_model, vit_onnx):
    _, spec = vit_onnx
    assert default_layer(vit_model, (3, 32, 32)) == "blocks.2.norm1"
    assert spec.layers == ["blocks.2.norm1"] and spec.layouts == ["tokens:1:4x4"]
    assert len(spec.attentions) == 3 and spec.attention_layout == "tokens:1:4x4"


def test_onnx_vit_default_target_is_the_torch_default(vit_model, vit_onnx, tmp_path):
    """From a plain ONNX file, with no module names: the LayerNorm the last attention reads, as in PyTorch."""
    path, _ = vit_onnx
    torch.onnx.export(vit_model, (torch.zeros(2, 3, 32, 32),), tmp_path / "plain.onnx", dynamo=True,
                      input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    spec = export_onnx(tmp_path / "plain.onnx", tmp_path / "explainable.onnx")
    assert spec.layouts == ["tokens:1:4x4"] and len(spec.attentions) == 3
    x, classes = _inputs(8).numpy(), [0, -1, 3]
    got = onnxcam.Explainer(tmp_path / "explainable.onnx", provider="cpu").explain(x, targets=classes)
    expected = onnxcam.Explainer(path, provider="cpu").explain(x, targets=classes)
    np.testing.assert_allclose(got.heatmaps, expected.heatmaps, atol=1e-5)


def test_vit_gradients_match_autograd(vit_model, vit_onnx):
    path, spec = vit_onnx
    x, classes = _inputs(), [-1, 0, 5]
    out = _run(path, x, classes)
    names = ["blocks.2.norm1", "blocks.0.attn.attn_drop", "blocks.1.attn.attn_drop", "blocks.2.attn.attn_drop"]
    logits, selected, acts, grads = _autograd(vit_model, names, x, classes)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["onnxcam_selected"], selected.numpy())
    outputs = [("onnxcam_activation_0", "onnxcam_gradient_0")] + [
        (f"onnxcam_attention_{i}", f"onnxcam_attention_gradient_{i}") for i in range(3)]
    errors = []
    for (act_name, grad_name), act, grad in zip(outputs, acts, grads):
        _close(out[act_name], act)
        assert np.abs(out[grad_name]).max() > 0
        errors.append(_close(out[grad_name], grad))
    print(f"ViT largest relative gradient error: {max(errors):.2e}")


def test_tanh_gelu_gradients_match_autograd(tmp_path):
    """GELU's tanh form, which the exporter writes as opset 20's Gelu(approximate="tanh")."""
    model = vit(gelu="tanh")
    names = ["blocks.0.norm1", "blocks.2.norm1"]
    spec = export_torch(model, tmp_path / "vit.onnx", input_shape=(3, 32, 32), layers=names)
    x, classes = _inputs(9), [-1, 2, 4]
    out = _run(tmp_path / "vit.onnx", x, classes)
    _, _, _, grads = _autograd(model, names, x, classes)
    for name, grad in zip(spec.gradients, grads):
        _close(out[name], grad)


def test_swin_gradients_match_autograd(swin_onnx):
    path, spec = swin_onnx
    assert spec.layouts == ["nhwc", "nhwc"] and spec.attentions == []  # windowed, no CLS: no rollout
    model = swin()
    x, classes = _inputs(1), [-1, 2, 3]
    out = _run(path, x, classes)
    logits, selected, acts, grads = _autograd(model, ["layers.1.blocks.1.norm1", "norm"], x, classes)
    np.testing.assert_array_equal(out["onnxcam_selected"], selected.numpy())
    errors = []
    for i, (act, grad) in enumerate(zip(acts, grads)):
        _close(out[f"onnxcam_activation_{i}"], act)
        errors.append(_close(out[f"onnxcam_gradient_{i}"], grad))
    print(f"Swin largest relative gradient error: {max(errors):.2e}")


def reference_rollout(attentions, discard_ratio, head_fusion="mean", gradients=None, prefix=1):
    """Rollout from the definitions, in torch: fuse heads, drop the weakest entries except the attention
    paid to the CLS token (column 0), (A + I) / 2, row-normalise, multiply; CLS row over patches / max."""
    result = None
    for i, attention in enumerate(attentions):
        if gradients is None:
            fused = getattr(attention, head_fusion)(dim=1)
            fused = fused.values if head_fusion != "mean" else fused
        else:
            fused = (attention * gradients[i]).clamp(min=0).mean(dim=1)
        batch, tokens, _ = fused.shape
        flat = fused.reshape(batch, -1).clone()
        count = int(tokens * tokens * discard_ratio)
        for b in range(batch):
            lowest = torch.sort(flat[b], stable=True).indices[:count]
            lowest = lowest[lowest % tokens != 0]
            flat[b, lowest] = 0
        a = (flat.reshape(batch, tokens, tokens) + torch.eye(tokens)) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    mask = result[:, 0, prefix:]
    side = int(mask.shape[1] ** 0.5)
    mask = mask.reshape(-1, side, side)
    return mask / mask.amax(dim=(1, 2), keepdim=True)


@pytest.mark.parametrize("head_fusion, discard_ratio", [("mean", 0.9), ("max", 0.5), ("min", 0.0)])
def test_rollout_matches_reference(vit_model, vit_onnx, head_fusion, discard_ratio):
    path, spec = vit_onnx
    x = _inputs(2)
    out = _run(path, x, [-1] * BATCH)
    attentions = [out[name] for name in spec.attentions]
    _, _, acts, _ = _autograd(vit_model, [f"blocks.{i}.attn.attn_drop" for i in range(3)], x, [-1] * BATCH)
    expected = reference_rollout([a.double() for a in acts], discard_ratio, head_fusion)
    got = rollout(attentions, 1, (4, 4), head_fusion, discard_ratio)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    heat = onnxcam.Explainer(path, provider="cpu").explain(x.numpy(), method="rollout", head_fusion=head_fusion,
                                                           discard_ratio=discard_ratio).heatmaps
    up = F.interpolate(expected[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(heat, ((up - low) / (up.amax(dim=(1, 2), keepdim=True) - low)).numpy(), atol=1e-4)


def test_grad_rollout_matches_reference(vit_model, vit_onnx):
    path, spec = vit_onnx
    x, classes = _inputs(3), [1, -1, 4]
    out = _run(path, x, classes)
    names = [f"blocks.{i}.attn.attn_drop" for i in range(3)]
    _, _, acts, grads = _autograd(vit_model, names, x, classes)
    expected = reference_rollout([a.double() for a in acts], 0.9, gradients=[g.double() for g in grads])
    got = grad_rollout([out[n] for n in spec.attentions], [out[n] for n in spec.attention_gradients], 1, (4, 4), 0.9)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    result = onnxcam.Explainer(path, provider="cpu").explain(x.numpy(), method="grad-rollout", targets=classes)
    assert result.heatmaps.shape == (BATCH, 32, 32) and result.classes[0] == 1


def test_fused_attention_is_found_in_the_exported_graph(vit_onnx, tmp_path):
    """timm's default attention is one F.scaled_dot_product_attention call: no attn_drop runs, so the
    attention probabilities are the Softmax outputs of the exporter's decomposition. Same weights, same maps."""
    path, spec = vit_onnx
    fused = export_torch(vit(fused_attn=True), tmp_path / "fused.onnx", input_shape=(3, 32, 32),
                         attention_gradients=True)
    assert len(fused.attentions) == len(fused.attention_gradients) == 3
    assert fused.attention_layout == spec.attention_layout
    x, classes = _inputs(7).numpy(), [2, -1, 5]
    unfused_explainer, fused_explainer = (onnxcam.Explainer(p, provider="cpu") for p in (path, tmp_path / "fused.onnx"))
    for method in ("rollout", "grad-rollout"):
        expected = unfused_explainer.explain(x, method, targets=classes)
        got = fused_explainer.explain(x, method, targets=classes)
        np.testing.assert_allclose(got.heatmaps, expected.heatmaps, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "eigencam"])
def test_cam_family_on_vit_tokens(vit_model, vit_onnx, method):
    """pytorch-grad-cam's reshape_transform, by hand: drop CLS, tokens to a 4 x 4 grid, channels first."""
    path, _ = vit_onnx
    x, classes = _inputs(4), [-1, 3, 0]
    _, _, (act,), (grad,) = _autograd(vit_model, ["blocks.2.norm1"], x, classes)
    grid = lambda t: t[:, 1:].reshape(BATCH, 4, 4, -1).permute(0, 3, 1, 2).double()  # noqa: E731
    cam = reference_cam(method, grid(act), grid(grad))
    up = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    heat = onnxcam.Explainer(path, provider="cpu").explain(x.numpy(), method=method, targets=classes).heatmaps
    np.testing.assert_allclose(heat, ((up - low) / (high - low)).numpy(), atol=2e-4)


def test_swin_channels_last_gradcam(swin_onnx):
    path, _ = swin_onnx
    result = onnxcam.Explainer(path, provider="cpu").explain(_inputs(5).numpy(), method="gradcam")
    assert result.heatmaps.shape == (BATCH, 32, 32) and np.isfinite(result.heatmaps).all()
    with pytest.raises(onnxcam.ExplainError, match="rollout needs attention probabilities"):
        onnxcam.Explainer(path, provider="cpu").explain(_inputs(5).numpy(), method="rollout")


def test_distillation_tokens_are_found_from_the_image_grid(tmp_path):
    """DeiT puts two tokens before the patches: 18 tokens are 2 + a 4 x 4 grid over the 32 x 32 image, and the
    override says the same. A layout that fits no grid over the image is refused."""
    model = deit()
    guessed = export_torch(model, tmp_path / "guessed.onnx", input_shape=(3, 32, 32), layers=["blocks.2.norm1"])
    assert guessed.layouts == ["tokens:2:4x4"]
    assert default_layer(model, (3, 32, 32)) == "blocks.2.norm1"  # not the 18 x 18 attention, an 18 x 18 "map"
    with pytest.raises(ExportError, match="layout tokens:1:4x4 does not fit an activation of shape"):
        export_torch(model, tmp_path / "deit.onnx", input_shape=(3, 32, 32), layers=["blocks.2.norm1"],
                     layouts=["tokens:1:4x4"])
    spec = export_torch(model, tmp_path / "deit.onnx", input_shape=(3, 32, 32), layers=["blocks.2.norm1"],
                        layouts=["tokens:2:4x4"])
    assert spec.attention_layout == "tokens:2:4x4" and len(spec.attentions) == 3
    assert spec.attention_gradients == []  # opt-in: they cost a backward pass through every block
    with pytest.raises(onnxcam.ExplainError, match="grad-rollout needs the attention gradients"):
        onnxcam.Explainer(tmp_path / "deit.onnx", provider="cpu").explain(_inputs(6).numpy(), method="grad-rollout")
    x = _inputs(6)
    result = onnxcam.Explainer(tmp_path / "deit.onnx", provider="cpu").explain(x.numpy(), method="rollout")
    _, _, acts, _ = _autograd(model, [f"blocks.{i}.attn.attn_drop" for i in range(3)], x, [-1] * BATCH)
    expected = reference_rollout([a.double() for a in acts], 0.9, prefix=2)
    up = F.interpolate(expected[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(result.heatmaps, ((up - low) / (up.amax(dim=(1, 2), keepdim=True) - low)).numpy(),
                               atol=1e-4)
