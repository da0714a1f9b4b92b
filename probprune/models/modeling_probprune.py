"""Pruned LLaMA-family models with per-layer widths.

This file is self-contained on purpose: ``probprune`` copies it next to every pruned checkpoint whose layers are not
all the same shape, and ``config.json`` points ``auto_map`` at it, so the folder loads with stock
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` and without probprune installed.

The layout lives in ``config.probprune_layout``: one entry per kept decoder layer,
``{"num_key_value_heads": int, "num_attention_heads": int, "intermediate_size": int, "source_layer": int}``.
A sublayer with zero heads or zero channels becomes an empty module that adds only its output bias (if any).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


class EmptyAttention(nn.Module):
    """Attention sublayer with no heads left: outputs zeros (plus o_proj's bias, if the model had one).

    It still appends zero-head keys/values to the cache, so the cache reports the right sequence length.
    """

    def __init__(self, hidden_size: int, head_dim: int, layer_idx: int, bias: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.o_bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        b, t, _ = hidden_states.shape
        if cache is not None:
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)  # [B, 0 heads, T, d]
            cache.update(empty, empty, self.layer_idx)
        out = hidden_states.new_zeros(b, t, self.hidden_size)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None


class EmptyMLP(nn.Module):
    """MLP sublayer with no channels left: outputs zeros (plus down_proj's bias, if any)."""

    def __init__(self, hidden_size: int, bias: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.down_bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.hidden_size)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def resize_decoder_layer(layer: nn.Module, config, spec: dict, layer_idx: int) -> None:
    """Give one decoder layer the widths in ``spec`` (fresh weights: callers copy or load them afterwards)."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    hidden = config.hidden_size
    n_kv, n_q, inter = spec["num_key_value_heads"], spec["num_attention_heads"], spec["intermediate_size"]
    if n_kv == 0:
        layer.self_attn = EmptyAttention(hidden, head_dim, layer_idx, bias=attn.o_proj.bias is not None)
    else:
        attn.layer_idx = layer_idx
        attn.q_proj = _linear_like(attn.q_proj, hidden, n_q * head_dim)
        attn.k_proj = _linear_like(attn.k_proj, hidden, n_kv * head_dim)
        attn.v_proj = _linear_like(attn.v_proj, hidden, n_kv * head_dim)
        attn.o_proj = _linear_like(attn.o_proj, n_q * head_dim, hidden)
    if inter == 0:
        layer.mlp = EmptyMLP(hidden, bias=mlp.down_proj.bias is not None)
    else:
        mlp.intermediate_size = inter
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, inter)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, inter)
        mlp.down_proj = _linear_like(mlp.down_proj, inter, hidden)


def base_config(config):
    """The config the stock class is built from: widest layer shapes, so every module can be narrowed from it."""
    cfg = copy.deepcopy(config)
    layout = getattr(config, "probprune_layout", None) or []
    if layout:
        cfg.num_hidden_layers = len(layout)
    return cfg


class _ProbPrunedMixin:
    def _apply_probprune_layout(self, config) -> None:
        layout = getattr(config, "probprune_layout", None)
        if not layout:
            return
        layers = self.model.layers
        if len(layers) != len(layout):
            raise ValueError(f"config has {len(layout)} layout entries for {len(layers)} decoder layers")
        for i, (layer, spec) in enumerate(zip(layers, layout)):
            resize_decoder_layer(layer, config, spec, i)


class ProbPrunedLlamaForCausalLM(_ProbPrunedMixin, LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._apply_probprune_layout(config)


class ProbPrunedMistralForCausalLM(_ProbPrunedMixin, MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._apply_probprune_layout(config)


class ProbPrunedQwen2ForCausalLM(_ProbPrunedMixin, Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._apply_probprune_layout(config)


PRUNED_CLASSES = {
    "LlamaForCausalLM": ProbPrunedLlamaForCausalLM,
    "MistralForCausalLM": ProbPrunedMistralForCausalLM,
    "Qwen2ForCausalLM": ProbPrunedQwen2ForCausalLM,
}
