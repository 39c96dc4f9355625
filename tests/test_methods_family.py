"""The rest of the family (issue 12), through the whole Explainer path, against independent references: plain
PyTorch written from each paper or library definition (hooks, autograd, masked forward passes), and captum itself
for the input-gradient attributions where it installs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_net
from torch import nn

import onnxcam
from onnxcam.core.methods import first_principal_component
from onnxcam.targets import Classes, Contrast

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
CLASSES = [-1, 0, 4]


@pytest.fixture(scope="module")
def model():
    return small_net()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("family") / "plain.onnx"
    onnxcam.exporters.export_torch(model, path, input_shape=(3, 32, 32), layers=["features.8"])
    return onnxcam.Explainer(path, provider="cpu")


@pytest.fixture(scope="module")
def gradients_file(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("family") / "input-gradients.onnx"
    onnxcam.exporters.export_torch(model, path, input_shape=(3, 32, 32), layers=["features.8"],
                                   mean=[0.5] * 3, std=[0.25] * 3, input_gradients=True)
    return onnxcam.Explainer(path, provider="cpu")


def _post(cam: torch.Tensor, size=(32, 32)) -> np.ndarray:
    """Bilinear upsampling and per-image min-max scaling, as every CAM library draws its maps."""
    cam = F.interpolate(cam.double()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    spread = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(spread > 0, (cam - low) / torch.where(spread > 0, spread, 1), (cam > 0).double()).numpy()


def _hooked(model, x, layer="features.8", classes=CLASSES):
    """(scores, activation, gradient of the selected scores w.r.t. the activation, selected classes)."""
    kept = {}

    def hook(module, args, output):
        kept["A"] = output
        output.register_hook(lambda grad: kept.__setitem__("G", grad))

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        scores = model(x)
        selected = torch.where(torch.as_tensor(classes) < 0, scores.argmax(1), torch.as_tensor(classes))
        scores.gather(1, selected[:, None]).sum().backward()
    finally:
        handle.remove()
    return scores.detach(), kept["A"].detach(), kept["G"], selected


def test_cam_uses_the_linear_weights_after_pooling(plain, model):
    result = plain.explain(X.numpy(), method="cam", targets=CLASSES)
    _, A, _, selected = _hooked(model, X.clone())
    expected = _post(torch.relu(torch.einsum("bk,bkhw->bhw", model.fc.weight[selected].detach(), A)))
    np.testing.assert_array_equal(result.classes, selected.numpy())
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)


class TwoLayerHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = small_net().features
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.features(x))


def test_cam_refuses_a_head_that_is_not_pooling_then_linear(tmp_path):
    path = tmp_path / "deep-head.onnx"
    onnxcam.exporters.export_torch(TwoLayerHead().eval(), path, input_shape=(3, 32, 32), layers=["features.8"])
    explainer = onnxcam.Explainer(path, provider="cpu")
    with pytest.raises(onnxcam.ExplainError, match="cam needs global average pooling"):
        explainer.explain(X.numpy(), method="cam")
    assert explainer.capabilities()["cam"].startswith("cam needs")


def _fem_reference(A: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """pytorch-grad-cam's FEM: k-sigma masks, their spatial means as weights (numpy's population std)."""
    mean = A.mean(dim=(2, 3), keepdim=True)
    std = A.std(dim=(2, 3), keepdim=True, unbiased=False)
    weights = (mean + k * std < A).double().mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * A.double()).sum(1))


def test_fem_and_kpcacam_match_their_definitions(plain, model):
    _, A, _, _ = _hooked(model, X.clone())
    fem = plain.explain(X.numpy(), method="fem", targets=CLASSES)
    np.testing.assert_allclose(fem.heatmaps, _post(_fem_reference(A)), atol=2e-4)
    KernelPCA = pytest.importorskip("sklearn.decomposition").KernelPCA  # the family extra

    rows = A.double().flatten(2).transpose(1, 2).numpy()
    projections = [KernelPCA(n_components=1, kernel="sigmoid").fit_transform(r - r.mean(axis=0))[:, 0] for r in rows]
    expected = _post(torch.relu(torch.from_numpy(np.stack(projections)).reshape(3, *A.shape[2:])))
    kpca = plain.explain(X.numpy(), method="kpcacam", targets=CLASSES)
    np.testing.assert_allclose(kpca.heatmaps, expected, atol=2e-3)


def _score_reference(model, x, method: str, channels=None, samples: int = 1) -> np.ndarray:
    """torchcam's Score-CAM and IS-CAM: per-channel min-max scaled, upsampled activations as masks; weights the
    softmax over channels of the mean change of the class logit against the unmasked input."""
    scores, A, _, selected = _hooked(model, x.clone())
    low = A.amin(dim=(2, 3), keepdim=True)
    masks = (A - low) / ((A - low).amax(dim=(2, 3), keepdim=True) + 1e-8)
    masks = F.interpolate(masks, size=x.shape[2:], mode="bilinear", align_corners=False)
    weights = torch.zeros(A.shape[:2], dtype=torch.float64)
    with torch.no_grad():
        for b in range(len(x)):
            kept = torch.arange(A.shape[1]) if channels is None else A[b].mean(dim=(1, 2)).argsort(descending=True)[
                :channels]
            change = torch.zeros(len(kept), dtype=torch.float64)
            coefficient = 0.0
            for sample in range(samples):
                coefficient += (sample + 1) / samples
                scale = coefficient if method == "iscam" else 1.0
                logits = model(scale * masks[b, kept, None] * x[b][None])
                change += (logits[:, selected[b]] - scores[b, selected[b]]).double()
            weights[b, kept] = torch.softmax(change / samples, dim=0)
    return _post(torch.relu(torch.einsum("bk,bkhw->bhw", weights, A.double())))


@pytest.mark.parametrize(("method", "options"), [("scorecam", {}), ("scorecam", {"channels": 5}),
                                                  ("iscam", {"samples": 3})])
def test_score_cams_match_torchcam_definitions(plain, model, method, options):
    result = plain.explain(X.numpy(), method=method, targets=CLASSES, batch_size=7, **options)
    expected = _score_reference(model, X, method, options.get("channels"), options.get("samples", 1))
    np.testing.assert_allclose(result.heatmaps, expected, atol=5e-4)


def test_sscam_without_noise_is_scorecam_and_with_noise_differs(plain):
    score = plain.explain(X.numpy(), method="scorecam", targets=CLASSES).heatmaps
    quiet = plain.explain(X.numpy(), method="sscam", targets=CLASSES, samples=2, noise=0.0).heatmaps
    noisy = plain.explain(X.numpy(), method="sscam", targets=CLASSES, samples=2, noise=2.0).heatmaps
    np.testing.assert_allclose(quiet, score, atol=1e-5)
    assert np.abs(noisy - score).max() > 1e-3 and np.isfinite(noisy).all()


def test_ablationcam_matches_full_network_ablation(plain, model):
    """pytorch-grad-cam's definition, with the whole network run per ablated channel as that library does."""
    scores, A, _, selected = _hooked(model, X.clone())
    ablated = torch.zeros(A.shape[:2])
    layer = model.get_submodule("features.8")
    with torch.no_grad():
        for b in range(len(X)):
            for k in range(A.shape[1]):
                value = 0.0 if A[b].min() == 0 else float(A[b].min()) - 1e7

                def replace(module, args, output, b=b, k=k, value=value):
                    output = A[b:b + 1].clone()
                    output[:, k] = value
                    return output

                handle = layer.register_forward_hook(replace)
                ablated[b, k] = model(X[b:b + 1])[0, selected[b]]
                handle.remove()
    original = scores[torch.arange(3), selected]
    weights = (original[:, None] - ablated) / original[:, None]
    expected = _post(torch.relu(torch.einsum("bk,bkhw->bhw", weights.double(), A.double())))
    result = plain.explain(X.numpy(), method="ablationcam", targets=CLASSES, batch_size=5)
    np.testing.assert_allclose(result.heatmaps, expected, atol=5e-4)


