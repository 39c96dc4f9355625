"""pytorch-grad-cam's reshape transforms: ViT's and Swin's become onnxcam layouts (tokens:1:HxW, and B x N x C tokens
on their grid), found by applying them (exports.recognised_layout)."""

from __future__ import annotations

from ....core.errors import ExportError


def vit_reshape_transform(tensor, height=14, width=14):
    """B x (1 + H*W) x C tokens -> B x C x H x W, the CLS token dropped."""
    return tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2)).permute(0, 3, 1, 2)


def swinT_reshape_transform(tensor, height=7, width=7):  # noqa: N802 - pytorch-grad-cam's name
    """B x H*W x C tokens -> B x C x H x W."""
    return tensor.reshape(tensor.size(0), height, width, tensor.size(2)).permute(0, 3, 1, 2)


def fasterrcnn_reshape_transform(x):
    """Refused: the Faster R-CNN it serves does not export to an explainable file."""
    raise ExportError("fasterrcnn_reshape_transform serves torchvision's Faster R-CNN, which does not export to an "
                      "explainable ONNX file here: use pytorch-grad-cam itself for it")
