"""Sessions, providers, I/O binding and bundles: running explainable files on ONNX Runtime (or OpenVINO)."""

from ..core.errors import ProviderError
from .bundle import Bundle
from .session import PROVIDER_CHOICES, create_session

__all__ = ["PROVIDER_CHOICES", "Bundle", "ProviderError", "create_session"]