def _reference_gradcam(model, x, classes=CLASSES):
    """Grad-CAM's weighted activations alpha_k A^k (B x K x h x w) and the classes explained."""
    _, A, G, selected = _hooked(model, x.clone(), classes=classes)
    weights_of = lambda A, G: G.mean(dim=(2, 3))  # noqa: E731
    return torch.einsum("bk,bkhw->bkhw", weights_of(A, G), A).double(), selected


def test_eigen_smooth_projects_the_weighted_activations(plain, model):
    weighted, _ = _reference_gradcam(model, X)
    rows = weighted.flatten(2).transpose(1, 2)
    centred = rows - rows.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None])[..., 0]
    peak = projection.gather(1, projection.abs().argmax(dim=1, keepdim=True))
    projection = (projection * torch.where(peak < 0, -1.0, 1.0)).reshape(3, *weighted.shape[2:])
    result = plain.explain(X.numpy(), method="gradcam", targets=CLASSES, eigen_smooth=True)
    np.testing.assert_allclose(result.heatmaps, _post(torch.relu(projection)), atol=2e-4)
    core = first_principal_component(weighted.numpy())  # the core's own projection, unscaled, agrees too
    np.testing.assert_allclose(core, projection.numpy(), rtol=1e-6, atol=1e-9)


