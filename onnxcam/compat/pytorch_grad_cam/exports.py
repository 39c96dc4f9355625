"""The explainable files behind the compat CAMs: one per model weights, target layers, their layouts and input shape,
exported on first use and kept in memory and on disk (`ONNXCAM_CACHE`, else $XDG_CACHE_HOME/onnxcam/compat, else
~/.cache/onnxcam/compat), so that a new CAM object or a restarted process finds it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...core.errors import ExportError
from ...core.layouts import MAX_PREFIX, to_grid
from ...exporters import export_torch
from ...runtimes.explainable import ExplainableModel

FORMAT = "1"  # bumped when what a cached file holds changes
_LOADED: dict[tuple[str, str], ExplainableModel] = {}  # (key, provider) -> the file's sessions


def cache_dir() -> Path:
    if os.environ.get("ONNXCAM_CACHE"):
        return Path(os.environ["ONNXCAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxcam" / "compat"


def layer_names(model: torch.nn.Module, target_layers) -> list[str]:
    """The module names of `target_layers` (modules of `model`, as pytorch-grad-cam takes them)."""
    names = {id(module): name for name, module in model.named_modules() if name}
    missing = [type(layer).__name__ for layer in target_layers if id(layer) not in names]
    if missing or not target_layers:
        raise ExportError(f"target_layers must be submodules of the model; {missing[0] if missing else 'none'} "
                          f"{'is not one' if missing else 'given'}")
    return [names[id(layer)] for layer in target_layers]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's class, parameter and buffer names, shapes, types and values."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        value = value.reshape(-1)  # a 0-d tensor cannot be viewed as bytes
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def version_stamp(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (an optimiser step, load_state_dict):
    torch counts in-place writes per tensor. Cheap, unlike hashing the weights."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def recognised_layout(reshape_transform, shape: tuple[int, ...]) -> str | None:
    """The onnxcam layout that `reshape_transform` computes on a target of this shape (a ViT's CLS token dropped and
    tokens laid on their grid, a Swin stage's channels moved first), or None: the transform applied to a tensor of
    distinct values is compared with each candidate layout's grid."""
    if reshape_transform is None:
        return "nchw" if len(shape) == 4 else None
    values = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape)
    try:
        moved = reshape_transform(values)
    except Exception:  # noqa: BLE001 - any failure: the transform is not one of the layouts
        return None
    if not isinstance(moved, torch.Tensor) or moved.ndim != 4:
        return None
    candidates = ["nchw", "nhwc"] if len(shape) == 4 else \
        [f"tokens:{p}:{moved.shape[2]}x{moved.shape[3]}" for p in range(MAX_PREFIX + 1)] if len(shape) == 3 else []
    for layout in candidates:
        try:
            grid = to_grid(values.numpy(), layout)
        except ValueError:
            continue
        if grid.shape == tuple(moved.shape) and np.array_equal(grid, moved.numpy()):
            return layout
    return None


def forward_order(model: torch.nn.Module, modules: list, input_shape: tuple[int, ...]) -> list[tuple[int, tuple]]:
    """(index in `modules`, output shape, None where the output is not one tensor) of each module, in the order their
    forward passes finish on a batch of two images of `input_shape` (C x H x W): the order in which pytorch-grad-cam
    collects, and pairs, the activations."""
    finished: dict[int, tuple | None] = {}

    def keeper(k):
        def keep(module, args, output):
            finished.setdefault(k, tuple(output.shape) if isinstance(output, torch.Tensor) else None)
        return keep

    handles = [m.register_forward_hook(keeper(k)) for k, m in enumerate(modules)]
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=parameter.dtype, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
    return list(finished.items())


def explainable(model: torch.nn.Module, target_layers, reshape_transform, input_shape: tuple[int, ...],
                provider: str, weights: str, input_gradients: bool = False) -> ExplainableModel:
    """The sessions of the explainable file of `model` (its weights hashed as `weights`) at these target layers (in
    the order they run; none: the default layer) and this input shape, with the input's gradient where
    `input_gradients`: from memory, else from the disk cache, else exported there now. The layouts the file records
    are those `reshape_transform` computes, else guessed; nchw without one."""
    names = layer_names(model, target_layers) if target_layers else []
    ran = forward_order(model, list(target_layers), input_shape)
    if len(ran) != len(names):
        idle = next(name for k, name in enumerate(names) if k not in dict(ran))
        raise ExportError(f"target layer {idle} does not run in the model's forward pass")
    names, shapes = [names[k] for k, _ in ran], [shape for _, shape in ran]
    if None in shapes:
        raise ExportError(f"target layer {names[shapes.index(None)]} does not return one tensor")
    if reshape_transform is None:
        for name, shape in zip(names, shapes, strict=True):
            if len(shape) != 4:
                raise ExportError(f"target layer {name} outputs a tensor of shape {list(shape)}, not B x C x H x W: "
                                  f"give a reshape_transform, as pytorch-grad-cam needs")
    layouts = tuple(recognised_layout(reshape_transform, shape) for shape in shapes)
    key = hashlib.sha256(repr((FORMAT, weights, names, tuple(input_shape), layouts, input_gradients)).encode()
                         ).hexdigest()[:32]
    if (key, provider) not in _LOADED:
        path = cache_dir() / f"{key}.explain.onnx"
        if not path.exists():
            _export(model, names, input_shape, path, layouts, input_gradients)
        _LOADED[(key, provider)] = ExplainableModel(path, provider)
    return _LOADED[(key, provider)]


def _export(model, names, input_shape, path: Path, layouts, input_gradients: bool) -> None:
    """Export to a temporary file beside `path`, then rename it there (a second process never reads half a file):
    with the TorchScript tracer (ResNet-50: 3 s against 13 s), else torch.export (what the tracer cannot trace
    faithfully, such as a branch on the values, it refuses, and torch.export refuses in its own line or exports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        partial = Path(folder) / path.name
        options = {"input_shape": input_shape, "layers": names or None, "explain_probabilities": True,
                   "layouts": list(layouts) if layouts and None not in layouts else None,
                   "input_gradients": input_gradients}
        try:
            export_torch(model, partial, tracer="torchscript", **options)
        except ExportError:
            export_torch(model, partial, **options)
        os.replace(partial, path)
