"""Shared fixtures: a small CNN exported once per session, and helpers to run the CLI as a user does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn


class SmallNet(nn.Module):
    """Conv-BN-ReLU stages, a max-pool, global pooling and a linear head: the shape of most CNNs."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def small_net(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet(classes)
    for module in model.modules():  # non-trivial running statistics, so BatchNorm is not an identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="session")
def small_model():
    return small_net()


@pytest.fixture(scope="session")
def small_onnx(tmp_path_factory, small_model):
    from onnxcam.exporters import export_torch

    path = tmp_path_factory.mktemp("small") / "small.explain.onnx"
    export_torch(small_model, path, input_shape=(3, 32, 32), layers=["features.8"],
                 mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], labels=[f"class {i}" for i in range(5)])
    return path


def run_cli(*args, cwd=None, env=None):
    """`python -m onnxcam ARGS` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "onnxcam", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def random_images(count: int, seed: int = 0, size=(40, 52)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]