def test_aug_smooth_averages_six_augmented_maps_from_one_run(plain, model):
    """pytorch-grad-cam's aug_smooth: flip x intensity 0.9/1/1.1, each copy's own top-1, flipped back, averaged."""
    maps = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            x = (X.flip(-1) if flip else X) * factor
            heat = _post(torch.relu(_reference_gradcam(model, x, classes=[-1, -1, -1])[0].sum(1)))
            maps.append(heat[..., ::-1] if flip else heat)
    runs = []
    original = plain.model.runner.run
    plain.model.runner.run = lambda names, feeds: runs.append(len(feeds[plain.spec.input])) or original(names, feeds)
    try:
        result = plain.explain(X.numpy(), method="gradcam", aug_smooth=True)
    finally:
        plain.model.runner.run = original
    assert runs == [18]  # one session run of the 6 x 3 copies
    np.testing.assert_allclose(result.heatmaps, np.mean(maps, axis=0), atol=2e-4)


def test_refinecam_multiplies_the_layer_maps(tmp_path, model):
    """pytorch-grad-cam's RefineCAM over Grad-CAM++: the product of the per-layer maps, scaled again."""
    from test_methods import reference_cam

    path = tmp_path / "two.onnx"
    onnxcam.exporters.export_torch(model, path, input_shape=(3, 32, 32), layers=["features.6", "features.8"])
    explainer = onnxcam.Explainer(path, provider="cpu")
    single = []
    for layer in ("features.6", "features.8"):
        _, A, G, _ = _hooked(model, X.clone(), layer=layer)
        single.append(_post(reference_cam("gradcam++", A.double(), G.double())))
    product = single[0] * single[1]
    expected = _post(torch.from_numpy(product), size=product.shape[1:])
    result = explainer.explain(X.numpy(), method="refinecam", targets=CLASSES)
    np.testing.assert_allclose(result.heatmaps, expected, atol=2e-4)


