"""onnxcam: Grad-CAM and its family on ONNX Runtime, with no PyTorch at explanation time."""

from . import core, exporters, runtimes
from .core import METHODS, overlay
from .explainer import ALL_METHODS, ExplainError, Explainer, Explanation

__all__ = ["ALL_METHODS", "METHODS", "ExplainError", "Explainer", "Explanation", "core", "exporters", "overlay", "runtimes"]
__version__ = "0.1.0"
