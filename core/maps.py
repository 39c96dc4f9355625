"""From per-layer maps to heatmaps: bilinear upsampling, normalisation, averaging over layers."""

from __future__ import annotations

import numpy as np


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """size_out x size_in interpolation weights with half-pixel centres (align_corners=False)."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0)
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = source - low
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of B x h x w maps to B x H x W, as torch's interpolate(align_corners=False)."""
    rows = _bilinear_matrix(maps.shape[1], size[0]).astype(np.float32)
    cols = _bilinear_matrix(maps.shape[2], size[1]).astype(np.float32)
    return np.einsum("Hh,bhw,Ww->bHW", rows, maps.astype(np.float32), cols, optimize=True)


def normalize(maps: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling to [0, 1]; a constant map becomes 0 (or 1 if positive), never NaN."""
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    spread = high - low
    flat = np.where(high > 0, 1.0, 0.0).astype(maps.dtype)
    scaled = (maps - low) / np.where(spread > 0, spread, 1)
    return np.where(spread > 0, scaled, flat).astype(np.float32)


def heatmaps(layer_maps: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Each layer's map upsampled to `size` and normalised, averaged over layers, normalised again."""
    stacked = np.mean([normalize(upsample(m, size)) for m in layer_maps], axis=0)
    return normalize(stacked) if len(layer_maps) > 1 else stacked
