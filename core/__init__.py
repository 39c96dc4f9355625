"""The numpy core: class activation map methods, map post-processing, scores, metrics and overlays. No I/O."""

from .images import COLORMAPS, overlay, preprocess
from .maps import heatmaps, normalize, upsample
from .scores import softmax, top_classes

__all__ = ["COLORMAPS", "heatmaps", "normalize", "overlay", "preprocess", "softmax", "top_classes",
           "upsample"]
