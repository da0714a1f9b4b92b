"""Gemma 3 text family (Gemma3ForCausalLM, the text-only 1B and any Gemma 3 text checkpoint).

What differs from the LLaMA layout:

- four norms per layer ("sandwich"): ``h + post_attention_layernorm(attn(input_layernorm(h)))``, then
  ``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``; the norms scale by ``1 + weight`` and map a
  zero input to zero, so a sublayer with nothing kept still adds nothing;
- per-head RMSNorm of queries and keys before RoPE (weights shared by all heads);
- two rotary tables, one per layer type (``sliding_attention`` layers use a local base, ``full_attention`` the
  global one), and a sliding window on the local layers;
- embeddings scaled by ``sqrt(hidden_size)`` (inside the embedding module), GELU-tanh gating, attention scale
  ``query_pre_attn_scalar ** -0.5``;
- optional final-logit soft-capping ``c · tanh(logits / c)``.

Attention-logit soft-capping and bidirectional attention are not handled (refused before any work). Small Gemma 3
models have one KV head per layer, so a KV group is a layer's whole attention: use query-head units
(``mask.head_unit: query``) to thin attention there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import FamilyAdapter, Rotary


class Gemma3Adapter(FamilyAdapter):
    family = "gemma3"
    architectures = ("Gemma3ForCausalLM",)
    wants_bos = True  # Gemma 3 is trained with <bos> first in every sequence; without it perplexity is ~6x higher
    normed_sublayer_output = True  # post_attention_layernorm / post_feedforward_layernorm before the residual add
    unsupported_config = {
        "attn_logit_softcapping": "attention-logit soft-capping",
        "use_bidirectional_attention": "bidirectional attention",
    }

    def qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(q), attn.k_norm(k)  # [B, n, T, d]: the norm is over d

    def layer_type(self, li: int) -> str | None:
        return self.config.layer_types[li]

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> Rotary:
        rot = self.base_model.rotary_emb
        return {lt: rot(x, position_ids, lt) for lt in sorted(set(self.config.layer_types))}

    def attn_block(self, layer: nn.Module, hidden: torch.Tensor, attend: Callable) -> torch.Tensor:
        return hidden + layer.post_attention_layernorm(attend(layer.input_layernorm(hidden)))

    def mlp_block(self, layer: nn.Module, hidden: torch.Tensor, mlp: Callable) -> torch.Tensor:
        return hidden + layer.post_feedforward_layernorm(mlp(layer.pre_feedforward_layernorm(hidden)))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
