"""onnxcam: Grad-CAM and its family on ONNX Runtime, with no PyTorch at explanation time."""

from . import core, exporters, runtimes
from .contract import ExplainSpec
from .core import METHODS, overlay
from .errors import ContractError, ExplainError, ExportError, ImageError, OnnxcamError, ProviderError
from .explainer import ALL_METHODS, Explainer, Explanation

__all__ = ["ALL_METHODS", "METHODS", "ContractError", "ExplainError", "ExplainSpec", "Explainer", "Explanation",
           "ExportError", "ImageError", "OnnxcamError", "ProviderError", "core", "exporters", "overlay", "runtimes"]
__version__ = "0.1.0"
