"""pytorch-grad-cam's utils: images, targets, reshape transforms."""

from . import image, model_targets, reshape_transforms

__all__ = ["image", "model_targets", "reshape_transforms"]
