"""Dense-prediction networks for tests and benchmarks: torchvision's segmenters, and a small U-Net (Ronneberger et
al., arXiv 1505.04597), whose decoder upsamples with transposed convolutions and joins the encoder's maps through
skip connections.

The layout is the common PyTorch one: two Conv3x3-BatchNorm-ReLU per stage, 2x2 max-pooling down, a
ConvTranspose2d up that halves the channels, the skip map concatenated before the stage's convolutions, and a
1x1 convolution to K class maps at the input's resolution (N x K x H x W). Widths and depth are scaled down so
that export and checks take a second or two. BatchNorm gets the zoo's calibration (random affine parameters,
running statistics measured on random inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from .zoo import _calibrate

SEGMENT_CLASSES = 4


class DoubleConv(nn.Sequential):
    """(Conv3x3 - BatchNorm - ReLU) twice."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))


class Up(nn.Module):
    """Upsample by 2 with a transposed convolution to half the channels, join the skip map, DoubleConv.

    `kernel` 2 (stride 2, no padding) is the usual form; 3 upsamples with padding 1 and output_padding 1, the
    form that keeps sizes exact for odd kernels."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int = 2):
        super().__init__()
        extra = {} if kernel == 2 else {"padding": (kernel - 1) // 2, "output_padding": 1}
        self.up = nn.ConvTranspose2d(channels_in, channels_in // 2, kernel, stride=2, **extra)
        self.conv = DoubleConv(channels_in // 2 + channels_out, channels_out)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Three resolutions (H, H/2, H/4), widths 8-16-32; output N x `classes` x H x W."""

    def __init__(self, classes: int = SEGMENT_CLASSES, width: int = 8, kernel: int = 2):
        super().__init__()
        self.inc = DoubleConv(3, width)
        self.pool = nn.MaxPool2d(2)
        self.down1 = DoubleConv(width, 2 * width)
        self.down2 = DoubleConv(2 * width, 4 * width)
        self.up1 = Up(4 * width, 2 * width, kernel)
        self.up2 = Up(2 * width, width, kernel)
        self.outc = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(self.pool(x1))
        x3 = self.down2(self.pool(x2))
        return self.outc(self.up2(self.up1(x3, x2), x1))


def unet(kernel: int = 2, size: int = 64) -> nn.Module:
    """The U-Net with seeded weights, calibrated and in eval mode; `kernel` 3 upsamples with output_padding."""
    torch.manual_seed(0)
    return _calibrate(UNet(kernel=kernel), (3, size, size))


class SegmentationOutput(nn.Module):
    """The segmentation of torchvision's dict output (its `out`), as pytorch-grad-cam's tutorial wraps it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def torchvision_segmenter(name: str, classes: int = 21) -> nn.Module:
    """torchvision.models.segmentation's `name` (fcn_resnet50, deeplabv3_mobilenet_v3_large, lraspp_...) with
    seeded random weights (no download) and BatchNorm running statistics that are not the identity, in eval mode."""
    from .torchvision_shim import import_torchvision

    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=classes)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()
