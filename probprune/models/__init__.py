"""Model families (one adapter file each), the family registry, and loading."""

from .base import FamilyAdapter
from .llama import LlamaAdapter
from .loading import load_model, load_pruned, tiny_model
from .registry import FAMILIES, get_adapter, supported_architectures

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "LlamaAdapter",
    "get_adapter",
    "supported_architectures",
    "load_model",
    "load_pruned",
    "tiny_model",
]
