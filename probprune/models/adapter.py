"""Model-family adapters: the only place that knows where a family keeps its heads, channels and layers."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..masks import LayerShape, MaskSpace
from .modeling_probprune import EmptyAttention, EmptyMLP


class LlamaAdapter:
    """LLaMA module layout: ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``.

    Covers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases) and their pruned variants.
    """

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ------------------------------------------------------------------------------------------------ modules
    @property
    def base_model(self) -> nn.Module:
        return self.model.model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, i: int) -> nn.Module:
        return self.layers[i].self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.layers[i].mlp

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.config.hidden_size // self.config.num_attention_heads

    @property
    def group_size(self) -> int:
        return self.config.num_attention_heads // self.config.num_key_value_heads

    # ------------------------------------------------------------------------------------------------- shapes
    def layer_shape(self, i: int) -> LayerShape:
        layer, attn, mlp = self.layers[i], self.attention(i), self.mlp(i)
        hidden, d = self.config.hidden_size, self.head_dim
        if isinstance(attn, EmptyAttention):
            n_kv, qkv_bias, o_bias = 0, False, attn.o_bias is not None
        else:
            n_kv = attn.k_proj.out_features // d
            qkv_bias, o_bias = attn.q_proj.bias is not None, attn.o_proj.bias is not None
        if isinstance(mlp, EmptyMLP):
            inter, mlp_bias = 0, mlp.down_bias is not None
        else:
            inter, mlp_bias = mlp.down_proj.in_features, mlp.down_proj.bias is not None
        norm_params = sum(p.numel() for n, p in layer.named_parameters() if "norm" in n)
        return LayerShape(
            num_kv_heads=n_kv,
            group_size=self.group_size,
            head_dim=d,
            hidden_size=hidden,
            intermediate_size=inter,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            norm_params=norm_params,
        )

    def layer_shapes(self) -> list[LayerShape]:
        return [self.layer_shape(i) for i in range(len(self.layers))]

    def mask_space(
        self,
        heads: bool = True,
        channels: bool = True,
        layers: bool = False,
        channel_block: int = 1,
        channel_perm: list[np.ndarray] | None = None,
    ) -> MaskSpace:
        """Build the mask space of this model (see :class:`probprune.masks.MaskSpace`)."""
        total = sum(p.numel() for p in self.model.parameters())  # tied weights are counted once
        return MaskSpace(
            layers=self.layer_shapes(),
            include_heads=heads,
            include_channels=channels,
            include_layers=layers,
            channel_block=channel_block,
            channel_perm=channel_perm,
            total_params=total,
        )


ADAPTERS: dict[str, Callable[[nn.Module], LlamaAdapter]] = {}
for _arch in LlamaAdapter.architectures:
    ADAPTERS[_arch] = LlamaAdapter
    ADAPTERS[f"ProbPruned{_arch}"] = LlamaAdapter


def supported_architectures() -> list[str]:
    return list(LlamaAdapter.architectures)


def architecture_of(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config).__name__
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else type(config).__name__


def check_supported(arch: str) -> None:
    if arch not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported architecture '{arch}': probprune supports {', '.join(supported_architectures())}"
        )


def get_adapter(model: nn.Module) -> LlamaAdapter:
    """Return the adapter for ``model``.

    Raises:
        UnsupportedModelError: the model's class has no adapter; the message lists the supported ones.
    """
    arch = type(model).__name__
    check_supported(arch)
    return ADAPTERS[arch](model)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
