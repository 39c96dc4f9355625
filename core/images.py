"""Pixels in and out: preprocessing an RGB image for the model, and the heatmap overlay."""

from __future__ import annotations

import cv2
import numpy as np

COLORMAPS = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "inferno": cv2.COLORMAP_INFERNO,
             "viridis": cv2.COLORMAP_VIRIDIS, "hot": cv2.COLORMAP_HOT}


def preprocess(images: list[np.ndarray], size: tuple[int, int], mean=None, std=None) -> np.ndarray:
    """uint8 RGB images (H x W x 3) -> float32 N x 3 x size, scaled to [0, 1] then (x - mean) / std."""
    batch = np.empty((len(images), size[0], size[1], 3), dtype=np.float32)
    for i, image in enumerate(images):
        shrinking = image.shape[0] > size[0] or image.shape[1] > size[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        batch[i] = cv2.resize(image, (size[1], size[0]), interpolation=interpolation)
    batch /= 255.0
    if mean is not None:
        batch -= np.asarray(mean, dtype=np.float32)
    if std is not None:
        batch /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a colormapped heatmap (values in [0, 1]) onto an RGB uint8 image; RGB uint8 out, image-sized.

    OpenCV's colormaps come out in BGR order: they are flipped to RGB here, so no channel swap is
    needed by the caller (the classic slip that paints a cat's heat blue).
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap '{colormap}'; choose from {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    height, width = image.shape[:2]
    if heatmap.shape != (height, width):
        heatmap = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    levels = np.uint8(np.clip(heatmap, 0, 1) * 255 + 0.5)
    colours = cv2.applyColorMap(levels, COLORMAPS[colormap])[..., ::-1]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)
