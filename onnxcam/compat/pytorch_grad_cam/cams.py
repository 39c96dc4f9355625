"""pytorch-grad-cam's CAM classes on BaseCAM: each says how a layer's activations (and gradients) weigh into its map,
as its pytorch-grad-cam namesake does (the epsilons and the SVD's sign included)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...core import methods as formulas
from ...core.attribution import fullgrad_terms
from ...core.errors import ExplainError
from ...core.perturbation import ablation_weights
from .base_cam import BaseCAM, _as_batch, _classes
from .utils.image import scale_accross_batch_and_channels, scale_cam_image
from .utils.model_targets import FinerWeightedTarget
from .utils.svd_on_activations import (
    get_2d_projection,
    get_2d_projection_kernel,
    get_2d_projection_with_sign_correction,
)


class GradCAM(BaseCAM):
    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform)

    def get_cam_weights(self, input_tensor, target_layer, target_category, activations, grads):
        return formulas.gradcam_weights(activations, grads)


class GradCAMPlusPlus(GradCAM):
    def get_cam_weights(self, input_tensor, target_layers, target_category, activations, grads):
        """Grad-CAM++'s weights with pytorch-grad-cam's epsilon of 1e-6 in alpha's denominator."""
        squared = grads ** 2
        totals = activations.sum(axis=(2, 3), keepdims=True)
        alpha = np.where(grads != 0, squared / (2 * squared + totals * squared * grads + 1e-6), 0)
        return (np.maximum(grads, 0) * alpha).sum(axis=(2, 3))


class XGradCAM(GradCAM):
    def get_cam_weights(self, input_tensor, target_layer, target_category, activations, grads):
        """XGrad-CAM's weights with pytorch-grad-cam's epsilon of 1e-7 beside each channel's sum."""
        return (grads * activations / (activations.sum(axis=(2, 3), keepdims=True) + 1e-7)).sum(axis=(2, 3))


class RandomCAM(GradCAM):
    def get_cam_weights(self, input_tensor, target_layer, target_category, activations, grads):
        return np.random.uniform(-1, 1, size=(grads.shape[0], grads.shape[1]))


class _ElementWise(GradCAM):
    """A CAM whose map sums per-element terms of the activations and gradients (`terms`)."""

    @staticmethod
    def terms(activations, grads):
        raise NotImplementedError

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth=False):
        terms = self.terms(activations, grads)
        return get_2d_projection(terms) if eigen_smooth else terms.sum(axis=1)


class HiResCAM(_ElementWise):
    @staticmethod
    def terms(activations, grads):
        return grads * activations


class GradCAMElementWise(_ElementWise):
    @staticmethod
    def terms(activations, grads):
        return np.maximum(grads * activations, 0)


class LayerCAM(_ElementWise):
    @staticmethod
    def terms(activations, grads):
        return np.maximum(grads, 0) * activations


class EigenGradCAM(GradCAM):
    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth=False):
        return get_2d_projection(grads * activations)


class _Agnostic(BaseCAM):
    """A CAM of the activations alone: the file's forward part runs, without its backward pass."""

    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)


class EigenCAM(_Agnostic):
    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth=False):
        return get_2d_projection(activations)


class KPCA_CAM(_Agnostic):  # noqa: N801 - pytorch-grad-cam's name
    def __init__(self, model, target_layers, reshape_transform=None, kernel="sigmoid", gamma=None):
        super().__init__(model, target_layers, reshape_transform)
        self.kernel, self.gamma = kernel, gamma

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth=False):
        return get_2d_projection_kernel(activations, self.kernel, self.gamma)


class FEM(_Agnostic):
    def __init__(self, model, target_layers, reshape_transform=None, k=2):
        super().__init__(model, target_layers, reshape_transform)
        self.k = k

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth=False):
        return formulas.fem(activations, k=self.k)


class ScoreCAM(_Agnostic):
    """Score-CAM as pytorch-grad-cam computes it: each channel, upsampled (align_corners) and min-max scaled, masks
    the image; the softmax over channels of the targets' scores on the masked images weighs the channels. The
    masked images run through the file's forward part, `batch_size` at a time."""

    batch_size = 16

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        upsampled = F.interpolate(torch.from_numpy(activations), size=input_tensor.shape[-2:], mode="bilinear",
                                  align_corners=True).numpy()
        flat = upsampled.reshape(*upsampled.shape[:2], -1)
        low, high = flat.min(axis=-1)[..., None, None], flat.max(axis=-1)[..., None, None]
        masks = (upsampled - low) / (high - low + 1e-8)
        spec = self.explainable.spec
        runner = self.explainable.scores_runner
        scores = []
        for target, image, image_masks in zip(targets, input_tensor, masks, strict=True):
            masked = image[None] * image_masks[:, None]
            for start in range(0, len(masked), self.batch_size):
                (outputs,) = runner.run([spec.score_tensor], {spec.input: masked[start:start + self.batch_size]})
                scores.extend(_score(target, torch.from_numpy(o)) for o in outputs)
        return torch.softmax(torch.tensor(scores).view(activations.shape[:2]), dim=-1).numpy()


