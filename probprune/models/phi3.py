"""Phi-3 family (Phi3ForCausalLM): the LLaMA layout with fused projections.

``qkv_proj`` stacks the rows of all query heads, then the KV heads' keys, then their values; ``gate_up_proj`` stacks
all gate rows, then all up rows. The adapter hands out each role as a row range of the fused matrix, so scoring,
gathering and compaction treat them like separate projections. Rotary embeddings may cover only part of each head
(``partial_rotary_factor``); the family's own ``apply_rotary_pos_emb`` handles it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import FamilyAdapter, Part


class Phi3Adapter(FamilyAdapter):
    family = "phi3"
    architectures = ("Phi3ForCausalLM",)

    def attn_in(self, layer: int | nn.Module) -> dict[str, Part]:
        a = self.attention(layer)
        d = self.head_dim
        nq, nkv = a.o_proj.in_features // d, a.num_key_value_heads
        w, b = a.qkv_proj.weight, a.qkv_proj.bias
        q_end, k_end = nq * d, (nq + nkv) * d
        return {
            "q": Part(w, b, slice(0, q_end)),
            "k": Part(w, b, slice(q_end, k_end)),
            "v": Part(w, b, slice(k_end, k_end + nkv * d)),
        }

    def mlp_in(self, layer: int | nn.Module) -> dict[str, Part]:
        m = self.mlp(layer)
        n = m.down_proj.in_features
        w, b = m.gate_up_proj.weight, m.gate_up_proj.bias
        return {"gate": Part(w, b, slice(0, n)), "up": Part(w, b, slice(n, 2 * n))}

    def activation(self, mlp: nn.Module) -> Callable:
        return mlp.activation_fn