def _input_gradient(model, x, classes, guided=False):
    x = x.clone().requires_grad_()
    handles = []
    if guided:  # Springenberg et al.: ReLU passes positive gradients at positive inputs only
        handles = [m.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(min=0),))
                   for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        scores = model(x)
        scores.gather(1, torch.as_tensor(classes)[:, None]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return x.grad.detach().numpy()


def test_guided_backprop_and_guided_gradcam(gradients_file, model):
    guided = gradients_file.explain(X.numpy(), method="guided-backprop", targets=CLASSES)
    selected = guided.classes
    expected = _input_gradient(model, X, selected, guided=True)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(guided.attributions, expected, atol=1e-4 * scale)
    assert not np.allclose(expected, _input_gradient(model, X, selected), atol=1e-4 * scale)
    weighted, _ = _reference_gradcam(model, X)
    cam = _post(torch.relu(weighted.sum(1)))
    both = gradients_file.explain(X.numpy(), method="guided-gradcam", targets=CLASSES)
    np.testing.assert_allclose(both.attributions, expected * cam[:, None], atol=1e-4 * scale)
    plain = gradients_file.explain(X.numpy(), method="gradcam", targets=CLASSES)  # the switch is off by default
    np.testing.assert_allclose(plain.heatmaps, cam, atol=2e-4)


def test_saliency_smoothgrad_integrated_gradients_match_captum(gradients_file, model):
    captum = pytest.importorskip("captum.attr")
    selected = gradients_file.explain(X.numpy(), method="gradcam", targets=CLASSES).classes
    target = torch.as_tensor(selected)
    saliency = gradients_file.explain(X.numpy(), method="saliency", targets=CLASSES)
    expected = captum.Saliency(model).attribute(X.clone(), target=target).numpy()
    np.testing.assert_allclose(saliency.attributions, expected, rtol=1e-4, atol=1e-7)
    black = torch.full((1, 3, 1, 1), -0.5 / 0.25).expand_as(X)
    for rule in ("gausslegendre", "riemann_trapezoid"):
        result = gradients_file.explain(X.numpy(), method="integrated-gradients", targets=CLASSES, steps=16,
                                        integration=rule)
        expected = captum.IntegratedGradients(model).attribute(X.clone(), baselines=black, target=target,
                                                               n_steps=16, method=rule).detach().numpy()
        np.testing.assert_allclose(result.attributions, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())
    smooth = gradients_file.explain(X.numpy(), method="smoothgrad", targets=CLASSES, samples=4, noise=0.5, seed=3)
    rng = np.random.default_rng(3)
    noisy = [X[b:b + 1].numpy().repeat(4, 0) + rng.normal(0, 0.5, (4, 3, 32, 32)) for b in range(3)]
    expected = np.stack([np.abs(_input_gradient(model, torch.from_numpy(n).float(), [c] * 4)).mean(0)
                         for n, c in zip(noisy, selected, strict=True)])
    np.testing.assert_allclose(smooth.attributions, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())


def test_attribution_heatmap_is_captums_absolute_value_heat_map(gradients_file):
    viz = pytest.importorskip("captum.attr._utils.visualization")
    result = gradients_file.explain(X.numpy(), method="saliency", targets=CLASSES)
    for attributions, heatmap in zip(result.attributions, result.heatmaps, strict=True):
        expected = viz._normalize_attr(attributions.sum(axis=0), "absolute_value", 2)  # captum sums channels
        np.testing.assert_allclose(heatmap, expected, atol=1e-6)


def test_input_gradient_methods_refuse_files_without_them(plain):
    for method in ("saliency", "guided-gradcam", "integrated-gradients"):
        with pytest.raises(onnxcam.ExplainError, match="exported on request") as caught:
            plain.explain(X.numpy(), method=method)
        assert caught.value.option == "input_gradients"
    reasons = plain.capabilities()
    assert reasons["gradcam"] is None and reasons["cam"] is None and "input gradients" in reasons["saliency"]


@pytest.mark.parametrize("method, options", [("scorecam", {}), ("ablationcam", {}), ("gradcam", {"eigen_smooth": True}),
                                             ("integrated-gradients", {})])
def test_classes_targets_give_one_map_per_class_as_single_class_runs_do(gradients_file, model, method, options):
    """Classes(top=2) and Classes(above=p) on the family: each image's classes as PyTorch ranks them, each map
    the map of a run asked for that class alone; other target objects are refused in one line."""
    with torch.no_grad():
        top2 = torch.argsort(model(X), dim=1, descending=True)[:, :2].numpy()
    result = gradients_file.explain(X.numpy(), method, targets=Classes(top=2), **options)
    np.testing.assert_array_equal(result.image_index, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(result.classes, top2.reshape(-1))
    assert result.heatmaps.shape == (6, 32, 32) and result.logits.shape == (3, 5)
    for image, target, heatmap in zip(result.image_index, result.classes, result.heatmaps, strict=True):
        alone = gradients_file.explain(X.numpy()[image:image + 1], method, targets=int(target), **options)
        np.testing.assert_allclose(heatmap, alone.heatmaps[0], atol=1e-5)
    mixed = gradients_file.explain(X.numpy(), method, targets=[Classes(top=1), 3, Classes(above=1.0)], **options)
    np.testing.assert_array_equal(mixed.image_index, [0, 1])
    np.testing.assert_array_equal(mixed.classes, [top2[0, 0], 3])
    with pytest.raises(onnxcam.ExplainError, match="not other target objects"):
        gradients_file.explain(X.numpy(), method, targets=Contrast(0), **options)


def test_unknown_options_are_refused(plain):
    with pytest.raises(onnxcam.ExplainError, match="method scorecam has no option 'steps'"):
        plain.explain(X.numpy(), method="scorecam", steps=3)
    with pytest.raises(onnxcam.ExplainError, match="aug_smooth applies to the single-run CAMs"):
        plain.explain(X.numpy(), method="scorecam", aug_smooth=True)
    with pytest.raises(onnxcam.ExplainError, match="eigen_smooth applies to the CAMs .*, not to rollout"):
        plain.explain(X.numpy(), method="rollout", eigen_smooth=True)


def _dense_imputation(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """ROAD's linear imputation written from the paper's equation, solved densely: every removed pixel equals the
    weighted mean of its in-image neighbours (1/6 sides, 1/12 corners)."""
    height, width = keep.shape
    weights = {(dy, dx): (1 / 12 if dy and dx else 1 / 6) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}
    missing = [(y, x) for y in range(height) for x in range(width) if not keep[y, x]]
    index = {pixel: i for i, pixel in enumerate(missing)}
    system = np.zeros((len(missing), len(missing)))
    rhs = np.zeros((len(missing), image.shape[0]))
    for i, (y, x) in enumerate(missing):
        for (dy, dx), weight in weights.items():
            if 0 <= y + dy < height and 0 <= x + dx < width:
                system[i, i] -= weight
                if (y + dy, x + dx) in index:
                    system[i, index[(y + dy, x + dx)]] += weight
                else:
                    rhs[i] -= weight * image[:, y + dy, x + dx]
    out = image.astype(np.float64).copy()
    solved = np.linalg.solve(system, rhs)
    for i, (y, x) in enumerate(missing):
        out[:, y, x] = solved[i]
    return out


def test_road_and_confidence_change_follow_their_definitions():
    from onnxcam.core.metrics import confidence_change, noisy_linear_imputation, road

    rng = np.random.default_rng(5)
    images = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    maps = rng.random((2, 9, 11)).astype(np.float32)
    keep = maps[0] < 0.6
    np.testing.assert_allclose(noisy_linear_imputation(images[0], keep, noise=0.0),
                               _dense_imputation(images[0], keep), atol=1e-5)
    weights = rng.standard_normal((3, 4))

    def predict(batch):
        logits = batch.mean(axis=(2, 3)) @ weights
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    classes = np.array([1, 3])
    morf, lerf = road(predict, images, maps, classes, percentiles=(30, 70), noise=0.0)
    for b in range(2):
        before = predict(images[b:b + 1])[0, classes[b]]
        for got, relevance in ((morf[b], maps[b]), (lerf[b], 1 - maps[b])):
            imputed = [_dense_imputation(images[b], relevance < np.percentile(relevance, p)) for p in (30, 70)]
            changes = predict(np.stack(imputed))[:, classes[b]] - before
            assert got == pytest.approx(np.mean(changes), abs=1e-5)
    expected = predict(images * maps[:, None])[[0, 1], classes] - predict(images)[[0, 1], classes]
    np.testing.assert_allclose(confidence_change(predict, images, maps, classes), expected, rtol=1e-6)


class BiasFreeConvNet(nn.Module):
    """Conv without bias before each BatchNorm (as ResNets are built), and one Conv with a bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 5)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _scaled(terms: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image per (image, channel): minus the minimum, over the maximum + 1e-7."""
    shifted = terms - terms.amin(dim=(-2, -1), keepdim=True)
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + 1e-7)


def test_fullgrad_matches_its_definition(tmp_path):
    """FullGrad as pytorch-grad-cam computes it: |x dy/dx| and |b dy/dz| of every Conv2d with a bias and every
    BatchNorm2d, each channel scaled then resized to the input, summed, scaled."""
    model = BiasFreeConvNet().eval()
    path = tmp_path / "fullgrad.onnx"
    onnxcam.exporters.export_torch(model, path, input_shape=(3, 32, 32), layers=["features.8"],
                                   input_gradients=True)
    result = onnxcam.Explainer(path, provider="cpu").explain(X.numpy(), method="fullgrad", targets=CLASSES)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
              or isinstance(m, nn.Conv2d) and m.bias is not None]
    kept = {}

    def keep(module, args, output):
        output.register_hook(lambda grad: kept.__setitem__(module, grad))

    handles = [layer.register_forward_hook(keep) for layer in layers]
    x = X.clone().double().requires_grad_()
    model.double()
    scores = model(x)
    for handle in handles:
        handle.remove()
    scores.gather(1, torch.as_tensor(result.classes)[:, None]).sum().backward()
    total = _scaled((x.grad * x).abs().detach()).sum(1)
    for layer in layers:
        bias = layer.bias if isinstance(layer, nn.Conv2d) else \
            layer.bias - layer.running_mean * layer.weight / torch.sqrt(layer.running_var + layer.eps)
        terms = _scaled((bias[None, :, None, None] * kept[layer]).abs().detach())
        total = total + F.interpolate(terms, size=(32, 32), mode="bilinear", align_corners=False).sum(1)
    np.testing.assert_allclose(result.heatmaps, _scaled(total).numpy(), atol=2e-4)


def test_cli_offers_the_family_and_refuses_in_one_line(tmp_path, plain):
    import cv2
    from conftest import random_images, run_cli

    image = tmp_path / "image.png"
    cv2.imwrite(str(image), random_images(1)[0])
    model = plain.model.path
    done = run_cli("explain", model, image, "-o", tmp_path / "out", "--method", "cam")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "predictions.json").exists()
    refused = run_cli("explain", model, image, "-o", tmp_path / "refused", "--method", "saliency")
    assert refused.returncode == 1
    assert "exported on request (set --input-gradients)" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("method", ["cam", "scorecam", "iscam"])
