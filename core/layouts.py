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

MAX_PREFIX = 8  # tokens before the patches: CLS, distillation, registers


def guess_layout(shape, image_size: tuple[int, int] | None = None) -> str | None:
    """The layout of an activation of static shape (batch first), or None when it cannot be guessed.

    With the image's size, only layouts whose grid lies over the image (see `fits_image`) are
    guessed, so that a tensor that merely has the right rank (attention B x heads x N x d, a flattened
    map) is not taken for a grid. Without it, 4-D tensors are nchw unless they look channels-last, and
    token sequences need a square grid after no or one prefix token.
    """
    for layout in _layouts_of(shape, image_size):
        if image_size is None or fits_image(grid_of(layout, shape), image_size):
            return layout
    return None


def _layouts_of(shape, image_size) -> list[str]:
    """Plausible layouts of a shape, most likely first."""
    if len(shape) == 4:
        _, d1, d2, d3 = shape
        return ["nhwc", "nchw"] if d1 == d2 and d3 != d1 else ["nchw", "nhwc"]
    if len(shape) != 3 or shape[1] is None:
        return []
    tokens, layouts = shape[1], []
    for prefix in range(0, (MAX_PREFIX if image_size else 1) + 1):
        patches = tokens - prefix
        if image_size is None:
            side = math.isqrt(max(patches, 0))
            if side > 1 and side * side == patches:
                layouts.append(f"tokens:{prefix}:{side}x{side}")
            continue
        height, width = image_size
        rows = max(round(math.sqrt(patches * height / width)), 1) if patches > 0 else 0
        for h in (rows - 1, rows, rows + 1):
            if h > 0 and patches % h == 0:
                layouts.append(f"tokens:{prefix}:{h}x{patches // h}")
    return layouts


def grid_of(layout: str, shape) -> tuple[int | None, int | None]:
    """(rows, columns) of the grid a target of this layout and shape lies on."""
    if layout == "nchw":
        return shape[2], shape[3]
    if layout == "nhwc":
        return shape[1], shape[2]
    _, height, width = parse_tokens(layout)
    return height, width


def channels_of(layout: str, shape) -> int | None:
    """The number of channels of a target of this layout and shape (a token's width for token layouts)."""
    return shape[1] if layout == "nchw" else shape[-1]


def fits_image(grid: tuple[int | None, int | None], image_size: tuple[int, int]) -> bool:
    """Whether a grid can be a map over the image: more than one cell, no larger than the image, and the
    image's aspect ratio within rounding (strided layers round each side to within one cell)."""
    rows, columns = grid
    height, width = image_size
    if rows is None or columns is None or rows * columns <= 1 or rows > height or columns > width:
        return False
    # some stride s has each side within one cell of (image side) / s
    low = max(height / (rows + 1), width / (columns + 1))
    high = min(height / (rows - 1) if rows > 1 else math.inf, width / (columns - 1) if columns > 1 else math.inf)
    return low <= high


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
