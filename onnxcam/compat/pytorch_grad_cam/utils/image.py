"""pytorch-grad-cam's image helpers, same arguments and results (without torchvision or matplotlib)."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def preprocess_image(img: np.ndarray, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """1 x C x H x W tensor of an H x W (x C) image: uint8 scaled to [0, 1] as float32 (floats kept as they are),
    then normalised."""
    pixels = np.asarray(img)
    pixels = pixels.astype(np.float32) / 255 if pixels.dtype == np.uint8 else pixels
    channels = pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1)
    mean, std = (np.asarray(v, dtype=pixels.dtype)[:, None, None] for v in (mean, std))
    return torch.from_numpy(np.ascontiguousarray((channels - mean) / std))[None]


def deprocess_image(img: np.ndarray) -> np.ndarray:
    """An array standardised, scaled by 0.1 around 0.5, clipped to [0, 1], as uint8 (keras-grad-cam's display)."""
    spread = (img - np.mean(img)) / (np.std(img) + 1e-5)
    return np.uint8(np.clip(spread * 0.1 + 0.5, 0, 1) * 255)


def show_cam_on_image(img: np.ndarray, mask: np.ndarray, use_rgb: bool = False, colormap: int = cv2.COLORMAP_JET,
                      image_weight: float = 0.5) -> np.ndarray:
    """The map `mask` in `colormap` (BGR unless `use_rgb`) blended over `img` (float, [0, 1]), as uint8."""
    heatmap = cv2.applyColorMap(np.uint8(255 * mask), colormap)
    if use_rgb:
        heatmap = cv2.cvtColor(heatmap, cv2.COLOR_BGR2RGB)
    if np.max(img) > 1:
        raise ValueError("The input image should np.float32 in the range [0, 1]")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight should be in the range [0, 1]. Got: {image_weight}")
    blend = (1 - image_weight) * (np.float32(heatmap) / 255) + image_weight * img
    return np.uint8(255 * (blend / np.max(blend)))


def scale_cam_image(cam, target_size=None) -> np.ndarray:
    """Each map shifted to a minimum of 0 and divided by (1e-7 + its maximum), then resized bilinearly to
    `target_size` (width, height), as float32."""
    scaled = []
    for image in cam:
        image = image - np.min(image)
        image = image / (1e-7 + np.max(image))
        if target_size is not None:
            image = cv2.resize(np.float32(image), tuple(target_size))
        scaled.append(image)
    return np.float32(scaled)


def scale_accross_batch_and_channels(tensor, target_size) -> np.ndarray:
    """scale_cam_image on every map of a B x C x h x w array, each resized to `target_size` (width, height)."""
    batch, channels = tensor.shape[:2]
    scaled = scale_cam_image(tensor.reshape(batch * channels, *tensor.shape[2:]), target_size)
    return scaled.reshape(batch, channels, target_size[1], target_size[0])
