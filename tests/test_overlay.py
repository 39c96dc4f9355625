"""Overlays: colour order, blending, sizes; preprocessing order of channels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from onnxcam import overlay
from onnxcam.core import preprocess, upsample


def test_hot_is_red_and_cold_is_blue_in_rgb():
    black = np.zeros((10, 12, 3), np.uint8)
    hot = overlay(black, np.ones((10, 12), np.float32), alpha=1.0)
    cold = overlay(black, np.zeros((10, 12), np.float32), alpha=1.0)
    assert hot[..., 0].mean() > 100 and hot[..., 2].mean() < 10  # jet's top is dark red: R high, B zero
    assert cold[..., 2].mean() > 100 and cold[..., 0].mean() < 10  # jet's bottom is dark blue


def test_blend_weights_and_image_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    heatmap = rng.random((7, 7)).astype(np.float32)
    assert overlay(image, heatmap).shape == (30, 40, 3)
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=0.0), image)
    full = overlay(image, heatmap, alpha=1.0)
    half = overlay(image, heatmap, alpha=0.5)
    np.testing.assert_allclose(half.astype(float), (image.astype(float) + full) / 2, atol=1.01)


def test_bad_overlay_arguments():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown colormap 'rainbowz'"):
        overlay(image, np.zeros((4, 4)), colormap="rainbowz")
    with pytest.raises(ValueError, match="alpha must lie in"):
        overlay(image, np.zeros((4, 4)), alpha=2)


def test_preprocess_keeps_rgb_order_and_normalises():
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 255  # pure red in RGB
    batch = preprocess([image], (4, 4), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert batch.shape == (1, 3, 4, 4) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, 0], 1.0)
    np.testing.assert_allclose(batch[0, 2], -1.0)


def test_upsample_matches_opencv_bilinear():
    """Half-pixel-centre bilinear upsampling, as OpenCV's INTER_LINEAR (and torch align_corners=False)."""
    maps = np.random.default_rng(1).random((2, 5, 7)).astype(np.float32)
    expected = np.stack([cv2.resize(m, (21, 15), interpolation=cv2.INTER_LINEAR) for m in maps])
    np.testing.assert_allclose(upsample(maps, (15, 21)), expected, atol=1e-5)
