"""Helpers for comparing with the anchor libraries (pytorch-grad-cam): which module computes a tensor an explainable
file exposes, and the min-max scaling both sides are compared after."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def module_computing(model: nn.Module, x: torch.Tensor, activation: np.ndarray) -> str:
    """The name of the first module, in the order their forward passes finish, whose output is `activation` (outputs
    are copied as they come: an in-place ReLU overwrites its input's tensor). Where the tensor is only a module's
    input (LRASPP's upsampled features, F.interpolate's output), that module is put behind an nn.Identity in its
    place, for a hook to see it: the model computes the same, and the Identity's name is returned."""
    seen: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []

    def keep(name, args, output):
        first = args[0].detach().clone() if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(output, torch.Tensor):
            seen.append((name, first, output.detach().clone()))

    handles = [module.register_forward_hook(lambda m, i, o, name=name: keep(name, i, o))
               for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    scale = float(np.abs(activation).max())

    def same(tensor) -> bool:
        return tensor is not None and tuple(tensor.shape) == activation.shape and \
            bool(np.abs(tensor.numpy() - activation).max() <= 1e-4 * scale)

    found = [name for name, _, output in seen if same(output)]
    if found:
        return found[0]
    name = next((name for name, first, _ in seen if same(first)), None)
    assert name is not None, "no module computes the file's activation"
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, nn.Sequential(nn.Identity(), getattr(owner, child)))
    return f"{name}.0"


def min_max(maps: np.ndarray) -> np.ndarray:
    """Each map scaled to [0, 1] (maps that are flat stay 0)."""
    low = maps.min(axis=(1, 2), keepdims=True)
    return (maps - low) / np.maximum(maps.max(axis=(1, 2), keepdims=True) - low, 1e-12)
