"""The benchmark's models: ResNet-50 (He et al.), EfficientNet-Lite0 (pretrained) and a ViT-B/16-sized
transformer. Random weights where no pretrained ones ship: timing does not depend on them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the model builders shared with the tests
from support.zoo_transformers import VisionTransformer  # noqa: E402


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, channels_in: int, width: int, stride: int):
        super().__init__()
        out = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(channels_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or channels_in != out:
            self.downsample = nn.Sequential(nn.Conv2d(channels_in, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels, stages = 64, []
        for i, count in enumerate(blocks):
            width = 64 * 2 ** i
            layers = [Bottleneck(channels, width, 1 if i == 0 else 2)]
            channels = width * 4
            layers += [Bottleneck(channels, width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(channels, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50():
    torch.manual_seed(0)
    return ResNet().eval()


def vit_b16():
    torch.manual_seed(0)
    return VisionTransformer(image=224, patch=16, dim=768, depth=12, heads=12, classes=1000).eval()


def efficientnet_lite0():
    from onnxcam.demo.efficientnet_lite import efficientnet_lite0_pretrained

    return efficientnet_lite0_pretrained()


# name -> (builder, target layer: the last stage, as users pick it)
MODELS = {
    "resnet50": (resnet50, "layer4"),
    "efficientnet-lite0": (efficientnet_lite0, "_head_act"),
    "vit-b16": (vit_b16, "blocks.11.norm1"),
}
