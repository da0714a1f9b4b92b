"""Model adapters (family registry) and loading."""

from .adapter import LlamaAdapter, get_adapter, supported_architectures
from .loading import load_model, tiny_model

__all__ = ["LlamaAdapter", "get_adapter", "supported_architectures", "load_model", "tiny_model"]
