"""Sessions, providers, and the contract an explainable file carries."""

from .bundle import Bundle
from .metadata import ExplainSpec
from .session import ProviderError, create_session

__all__ = ["Bundle", "ExplainSpec", "ProviderError", "create_session"]
