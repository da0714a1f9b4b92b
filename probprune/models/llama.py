"""LLaMA family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases, per-layer sliding windows).

The common decoder layout of :class:`~probprune.models.base.FamilyAdapter` is exactly theirs: pre-norm blocks,
separate ``q/k/v/o_proj`` and ``gate/up/down_proj``, one rotary table, no embedding scale or logit soft-capping.
"""

from __future__ import annotations

from .base import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    family = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
