"""A localisation set made on the fly: the class of a noisy 32 x 32 image is decided by one small
white shape (plus, ring or cross) at a random place, so the right explanation is known: its box."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import nn

SIZE, SHAPE = 32, 7


def _stamps() -> list[np.ndarray]:
    plus, ring, cross = (np.zeros((SHAPE, SHAPE), np.float32) for _ in range(3))
    plus[SHAPE // 2, :] = plus[:, SHAPE // 2] = 1
    ring[[0, -1], :] = ring[:, [0, -1]] = 1
    cross[np.arange(SHAPE), np.arange(SHAPE)] = cross[np.arange(SHAPE), np.arange(SHAPE)[::-1]] = 1
    return [plus, ring, cross]


def make(count: int, seed: int):
    """uint8 RGB images N x 32 x 32 x 3, labels N, boxes N x 4 (x0, y0, x1, y1 inclusive)."""
    rng = np.random.default_rng(seed)
    stamps = _stamps()
    images = np.clip(rng.normal(0.35, 0.15, (count, SIZE, SIZE, 3)), 0, 1)
    labels = rng.integers(0, len(stamps), count)
    corners = rng.integers(0, SIZE - SHAPE + 1, (count, 2))
    for image, label, (x, y) in zip(images, labels, corners, strict=True):
        patch = image[y:y + SHAPE, x:x + SHAPE]
        patch[stamps[label] > 0] = 1.0
    boxes = np.column_stack([corners, corners + SHAPE - 1])
    return (images * 255).astype(np.uint8), labels, boxes


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """As the exported model's metadata says: /255, then (x - 0.5) / 0.5."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


@cache
def trained_classifier(steps: int = 250, seed: int = 0) -> nn.Module:
    """A small CNN trained in a few seconds on the set; it reaches near-perfect accuracy. Trained once per process
    and shared (callers only read it: export it, run it in eval mode)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 3))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels, _ = make(steps * 32, seed + 1)
    inputs, targets = to_tensor(images), torch.from_numpy(labels)
    for step in range(steps):
        part = slice(step * 32, (step + 1) * 32)
        loss = nn.functional.cross_entropy(model(inputs[part]), targets[part])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()
