"""pytorch-grad-cam's BaseCAM on an explainable file: the same construction, call and per-layer hooks
(`get_cam_weights`, `get_cam_image`), with the activations and gradients computed by ONNX Runtime.

A call runs the file once: with class targets (ClassifierOutputTarget, or None for each image's top class) the file's
own single run gives the activations and the gradients; with any other target (a callable of one image's output) a
forward run gives the outputs and the activations, autograd takes each target's gradient with respect to its image's
output, and the file's head carries that seed back to the target layers. From there each layer's map is formed as
pytorch-grad-cam forms it (ReLU, scale_cam_image to the input's size, layers averaged and scaled again)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ...core.errors import ExplainError
from ...methods.smoothing import TTA_FACTORS
from . import exports
from .utils.image import scale_cam_image
from .utils.model_targets import ClassifierOutputTarget
from .utils.svd_on_activations import get_2d_projection


class BaseCAM:
    """A CAM over `target_layers` (modules of `model`); `reshape_transform` turns a layer's output into
    B x C x H x W. Custom `tta_transforms`, `compute_input_gradient` and `detach=False` are refused."""

    reads_cuts = False  # whether get_cam_weights runs the file's head, which needs the forward part's cuts too

    def __init__(self, model: torch.nn.Module, target_layers, reshape_transform=None,
                 compute_input_gradient: bool = False, uses_gradients: bool = True, tta_transforms=None,
                 detach: bool = True) -> None:
        refused = {"compute_input_gradient": compute_input_gradient, "tta_transforms": tta_transforms is not None,
                   "detach=False": not detach}
        for name in (name for name, given in refused.items() if given):
            raise ExplainError(f"onnxcam.compat does not take {name}: the maps come from an exported file")
        self.model = model.eval()
        self.target_layers = list(target_layers)
        self.reshape_transform = reshape_transform
        self.uses_gradients = uses_gradients
        self.compute_input_gradient = False
        self.device = next(model.parameters()).device
        self.provider = "cuda" if self.device.type == "cuda" else "cpu"
        if self.target_layers:
            exports.layer_names(model, self.target_layers)  # refused now, not at the first call
        self.explainable = None  # the file's sessions, for the last call's input shape
        self.outputs = None
        self.forward_values: dict[str, np.ndarray] = {}  # the last call's forward part, by tensor name
        self._weights: tuple[tuple, str] | None = None  # (version stamp, weights hash)
        self._files: dict[tuple, object] = {}  # (input shape, weights hash) -> the file's sessions

    @property
    def onnx_path(self):
        """The explainable file of the last call's input shape (None before the first call): what onnxcam.Explainer,
        `onnxcam serve` and the other front ends load. Warns where a reshape_transform is no layout of the file's:
        onnxcam then reads the target layer in the layout guessed, not as the transform lays it."""
        if self.explainable is None:
            return None
        spec = self.explainable.spec
        shapes = {o.name: (2, *o.shape[1:]) for o in self.explainable.session.get_outputs()}
        if self.reshape_transform is not None and any(
                exports.recognised_layout(self.reshape_transform, shapes[name]) != layout
                for name, layout in zip(spec.activations, spec.layouts, strict=True)):
            warnings.warn(f"onnxcam.compat: the reshape_transform is no layout onnxcam knows; the file's layer is read "
                          f"as {', '.join(spec.layouts)}, and its maps differ from this object's", stacklevel=2)
        return self.explainable.path

    def _model_file(self, input_shape: tuple[int, ...], input_gradients: bool = False):
        """The file for this input shape, its weights re-hashed only after they were changed in place. Its target
        layers are in the order they run, the order in which pytorch-grad-cam pairs layers and activations."""
        stamp = exports.version_stamp(self.model)
        if self._weights is None or self._weights[0] != stamp:
            self._weights = (stamp, exports.weights_hash(self.model))
        key = (tuple(input_shape), self._weights[1], input_gradients)
        if key not in self._files:
            self._files[key] = exports.explainable(self.model, self.target_layers, self.reshape_transform,
                                                   input_shape, self.provider, self._weights[1], input_gradients)
        self.explainable = self._files[key]
        return self.explainable

    def get_cam_weights(self, input_tensor, target_layers, targets, activations, grads) -> np.ndarray:
        raise NotImplementedError("get_cam_weights must be implemented by subclass")

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False) -> np.ndarray:
        """The channels weighted by get_cam_weights, summed (or their first principal component with eigen_smooth)."""
        weights = self.get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        weighted = weights[:, :, None, None] * activations
        return get_2d_projection(weighted) if eigen_smooth else weighted.sum(axis=1)

    def forward(self, input_tensor, targets, eigen_smooth: bool = False) -> np.ndarray:
        """B x H x W maps in [0, 1]: each layer's map ReLU'd and scaled to the input's size, then averaged."""
        batch = _as_batch(input_tensor)
        targets, activations, gradients = self._tensors(batch, targets)
        return self.aggregate_multi_layers(self._layer_maps(batch, targets, activations, gradients, eigen_smooth))

    def _layer_maps(self, batch, targets, activations, gradients, eigen_smooth) -> list[np.ndarray]:
        size = (batch.shape[-1], batch.shape[-2])
        return [scale_cam_image(np.maximum(self.get_cam_image(batch, layer, targets, a, g, eigen_smooth), 0),
                                size)[:, None]
                for layer, a, g in zip(self.target_layers, activations, gradients, strict=True)]

    def aggregate_multi_layers(self, cam_per_target_layer) -> np.ndarray:
        return scale_cam_image(np.maximum(np.concatenate(cam_per_target_layer, axis=1), 0).mean(axis=1))

    def _tensors(self, batch: np.ndarray, targets):
        """(targets, per-layer activations, per-layer gradients or Nones) as B x C x H x W arrays; targets None
        become each image's top class."""
        model = self._model_file(batch.shape[1:])
        spec = model.spec
        if targets is not None and len(targets) != len(batch):
            raise ExplainError(f"{len(targets)} targets given for {len(batch)} images")
        classes = _classes(targets, len(batch), spec.num_classes)
        if self.uses_gradients and classes is not None and len(spec.score_shape or (0,)) == 1:
            scores, _, *tensors = model.run(batch, classes, [*spec.activations, *spec.gradients])
            activations, gradients = tensors[:len(spec.activations)], tensors[len(spec.activations):]
        else:  # the forward part, then the targets' gradients through the file's head
            cuts = spec.cuts if self.uses_gradients or self.reads_cuts else []
            names = tuple(dict.fromkeys([spec.scores, *spec.activations, *cuts]))
            values = dict(zip(names, model.forward_runner(names).run(list(names), {spec.input: batch}), strict=True))
            self.forward_values = values
            scores, activations = values[spec.scores], [values[name] for name in spec.activations]
            gradients = [None] * len(activations)
        self.outputs = torch.from_numpy(scores)
        if targets is None:
            targets = [ClassifierOutputTarget(int(c)) for c in scores.reshape(len(batch), -1).argmax(axis=1)]
        if self.uses_gradients and gradients[0] is None:
            seeds = np.stack([_seed(target, output) for target, output in zip(targets, scores, strict=True)])
            gradients = model.head.gradients(spec.scores, activations, [values[name] for name in cuts],
                                             np.arange(len(batch)), seeds)
        return targets, [self._grid(a) for a in activations], [None if g is None else self._grid(g)
                                                                for g in gradients]

    def _grid(self, tensor: np.ndarray) -> np.ndarray:
        """A layer's tensor through reshape_transform (applied by torch, as pytorch-grad-cam applies it)."""
        if self.reshape_transform is None:
            return tensor
        try:
            grid = self.reshape_transform(torch.from_numpy(tensor))
        except Exception as error:  # noqa: BLE001 - any failure of the user's callable is told in one line
            raise ExplainError(f"reshape_transform fails on the target layer's output of shape {list(tensor.shape)}: "
                               f"{_first_line(error)}") from None
        if not isinstance(grid, torch.Tensor) or grid.ndim != 4:
            raise ExplainError(f"reshape_transform must return a B x C x H x W tensor, not "
                               f"{list(getattr(grid, 'shape', [])) or type(grid).__name__}")
        return np.ascontiguousarray(grid.numpy())

    def forward_augmentation_smoothing(self, input_tensor, targets, eigen_smooth: bool = False) -> np.ndarray:
        """aug_smooth: the maps of the batch unflipped and flipped, times 0.9, 1 and 1.1, all six in one run, each
        flipped back, averaged."""
        batch = _as_batch(input_tensor)
        copies = [view * np.float32(factor) for view in (batch, batch[..., ::-1]) for factor in TTA_FACTORS]
        stacked = np.ascontiguousarray(np.concatenate(copies))
        maps = self.forward(stacked, None if targets is None else list(targets) * len(copies), eigen_smooth)
        maps = maps.reshape(len(copies), len(batch), *maps.shape[1:])
        maps[len(TTA_FACTORS):] = maps[len(TTA_FACTORS):, ..., ::-1]
        return np.mean(np.float32(maps), axis=0)

    def __call__(self, input_tensor, targets=None, aug_smooth: bool = False, eigen_smooth: bool = False):
        if aug_smooth:
            return self.forward_augmentation_smoothing(input_tensor, targets, eigen_smooth)
        return self.forward(input_tensor, targets, eigen_smooth)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None


