"""Sessions, providers, and the contract an explainable file carries."""

from .metadata import ExplainSpec
from .session import ProviderError, create_session

__all__ = ["ExplainSpec", "ProviderError", "create_session"]
