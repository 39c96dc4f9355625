"""Token layouts: turning a target's activations into the B x C x H x W grid the CAM methods expect.

A layout is a short string recorded in the exported file:
  "nchw"            convolutional maps, B x C x H x W (as they are)
  "nhwc"            channels-last maps, B x H x W x C (Swin stages, ConvNeXt blocks)
  "tokens:P:HxW"    token sequences B x (P + H*W) x C whose first P tokens are not patches
                    (P = 1 for a ViT's CLS token, 2 with a distillation token, more with registers)
"""

from __future__ import annotations

import math

import numpy as np


def guess_layout(shape) -> str | None:
    """The layout of an activation of static shape (batch first), or None when it cannot be guessed."""
    if len(shape) == 4:
        _, d1, d2, d3 = shape
        return "nhwc" if d1 == d2 and d3 != d1 else "nchw"
    if len(shape) == 3:
        tokens = shape[1]
        for prefix in (0, 1):
            side = math.isqrt(max(tokens - prefix, 0))
            if side > 1 and side * side == tokens - prefix:
                return f"tokens:{prefix}:{side}x{side}"
    return None


def parse_tokens(layout: str) -> tuple[int, int, int]:
    """(prefix tokens, grid height, grid width) of a "tokens:P:HxW" layout."""
    try:
        kind, prefix, grid = layout.split(":")
        height, width = (int(v) for v in grid.split("x"))
        if kind != "tokens":
            raise ValueError
        return int(prefix), height, width
    except ValueError:
        raise ValueError(f"layout '{layout}' is not nchw, nhwc or tokens:P:HxW") from None


def check_layout(layout: str, shape) -> str:
    """The layout, validated against the activation's static shape (batch first)."""
    if layout in ("nchw", "nhwc"):
        if len(shape) != 4:
            raise ValueError(f"layout {layout} needs a 4-D activation, this one is {len(shape)}-D")
        return layout
    prefix, height, width = parse_tokens(layout)
    if len(shape) != 3 or shape[1] != prefix + height * width:
        raise ValueError(f"layout {layout} does not fit an activation of shape {list(shape)}")
    return layout


def to_grid(tensor: np.ndarray, layout: str) -> np.ndarray:
    """B x C x H x W view of an activation or gradient laid out as `layout` (prefix tokens dropped)."""
    if layout == "nchw":
        return tensor
    if layout == "nhwc":
        return tensor.transpose(0, 3, 1, 2)
    prefix, height, width = parse_tokens(layout)
    patches = tensor[:, prefix:, :]
    return patches.reshape(len(tensor), height, width, -1).transpose(0, 3, 1, 2)


def attention_layout(tokens: int, layouts=()) -> str | None:
    """The token layout of N x N attention, for rollout, which reads the CLS row: a target's
    tokens:P:HxW layout with P >= 1 and P + H*W = N, else N = 1 + a square; None when neither fits."""
    for layout in layouts:
        if layout.startswith("tokens:"):
            prefix, height, width = parse_tokens(layout)
            if prefix >= 1 and prefix + height * width == tokens:
                return layout
    guess = guess_layout((None, tokens, None))
    return guess if guess and parse_tokens(guess)[0] >= 1 else None
