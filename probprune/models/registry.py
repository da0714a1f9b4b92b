"""The family registry: which adapter serves which architecture, and precise refusals for the rest."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import FamilyAdapter
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .phi3 import Phi3Adapter
from .qwen3 import Qwen3Adapter

FAMILIES: tuple[type[FamilyAdapter], ...] = (LlamaAdapter, Qwen3Adapter, Gemma3Adapter, Phi3Adapter)

ADAPTERS: dict[str, type[FamilyAdapter]] = {}
for _family in FAMILIES:
    for _arch in _family.architectures:
        ADAPTERS[_arch] = _family
        ADAPTERS[f"ProbPruned{_arch}"] = _family

# Features no adapter handles, recognised from the config: attribute -> the feature's name.
_UNSUPPORTED_CONFIG = {
    "num_local_experts": "mixture-of-experts MLP",
    "num_experts": "mixture-of-experts MLP",
    "moe_intermediate_size": "mixture-of-experts MLP",
    "cross_attention_layers": "cross-attention layers",
    "vision_config": "a vision encoder (multimodal model)",
    "audio_config": "an audio encoder (multimodal model)",
    "is_encoder_decoder": "an encoder-decoder architecture",
}


def supported_architectures() -> list[str]:
    return [arch for family in FAMILIES for arch in family.architectures]


def architecture_of(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config).__name__
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else type(config).__name__


def unsupported_features(config) -> list[str]:
    """Features of ``config`` that probprune cannot prune correctly (empty when it can)."""
    found = []
    for attr, name in _UNSUPPORTED_CONFIG.items():
        value = getattr(config, attr, None)
        if value and not any(f.startswith(name) for f in found):
            found.append(f"{name} (config.{attr})")
    family = ADAPTERS.get(architecture_of(config))
    if family is not None:
        found += family.unsupported_features(config)
    return found


def check_supported(arch: str, config=None) -> None:
    """Refuse, before any work, an architecture without an adapter or a config with features none handles.

    Raises:
        UnsupportedModelError: naming the feature (when the config shows one) or listing the supported architectures.
    """
    features = unsupported_features(config) if config is not None else []
    if features:
        raise UnsupportedModelError(
            f"unsupported model '{arch}': probprune cannot prune a model with {', '.join(features)}; it supports "
            f"decoder-only {', '.join(supported_architectures())} without those features"
        )
    if arch not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported architecture '{arch}': probprune supports {', '.join(supported_architectures())}"
        )


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """Return the adapter for ``model``.

    Raises:
        UnsupportedModelError: the model's class has no adapter, or its config has a feature no adapter handles.
    """
    arch = type(model).__name__
    check_supported(arch, getattr(model, "config", None))
    return ADAPTERS[arch](model)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
