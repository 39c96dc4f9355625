"""A U-Net (tests/support/dense.py), a segmenter of issue 19: its decoder upsamples with ConvTranspose and joins the
encoder's maps through Concat, and its output is N x K x H x W.

Exported with no layer named, by export_torch and by PyTorch's TorchScript exporter followed by export_onnx, it is
explained at batch 3 (the exports trace batch 2) through the public API with a Segmentation target, and the maps
match pytorch-grad-cam's GradCAM with SemanticSegmentationTarget on the same weights, at the layer onnxcam chose
(found as the module whose output equals the file's activation), with the same mask. onnxcam's default layer lies
after the last ConvTranspose, so the ConvTranspose rule is checked by a map at the bottleneck, whose gradient flows
back through both upsamplings and the skip joins, and by the gradients of the exported graph against autograd at
targets before, between and after them. Each runs for the usual 2x2 stride-2 upsampling and for a 3x3 one with
padding 1 and output_padding 1. The images are seeded, so the ReLU inputs and max-pool windows near a kink, which
could tip the two runtimes apart (see tests/test_zoo_gradients.py), are the same on every run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.anchors import min_max, module_computing
from support.dense import unet
from support.torch_export import legacy_export
from support.torchvision_shim import import_torchvision

import onnxcam
from onnxcam.exporters import export_onnx, export_torch
from onnxcam.targets import Segmentation

BATCH, SIZE = 3, 64  # the exports trace batch 2
KERNELS = {"stride2_kernel2": 2, "stride2_kernel3_output_padding": 3}
TOLERANCE = 1e-3  # the largest |difference| of two min-max scaled maps
MIN_SEGMENT = 16  # pixels: the class explained covers at least this many in every image


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _explainable(model: torch.nn.Module, exporter: str, directory, layer: str | None = None) -> onnxcam.Explainer:
    """The model made explainable by `exporter`, with no target named where `layer` is None (a module name for
    export_torch, for TorchScript the name that exporter gives the module's output)."""
    path = directory / f"{exporter}.explain.onnx"
    if exporter == "export_torch":
        export_torch(model, path, input_shape=(3, SIZE, SIZE), layers=[layer] if layer else None)
    else:
        plain = legacy_export(model, directory / "plain.onnx", (3, SIZE, SIZE))
        export_onnx(plain, path, layers=[layer] if layer else None)
    return onnxcam.Explainer(path, provider="cpu")


def _segment_class(labels: torch.Tensor) -> int:
    """The class with the smallest total area among those predicted at MIN_SEGMENT pixels or more in every image."""
    counts = torch.stack([torch.bincount(image.flatten(), minlength=4) for image in labels])
    present = [c for c in range(counts.shape[1]) if counts[:, c].min() >= MIN_SEGMENT]
    assert present, f"no class covers {MIN_SEGMENT} pixels of every image: {counts.tolist()}"
    return min(present, key=lambda c: int(counts[:, c].sum()))


def _compare_with_pytorch_grad_cam(model: torch.nn.Module, explainer: onnxcam.Explainer, layer: str | None = None):
    """onnxcam's Grad-CAM of the smallest segment against pytorch-grad-cam's at the same module (by default the
    one whose output is the file's activation); returns the module and the largest |difference|."""
    import_torchvision()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    x = _images()
    spec = explainer.spec
    if layer is None:
        (activation,) = explainer.session.run([spec.activations[0]], {spec.input: x.numpy(),
                                                                        spec.class_input: np.full(BATCH, -1)})
        layer = module_computing(model, x, activation)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(1)
    segment = _segment_class(labels)
    result = explainer.explain(x.numpy(), "gradcam", targets=Segmentation(segment))
    # onnxcam's default mask is the segment's argmax pixels; off near ties it is PyTorch's too
    top = logits.topk(2, dim=1).values
    clear = ((top[:, 0] - top[:, 1]) > 1e-4 * float(logits.abs().max())).numpy()
    np.testing.assert_array_equal(result.masks[clear], (labels == segment).numpy()[clear])
    # SemanticSegmentationTarget: (model_output[category, :, :] * mask).sum(), with onnxcam's very masks
    targets = [SemanticSegmentationTarget(segment, mask.astype(np.float32)) for mask in result.masks]
    with GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        expected = cam(input_tensor=x, targets=targets)
    assert result.heatmaps.shape == expected.shape == (BATCH, SIZE, SIZE)
    assert all(np.ptp(m) > 0 for m in expected), "a flat reference map would make the comparison vacuous"
    return layer, float(np.abs(min_max(result.heatmaps) - min_max(expected)).max())


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS)
@pytest.mark.parametrize("exporter", ["export_torch", "torchscript"])
def test_unet_explained_with_no_names_matches_pytorch_grad_cam(exporter: str, kernel: int, tmp_path):
    model = unet(kernel, SIZE)
    explainer = _explainable(model, exporter, tmp_path)
    layer, difference = _compare_with_pytorch_grad_cam(model, explainer)
    print(f"\n{exporter}, kernel {kernel}: default layer {explainer.spec.layers[0]} (module {layer}), "
          f"max |difference| {difference:.1e}", end="")
    assert difference < TOLERANCE


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS)
def test_unet_map_through_the_decoder_matches_pytorch_grad_cam(kernel: int, tmp_path):
    """The bottleneck's map: its gradient comes back through both ConvTransposes and the skip joins."""
    model = unet(kernel, SIZE)
    explainer = _explainable(model, "torchscript", tmp_path, layer="/down2/down2.5/Relu_output_0")
    _, difference = _compare_with_pytorch_grad_cam(model, explainer, layer="down2")
    print(f"\nkernel {kernel}: bottleneck map, max |difference| {difference:.1e}", end="")
    assert difference < TOLERANCE


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS)
def test_unet_gradients_match_autograd(kernel: int, tmp_path):
    """The exported graph's activations and gradients at the first encoder stage (every path: pooling, both
    upsamplings, both skips), the bottleneck and the first decoder stage, against torch.autograd.grad of the
    selected output cell (the top-1 cell, then two chosen ones), at batch 3."""
    layers = ["inc", "down2", "up1"]
    model = unet(kernel, SIZE)
    spec = export_torch(model, tmp_path / "unet.onnx", input_shape=(3, SIZE, SIZE), layers=layers)
    explainer = onnxcam.Explainer(tmp_path / "unet.onnx", provider="cpu")
    x = _images(2)
    cells = np.array([-1, 1 * SIZE * SIZE + 5 * SIZE + 7, spec.num_classes - 1], np.int64)
    names = [spec.selected, *spec.activations, *spec.gradients]
    selected, *exported = explainer.session.run(names, {spec.input: x.numpy(), spec.class_input: cells})

    captured = {}
    handles = [model.get_submodule(layer).register_forward_hook(
        lambda m, i, o, layer=layer: captured.__setitem__(layer, o)) for layer in layers]
    try:
        flat = model(x).reshape(BATCH, -1)
    finally:
        for handle in handles:
            handle.remove()
    chosen = torch.where(torch.from_numpy(cells) < 0, flat.argmax(1), torch.from_numpy(cells))
    np.testing.assert_array_equal(selected, chosen.numpy())
    gradients = torch.autograd.grad(flat.gather(1, chosen[:, None]).sum(), [captured[layer] for layer in layers])
    references = [captured[layer].detach().numpy() for layer in layers] + [g.numpy() for g in gradients]
    errors = []
    for what, actual, expected in zip([f"activation of {layer}" for layer in layers] +
                                      [f"gradient of {layer}" for layer in layers], exported, references, strict=True):
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        scales = np.abs(expected).reshape(BATCH, -1).max(1)
        assert scales.min() > 0, f"{what} is zero for an image: the check would be vacuous"
        errors.append(float(np.abs(actual - expected).max() / scales.max()))
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scales.max(), err_msg=what)
    print(f"\nkernel {kernel}: max relative gradient error {max(errors[len(layers):]):.1e}", end="")
