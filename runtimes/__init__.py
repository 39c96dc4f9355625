"""Sessions, providers, I/O binding and bundles: running explainable files on ONNX Runtime (or OpenVINO)."""

from ..core.errors import ProviderError
from .bundle import Bundle
from .session import create_session

__all__ = ["Bundle", "ProviderError", "create_session"]
