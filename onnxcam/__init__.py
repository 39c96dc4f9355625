"""onnxcam: Grad-CAM and its family on ONNX Runtime, with no PyTorch at explanation time."""

from . import core, exporters, runtimes
from .core import METHODS, overlay
from .explainer import ExplainError, Explainer, Explanation

__all__ = ["METHODS", "ExplainError", "Explainer", "Explanation", "core", "exporters", "overlay", "runtimes"]
__version__ = "0.1.0"
