"""onnxcam: Grad-CAM and its family on ONNX Runtime, with no PyTorch at explanation time."""

from . import core, exporters, runtimes
from .core import overlay
from .core.contract import ExplainSpec
from .core.errors import ContractError, ExplainError, ExportError, ImageError, OnnxcamError, ProviderError
from .explainer import Explainer
from .explanation import Explanation
from .methods import METHODS

ALL_METHODS = tuple(METHODS)  # the method names, in the registry's order

__all__ = ["ALL_METHODS", "METHODS", "ContractError", "ExplainError", "ExplainSpec", "Explainer", "Explanation",
           "ExportError", "ImageError", "OnnxcamError", "ProviderError", "core", "exporters", "overlay", "runtimes"]
__version__ = "0.1.0"
