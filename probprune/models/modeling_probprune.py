"""Pruned models with per-layer widths (LLaMA, Mistral, Qwen2, Qwen3, Gemma 3 text, Phi-3).

This file is self-contained on purpose: ``probprune`` copies it next to every pruned checkpoint whose layers are not
all the same shape, and ``config.json`` points ``auto_map`` at it, so the folder loads with stock
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` and without probprune installed.

The layout lives in ``config.probprune_layout``: one entry per kept decoder layer,
``{"num_key_value_heads": int, "num_attention_heads": int, "intermediate_size": int, "source_layer": int}``
(``num_attention_heads`` is a multiple of ``num_key_value_heads``; it is the group size times it unless query heads
were pruned inside a single KV group), and optionally ``"o_bias": true`` / ``"down_bias": true`` where an output
bias was added to a model that had none (FLAP's bias compensation).
A sublayer with zero heads or zero channels becomes an empty module that adds only its output bias (if any).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)


class EmptyAttention(nn.Module):
    """Attention sublayer with no heads left: outputs zeros (plus o_proj's bias, if the model had one).

    It still appends zero-head keys/values to the cache, so the cache reports the right sequence length.
    """

    def __init__(self, hidden_size: int, head_dim: int, layer_idx: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.o_bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device)) if bias else None

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

    def __init__(self, hidden_size: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.down_bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.hidden_size)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=bias or old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def resize_decoder_layer(layer: nn.Module, config, spec: dict, layer_idx: int) -> None:
    """Give one decoder layer the widths in ``spec`` (fresh weights: callers copy or load them afterwards).

    Handles separate projections (``q/k/v_proj``, ``gate/up_proj``) and fused ones (``qkv_proj``, ``gate_up_proj``).
    An attention module that reads its head counts from its config gets a copy of the config with this layer's.
    """
    attn, mlp = layer.self_attn, layer.mlp
    ref = next(layer.parameters())  # an added bias takes the layer's dtype and device (a norm's weight)
    like = {"dtype": ref.dtype, "device": ref.device}
    head_dim = attn.head_dim
    hidden = config.hidden_size
    n_kv, n_q, inter = spec["num_key_value_heads"], spec["num_attention_heads"], spec["intermediate_size"]
    if n_kv == 0:
        bias = attn.o_bias is not None if isinstance(attn, EmptyAttention) else attn.o_proj.bias is not None
        layer.self_attn = EmptyAttention(hidden, head_dim, layer_idx, bias=bias or spec.get("o_bias", False), **like)
    else:
        attn.layer_idx = layer_idx
        if hasattr(attn, "qkv_proj"):
            attn.qkv_proj = _linear_like(attn.qkv_proj, hidden, (n_q + 2 * n_kv) * head_dim)
        else:
            attn.q_proj = _linear_like(attn.q_proj, hidden, n_q * head_dim)
            attn.k_proj = _linear_like(attn.k_proj, hidden, n_kv * head_dim)
            attn.v_proj = _linear_like(attn.v_proj, hidden, n_kv * head_dim)
        attn.o_proj = _linear_like(attn.o_proj, n_q * head_dim, hidden, bias=spec.get("o_bias", False))
        attn.num_key_value_groups = n_q // n_kv
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = n_kv
        if getattr(attn, "config", None) is not None:
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads, attn.config.num_key_value_heads = n_q, n_kv
    if inter == 0:
        bias = mlp.down_bias is not None if isinstance(mlp, EmptyMLP) else mlp.down_proj.bias is not None
        layer.mlp = EmptyMLP(hidden, bias=bias or spec.get("down_bias", False), **like)
    else:
        mlp.intermediate_size = inter
        if hasattr(mlp, "gate_up_proj"):
            mlp.gate_up_proj = _linear_like(mlp.gate_up_proj, hidden, 2 * inter)
        else:
            mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, inter)
            mlp.up_proj = _linear_like(mlp.up_proj, hidden, inter)
        mlp.down_proj = _linear_like(mlp.down_proj, inter, hidden, bias=spec.get("down_bias", False))


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


def _pruned_class(base: type) -> type:
    def __init__(self, config):
        base.__init__(self, config)
        self._apply_probprune_layout(config)

    return type(f"ProbPruned{base.__name__}", (_ProbPrunedMixin, base), {"__init__": __init__})


ProbPrunedLlamaForCausalLM = _pruned_class(LlamaForCausalLM)
ProbPrunedMistralForCausalLM = _pruned_class(MistralForCausalLM)
ProbPrunedQwen2ForCausalLM = _pruned_class(Qwen2ForCausalLM)
ProbPrunedQwen3ForCausalLM = _pruned_class(Qwen3ForCausalLM)
ProbPrunedGemma3ForCausalLM = _pruned_class(Gemma3ForCausalLM)
ProbPrunedPhi3ForCausalLM = _pruned_class(Phi3ForCausalLM)

PRUNED_CLASSES = {
    cls.__name__.removeprefix("ProbPruned"): cls
    for cls in (
        ProbPrunedLlamaForCausalLM,
        ProbPrunedMistralForCausalLM,
        ProbPrunedQwen2ForCausalLM,
        ProbPrunedQwen3ForCausalLM,
        ProbPrunedGemma3ForCausalLM,
        ProbPrunedPhi3ForCausalLM,
    )
}
