"""Small YOLO-shaped detectors in PyTorch, for the detector defaults' tests: three scales (strides 8, 16, 32), a
top-down neck, and the raw heads ultralytics exports.

TinyYoloV8: a Detect-like head with separate box (cv2) and class (cv3) branches per scale, the box branch read
through a distribution over `bins` distances (DFL; bins=1 reads the distances directly), output N x (4 + K) x A with
boxes cx cy w h in pixels and sigmoid class scores; with depthwise-separable class blocks, YOLOv11's head.
TinyYoloV5: one 1x1 prediction per scale for three anchor boxes per cell, output N x A' x (5 + K) with objectness.
"""

from __future__ import annotations

import torch
from torch import nn

STRIDES = (8, 16, 32)


def conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Convolution, batch normalisation (with non-trivial statistics) and SiLU."""
    norm = nn.BatchNorm2d(c_out)
    norm.running_mean.uniform_(-0.2, 0.2)
    norm.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), norm, nn.SiLU())


class Backbone(nn.Module):
    """Strided convolutions to P3, P4, P5, and a neck that feeds each coarser scale back into the finer one."""

    channels = (16, 24, 32)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv(3, 8, stride=2), conv(8, 16, stride=2))
        self.p3, self.p4, self.p5 = conv(16, 16, stride=2), conv(16, 24, stride=2), conv(24, 32, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.merge4, self.merge3 = conv(24 + 32, 24, 1), conv(16 + 24, 16, 1)

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.merge4(torch.cat([p4, self.up(p5)], 1))
        n3 = self.merge3(torch.cat([p3, self.up(n4)], 1))
        return [n3, n4, p5]


def _points(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scale's cell centres in cells (2 x A) and each anchor's stride (1 x A), finest scale first."""
    points, strides = [], []
    for feature, stride in zip(features, STRIDES, strict=True):
        height, width = feature.shape[2:]
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
        points.append(torch.stack([xs, ys]).reshape(2, -1) + 0.5)
        strides.append(torch.full((1, height * width), float(stride)))
    return torch.cat(points, 1), torch.cat(strides, 1)


def separable(c_in: int, c_out: int) -> nn.Sequential:
    """A depthwise 3 x 3 convolution, then a pointwise one (the blocks of YOLOv11's class branch)."""
    depthwise = conv(c_in, c_in)
    depthwise[0] = nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False)
    return nn.Sequential(depthwise, conv(c_in, c_out, 1))


class TinyYoloV8(nn.Module):
    """`separable`: the class branch's blocks are depthwise-separable, as in YOLOv11."""

    def __init__(self, classes: int = 3, bins: int = 4, seed: int = 0, separable_classes: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.classes, self.bins = classes, bins
        self.backbone = Backbone()
        self.cv2 = nn.ModuleList(nn.Sequential(conv(c, 16), conv(16, 16), nn.Conv2d(16, 4 * bins, 1))
                                 for c in Backbone.channels)
        block = separable if separable_classes else conv
        self.cv3 = nn.ModuleList(nn.Sequential(block(c, 16), block(16, 16), nn.Conv2d(16, classes, 1))
                                 for c in Backbone.channels)
        self.register_buffer("weights", torch.arange(bins, dtype=torch.float32).reshape(1, bins, 1, 1))

    def forward(self, x):
        features = self.backbone(x)
        raw = torch.cat([torch.cat([box(f), cls(f)], 1).flatten(2)
                         for f, box, cls in zip(features, self.cv2, self.cv3, strict=True)], 2)
        box, scores = raw.split([4 * self.bins, self.classes], 1)
        if self.bins > 1:  # the expected distance under a softmax over the bins
            bins = box.reshape(-1, 4, self.bins, box.shape[2]).transpose(1, 2).softmax(1)
            distances = (bins * self.weights).sum(1)
        else:
            distances = box.exp()
        points, strides = _points(features)
        near, far = points - distances[:, :2], points + distances[:, 2:]
        boxes = torch.cat([(near + far) / 2, far - near], 1) * strides
        return torch.cat([boxes, scores.sigmoid()], 1)


class TinyYoloV5(nn.Module):
    ANCHORS = ((1.0, 1.5), (2.0, 1.0), (2.5, 3.0))  # anchor boxes per cell, in strides

    def __init__(self, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.classes = classes
        self.backbone = Backbone()
        self.blocks = nn.ModuleList(conv(c, c) for c in Backbone.channels)
        self.predict = nn.ModuleList(nn.Conv2d(c, len(self.ANCHORS) * (5 + classes), 1) for c in Backbone.channels)

    def forward(self, x):
        rows = []
        for feature, block, predict, stride in zip(self.backbone(x), self.blocks, self.predict, STRIDES, strict=True):
            out = predict(block(feature))
            height, width = (int(side) for side in out.shape[2:])  # static: the rows per image stay known
            out = out.reshape(-1, len(self.ANCHORS), 5 + self.classes, height, width).permute(0, 1, 3, 4, 2)
            out = out.sigmoid()
            ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                    torch.arange(width, dtype=torch.float32), indexing="ij")
            cells = torch.stack([xs, ys], -1).reshape(1, 1, height, width, 2)
            sizes = torch.tensor(self.ANCHORS).reshape(1, -1, 1, 1, 2)
            centre = (out[..., :2] * 2 - 0.5 + cells) * stride
            size = (out[..., 2:4] * 2) ** 2 * sizes * stride
            anchors = len(self.ANCHORS) * height * width
            rows.append(torch.cat([centre, size, out[..., 4:]], -1).reshape(-1, anchors, 5 + self.classes))
        return torch.cat(rows, 1)