class AblationCAM(_Agnostic):
    """Ablation-CAM as pytorch-grad-cam computes it with its defaults (every channel of one target layer, its
    AblationLayer): each channel in turn set to 0, or below the layer's minimum where that is not 0; the weights are
    the targets' relative drops. Only the file's head, from the target layer on, runs on the ablated copies."""

    def __init__(self, model, target_layers, reshape_transform=None, ablation_layer=None, batch_size: int = 32,
                 ratio_channels_to_ablate: float = 1.0):
        custom = ablation_layer is not None and type(ablation_layer).__name__ != "AblationLayer"
        if len(target_layers) != 1 or reshape_transform is not None or ratio_channels_to_ablate != 1.0 or custom:
            raise ExplainError("onnxcam.compat's AblationCAM ablates every channel of one target layer with "
                               "pytorch-grad-cam's AblationLayer, and no reshape_transform")
        super().__init__(model, target_layers)
        self.batch_size = batch_size

    reads_cuts = True

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        model = self.explainable
        spec = model.spec
        names = [spec.activations[0], *spec.cuts]
        values = self.forward_values  # this call's forward part (BaseCAM._tensors), not run again
        original = np.float32([_score(target, output) for target, output in zip(targets, self.outputs, strict=True)])
        ablated = np.empty(activations.shape[:2], dtype=np.float32)
        for image, target in enumerate(targets):
            for start in range(0, activations.shape[1], self.batch_size):
                channels = np.arange(start, min(start + self.batch_size, activations.shape[1]))
                exposed = {name: np.repeat(values[name][image:image + 1], len(channels), axis=0) for name in names}
                copies = exposed[spec.activations[0]]
                copies[np.arange(len(channels)), channels] = _ablation_values(activations[image], len(channels))
                outputs = model.forward_head.scores(spec.score_tensor, exposed)
                ablated[image, channels] = [_score(target, torch.from_numpy(o)) for o in outputs]
        return ablation_weights(original, ablated)


def _ablation_values(activations: np.ndarray, count: int) -> np.ndarray:
    """What pytorch-grad-cam's AblationLayer writes into each of `count` copies: 0 where the layer's minimum is 0,
    else each copy 1e7 below the batch's minimum so far (the previous copy's value), in float32."""
    low = np.float32(activations.min())
    if low == 0:
        return np.zeros((count, 1, 1), dtype=np.float32)
    return (low - np.float32(1e7) * np.arange(1, count + 1, dtype=np.float32))[:, None, None]


def _score(target, output) -> float:
    with torch.no_grad():
        return float(target(output))