def test_cams_match_torchcam_itself(plain, model, method):
    """The anchor library on the same model: torchcam 0.5's CAM, ScoreCAM and ISCAM (its maps are computed at the
    layer's resolution and min-max scaled; scaled again after upsampling they are comparable). torchcam's CAM
    skips the final ReLU that every onnxcam map (and pytorch-grad-cam's) goes through: it is switched on."""
    methods = pytest.importorskip("torchcam.methods")
    selected = plain.explain(X.numpy(), method="gradcam", targets=CLASSES).classes
    options = {"cam": {"fc_layer": "fc"}, "iscam": {"num_samples": 3, "batch_size": 7},
               "scorecam": {"batch_size": 7}}[method]
    extractor = {"cam": methods.CAM, "scorecam": methods.ScoreCAM, "iscam": methods.ISCAM}[method](
        model, "features.8", input_shape=(3, 32, 32), **options)
    extractor._relu = True
    try:
        with torch.no_grad():
            scores = model(X.clone())
            (cams,) = extractor(selected.tolist(), scores)
    finally:
        extractor.remove_hooks()
    ours = {"iscam": {"samples": 3}}.get(method, {})
    result = plain.explain(X.numpy(), method=method, targets=CLASSES, **ours)
    np.testing.assert_allclose(result.heatmaps, _post(cams), atol=5e-4)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_aug_smooth_is_flip_equivariant_in_either_layout(plain, tmp_path, layout):
    """aug_smooth averages each image with its mirror image (flipped along the width, whatever the layout), so the
    map of a mirrored image is the mirrored map, for the same class. Flipping the channels instead breaks this."""
    if layout == "nhwc":
        from onnxcam.exporters import export_onnx

        # a Keras ResNet (tf2onnx, NHWC) whose map changes when the channels are reversed
        export_onnx(Path(__file__).parent / "fixtures" / "foreign" / "keras_resnet.onnx", tmp_path / "nhwc.onnx")
        explainer = onnxcam.Explainer(tmp_path / "nhwc.onnx", provider="cpu")
        height, width = explainer.spec.input_size
        images = (np.random.default_rng(3).standard_normal((2, height, width, 3)) * 50 + 120).astype(np.float32)
        mirrored = np.ascontiguousarray(images[:, :, ::-1])
    else:
        explainer, images = plain, X.numpy()
        mirrored = np.ascontiguousarray(images[..., ::-1])
    classes = [1, 2, 3][:len(images)]
    heat = explainer.explain(images, method="gradcam", targets=classes, aug_smooth=True).heatmaps
    flipped = explainer.explain(mirrored, method="gradcam", targets=classes, aug_smooth=True).heatmaps
    np.testing.assert_allclose(flipped, heat[..., ::-1], atol=1e-4)
