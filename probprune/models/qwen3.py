"""Qwen3 family (Qwen3ForCausalLM): the LLaMA layout plus a per-head RMSNorm of queries and keys before RoPE.

The q/k norms act on each head's ``head_dim`` vector with weights shared by all heads, so they are unchanged by
removing heads. Sliding-window layers (``layer_types``) carry their window on the attention module.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FamilyAdapter


class Qwen3Adapter(FamilyAdapter):
    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)

    def qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(q), attn.k_norm(k)  # [B, n, T, d]: the norm is over d