def _as_batch(input_tensor) -> np.ndarray:
    """The batch as a contiguous float32 numpy array (from a torch tensor on any device, or numpy)."""
    if isinstance(input_tensor, torch.Tensor):
        input_tensor = input_tensor.detach().cpu().numpy()
    return np.ascontiguousarray(input_tensor, dtype=np.float32)


def _classes(targets, count: int, classes: int) -> np.ndarray | None:
    """The class of every image where each target is a class in range (ClassifierOutputTarget, this module's or
    pytorch-grad-cam's own; None: the top class), else None (a negative index counts from the end, as Python's)."""
    if targets is None:
        return np.full(count, -1, dtype=np.int64)
    if all(type(t).__name__ == "ClassifierOutputTarget" and isinstance(getattr(t, "category", None), (int, np.integer))
           and 0 <= t.category < classes for t in targets):
        return np.array([t.category for t in targets], dtype=np.int64)
    return None


def _seed(target, output: np.ndarray) -> np.ndarray:
    """d target(output) / d output for one image's output, by autograd; refused in one line where the target is not
    one differentiable score of that output."""
    value = torch.from_numpy(output.copy()).requires_grad_()
    name = type(target).__name__
    try:
        score = target(value)
    except Exception as error:  # noqa: BLE001 - any failure of the user's callable is told in one line
        raise ExplainError(f"target {name} cannot be computed on the model's output of shape {list(output.shape)}: "
                           f"{_first_line(error)}") from None
    if not isinstance(score, torch.Tensor) or score.numel() != 1:
        raise ExplainError(f"target {name} must return one score per image (a tensor of one element), not "
                           f"{type(score).__name__} {list(getattr(score, 'shape', []))}")
    if not score.requires_grad:
        raise ExplainError(f"target {name}'s score does not depend on the model's output through torch operations")
    (gradient,) = torch.autograd.grad(score.sum(), value)
    return gradient.numpy()


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__
