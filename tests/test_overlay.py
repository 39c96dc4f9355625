"""Overlays: colour order, blending, sizes; preprocessing order of channels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from onnxcam import overlay
from onnxcam.core import preprocess, upsample
from onnxcam.core.images import COLORMAPS


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


@pytest.mark.parametrize("colormap", ["jet", "viridis"])
def test_upsampled_colours_follow_the_float_path(colormap):
    """The map is upsampled as 8-bit levels: each pixel's colour is that of the float-upsampled map within a level."""
    rng = np.random.default_rng(1)
    heatmap = cv2.GaussianBlur(rng.random((56, 56)).astype(np.float32), (0, 0), 4)
    heatmap = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
    drawn = overlay(np.zeros((300, 400, 3), np.uint8), heatmap, alpha=1.0, colormap=colormap)
    levels = np.uint8(np.clip(cv2.resize(heatmap, (400, 300), interpolation=cv2.INTER_LINEAR), 0, 1) * 255 + 0.5)
    table = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), COLORMAPS[colormap])[:, 0, ::-1]
    within_a_level = [(drawn == table[np.clip(levels.astype(int) + step, 0, 255)]).all(axis=-1) for step in (-1, 0, 1)]
    assert np.logical_or.reduce(within_a_level).all()


def test_overlay_of_8_bit_levels_is_the_overlay_of_the_map():
    from onnxcam.jobs.outputs import uint8_map

    rng = np.random.default_rng(3)
    image, heatmap = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), rng.random((10, 10)).astype(np.float32)
    np.testing.assert_array_equal(overlay(image, uint8_map(heatmap)), overlay(image, heatmap))


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


@pytest.mark.parametrize("encoder", ["fpng", "opencv"])
def test_png_overlays_are_lossless_whichever_encoder_writes_them(encoder, monkeypatch):
    import onnxcam.core.files

    if encoder == "fpng":
        pytest.importorskip("fpng")
    else:
        monkeypatch.setattr(onnxcam.core.files, "fpng", None)
    image = overlay(np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8), np.eye(7))
    decoded = cv2.imdecode(np.frombuffer(onnxcam.core.files.encode_image(image, "png"), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded[..., ::-1], image)
    grey = np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4, 1), 3, axis=2)
    encoded = np.frombuffer(onnxcam.core.files.encode_png(grey), np.uint8)
    assert cv2.imdecode(encoded, cv2.IMREAD_COLOR).shape == (3, 4, 3)
    red = np.zeros((16, 24, 3), np.uint8)
    red[..., 0] = 255
    jpeg = cv2.imdecode(np.frombuffer(onnxcam.core.files.encode_image(red, "jpeg"), np.uint8), cv2.IMREAD_COLOR)
    assert jpeg.shape == red.shape and jpeg[..., 2].min() > 240 and jpeg[..., 0].max() < 15  # BGR on disk: red
