"""Front ends that make a model explainable, and the differentiation engine behind them.

`export_onnx` needs only onnx; `export_torch` (and the module helpers) import torch on first use.
"""

from ..core.errors import ExportError, UnsupportedOperator
from .onnx_frontend import export_onnx

_TORCH_NAMES = {"export_torch", "default_layer", "module_outputs"}


def __getattr__(name):
    if name in _TORCH_NAMES:
        from . import torch_frontend

        return getattr(torch_frontend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExportError", "UnsupportedOperator", "default_layer", "export_onnx", "export_torch",  # noqa: F822
           "module_outputs"]  # the last three load torch on first use (__getattr__)
