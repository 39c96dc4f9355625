"""The bottom layer: the numpy core (the methods' formulas, map post-processing, scores, metrics, overlays), the
contract of an explainable file, the errors a user can act on, and image files. It imports no other layer."""

from .images import COLORMAPS, overlay, preprocess
from .maps import heatmaps, normalize, upsample
from .scores import softmax, top_classes

__all__ = ["COLORMAPS", "heatmaps", "normalize", "overlay", "preprocess", "softmax", "top_classes",
           "upsample"]
