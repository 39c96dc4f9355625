"""The numpy core: class activation map methods, map post-processing and overlays. No I/O."""

from .images import COLORMAPS, overlay, preprocess
from .maps import heatmaps, normalize, upsample
from .methods import METHODS

__all__ = ["COLORMAPS", "METHODS", "heatmaps", "normalize", "overlay", "preprocess", "upsample"]