class FullGrad(BaseCAM):
    """FullGrad as pytorch-grad-cam computes it: |x (.) dy/dx| per input channel and, per layer with a bias, |b (.)
    dy/dz| summed over its channels, each map scaled and resized, all summed. `target_layers` are ignored (every
    bias is used); the biases are the exported graph's, where a BatchNorm after a convolution is folded into it
    (the same terms when the convolution has no bias of its own, as in ResNets). Explains classes only."""

    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, [], reshape_transform)

    def forward(self, input_tensor, targets, eigen_smooth: bool = False) -> np.ndarray:
        batch = _as_batch(input_tensor)
        model = self._model_file(batch.shape[1:], input_gradients=True)
        spec = model.spec
        classes = _classes(targets, len(batch), spec.num_classes)
        if classes is None:
            raise ExplainError("FullGrad in onnxcam.compat explains classes: ClassifierOutputTarget, or None")
        scores, _, *tensors, gradient = model.runner.run(
            [spec.scores, spec.selected, *spec.biases, *spec.bias_gradients, spec.input_gradient],
            {spec.input: batch, spec.class_input: classes})
        self.outputs = torch.from_numpy(scores)
        size = (batch.shape[-1], batch.shape[-2])
        count = len(spec.biases)
        maps = np.float32(fullgrad_terms(batch, gradient, tensors[:count], tensors[count:]))
        if eigen_smooth:
            small = scale_accross_batch_and_channels(maps, (size[0] // 8, size[1] // 8))
            maps = scale_accross_batch_and_channels(get_2d_projection(small)[:, None], size)
        return scale_cam_image(maps.sum(axis=1))


class FinerCAM:
    """Finer-CAM (arXiv 2501.11309) around a base CAM: each image's target class against the classes ranked
    `comparison_categories` by closeness of score (FinerWeightedTarget)."""

    def __init__(self, model, target_layers, reshape_transform=None, base_method=GradCAM):
        self.base_cam = base_method(model, target_layers, reshape_transform)
        self.compute_input_gradient = self.base_cam.compute_input_gradient
        self.uses_gradients = self.base_cam.uses_gradients

    @property
    def onnx_path(self):
        return self.base_cam.onnx_path

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_tensor, targets=None, eigen_smooth=False, alpha=1, comparison_categories=None,
                target_idx=None):
        if targets is None:
            batch = _as_batch(input_tensor)
            model = self.base_cam._model_file(batch.shape[1:])
            spec = model.spec
            (scores,) = model.scores_runner.run([spec.score_tensor], {spec.input: batch})
            count = scores.shape[-1]
            ranks = list((1, 2, 3)[:max(count - 1, 0)]) if comparison_categories is None \
                else [r for r in comparison_categories if r < count]
            chosen = scores.max(axis=-1) if target_idx is None else scores[:, target_idx]
            order = np.argsort(np.abs(scores - chosen[:, None]), axis=-1)
            targets = [FinerWeightedTarget(int(row[0]), [int(row[r]) for r in ranks], alpha) for row in order]
        return self.base_cam.forward(input_tensor, targets, eigen_smooth)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None


class RefineCAM:
    """RefineCAM (pytorch-grad-cam): the product of `base_method`'s maps of each target layer alone, scaled again;
    the layers' maps come from one run (one file for all the layers)."""

    def __init__(self, model, target_layers, reshape_transform=None, base_method=GradCAMPlusPlus, **kwargs):
        self.base_cam = base_method(model, target_layers, reshape_transform, **kwargs)

    @property
    def onnx_path(self):
        return self.base_cam.onnx_path

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_tensor, targets=None, eigen_smooth=False):
        base = self.base_cam
        batch = _as_batch(input_tensor)
        targets, activations, gradients = base._tensors(batch, targets)
        maps = base._layer_maps(batch, targets, activations, gradients, eigen_smooth)
        return scale_cam_image(formulas.refine([scale_cam_image(np.maximum(m[:, 0], 0)) for m in maps]))


class SegEigenCAM(GradCAM):
    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth=False):
        """The first principal component of |dy/dA| (.) A, its sign set so that its largest magnitude is positive."""
        return get_2d_projection_with_sign_correction(np.abs(grads) * activations)


class GuidedBackpropReLUModel:
    """Guided backpropagation: the gradient of the first image's `target_category` score (its top class where None)
    with respect to that image, every ReLU's backward pass guided, H x W x C; from a file exported with the input's
    gradient, run on its guided copy (onnxcam's guided-backprop method)."""

    def __init__(self, model, device=None):
        self.cam = _Agnostic(model, [])
        self.model = self.cam.model

    @property
    def onnx_path(self):
        return self.cam.onnx_path

    def __call__(self, input_img, target_category=None):
        image = _as_batch(input_img)[:1]
        model = self.cam._model_file(image.shape[1:], input_gradients=True)
        spec = model.spec
        classes = np.array([-1 if target_category is None else int(target_category)], dtype=np.int64)
        (gradient,) = model.guided_runner.run([spec.input_gradient], {spec.input: image, spec.class_input: classes})
        return gradient[0].astype(np.float32).transpose(1, 2, 0)


class _Refused:
    """A pytorch-grad-cam class that onnxcam.compat does not offer: refused in one line at construction."""

    reason = ""

    def __init__(self, *args, **kwargs):
        raise ExplainError(f"{type(self).__name__} is not offered by onnxcam.compat: {self.reason}; use "
                           f"pytorch-grad-cam itself for it")


def _refused(name: str, reason: str) -> type:
    return type(name, (_Refused,), {"reason": reason, "__doc__": f"Not offered: {reason}."})


ShapleyCAM = _refused("ShapleyCAM", "it needs Hessian-vector products")
SESS = _refused("SESS", "its scale search calls the model on crops of many sizes")
DeepFeatureFactorization = _refused("DeepFeatureFactorization", "its non-negative matrix factorisation is not mapped")
ActivationsAndGradients = _refused("ActivationsAndGradients", "the activations and gradients come from the file")
AblationLayerVit = _refused("AblationLayerVit", "AblationCAM ablates channels of B x C x H x W layers only")
AblationLayerFasterRCNN = _refused("AblationLayerFasterRCNN", "torchvision's Faster R-CNN does not export here")


class AblationLayer:
    """pytorch-grad-cam's default ablation layer, accepted by AblationCAM (which ablates as it does)."""


def run_dff_on_image(*args, **kwargs):
    """Refused: Deep Feature Factorization is not mapped."""
    DeepFeatureFactorization()
