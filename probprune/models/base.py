"""The family adapter: everything probprune needs to know about one model family, behind one interface.

``scoring``, ``compaction``, ``baselines``, ``masked`` and ``fastpath`` never name a module of a model: they ask its
adapter. :class:`FamilyAdapter` implements the common decoder layout (``model.model.layers[i]`` with ``self_attn``
and ``mlp``, pre-norm residual blocks, separate ``q/k/v/o_proj`` and ``gate/up/down_proj``, rotary position
embeddings); a family file (``probprune/models/<family>.py``) subclasses it and overrides what differs: fused
projections, extra norms, activation, per-layer-type rotary tables, embedding scale, logit soft-capping, and the
config features it cannot handle. Adding a family = one such file, one entry in
:data:`probprune.models.registry.FAMILIES`, configs and tests.

Unit → weights: a KV group (or a query head) owns rows of the q/k/v projections and columns of ``o_proj``; an MLP
channel owns rows of the gate/up projections and a column of ``down_proj``. The adapter hands out those projections
as :class:`Part` objects (a parameter, its optional bias and the rows of it that hold the role), so fused
projections (one ``qkv_proj`` / ``gate_up_proj`` matrix) look exactly like separate ones to the rest of probprune.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..mask_space import LayerShape, MaskSpace
from .modeling_probprune import EmptyAttention, EmptyMLP

Rotary = dict  # layer type (None for one shared table) -> (cos, sin), each [1 or B, T, rotary_dim]


@dataclass(frozen=True)
class Part:
    """One role (q, k, v, gate or up) of an input projection: rows ``rows`` of ``weight`` (and of ``bias``)."""

    weight: torch.Tensor  # [out, H] the whole parameter (of a fused projection too)
    bias: torch.Tensor | None
    rows: slice

    @property
    def w(self) -> torch.Tensor:
        return self.weight[self.rows]

    @property
    def b(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[self.rows]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of each head (all of them unless the family rotates
    only part of a head); the fallback when a family's modelling module defines no ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q_out = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)
    k_out = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k_pass], dim=-1)
    return q_out, k_out


def _module(path: str) -> property:
    return property(attrgetter(path), doc=f"``adapter.{path}``")


class FamilyAdapter:
    """Adapter of one loaded model (see the module docstring). Subclasses set :attr:`architectures`."""

    family: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    #: config attributes whose truthy value means a feature this family's adapter cannot handle -> its name
    unsupported_config: ClassVar[dict[str, str]] = {}
    #: the family's documentation prescribes a BOS token at the start of every sequence (``data.bos: auto``)
    wants_bos: ClassVar[bool] = False
    #: each sublayer's output passes through a norm of its own before it joins the residual stream ("sandwich"
    #: norms): a removed layer's effect on the stream cannot be folded into the output projection before it
    normed_sublayer_output: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ------------------------------------------------------------------------------------------- support checks
    @classmethod
    def unsupported_features(cls, config) -> list[str]:
        """Names of the features of ``config`` that this adapter does not handle (empty = supported)."""
        out = []
        for attr, name in cls.unsupported_config.items():
            value = getattr(config, attr, None)
            if value:
                out.append(f"{name} ({attr}={value!r})")
        return out

    # ------------------------------------------------------------------------------------------------- modules
    # where the modules live, as attribute paths from the adapter (a family with another layout overrides them)
    base_model = _module("model.model")
    lm_head = _module("model.lm_head")
    layers = _module("model.model.layers")
    embed_tokens = _module("model.model.embed_tokens")
    final_norm = _module("model.model.norm")

    def layer(self, layer: int | nn.Module) -> nn.Module:
        return self.layers[layer] if isinstance(layer, int) else layer

    def attention(self, layer: int | nn.Module) -> nn.Module:
        return self.layer(layer).self_attn

    def mlp(self, layer: int | nn.Module) -> nn.Module:
        return self.layer(layer).mlp

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.config.hidden_size // self.config.num_attention_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the same in every layer, pruned or not)."""
        return self.config.num_attention_heads // self.config.num_key_value_heads

    # ----------------------------------------------------------------------------------------- unit -> weights
    def attn_in(self, layer: int | nn.Module) -> dict[str, Part]:
        """The q, k and v input projections of a (non-empty) attention sublayer, rows grouped per head."""
        a = self.attention(layer)
        return {r: Part(p.weight, p.bias, slice(None)) for r, p in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj))}

    def attn_out(self, layer: int | nn.Module) -> nn.Linear:
        """The attention output projection; its input columns are grouped per query head."""
        return self.attention(layer).o_proj

    def mlp_in(self, layer: int | nn.Module) -> dict[str, Part]:
        """The gate and up projections of a (non-empty) MLP sublayer, one row per channel."""
        m = self.mlp(layer)
        return {r: Part(p.weight, p.bias, slice(None)) for r, p in (("gate", m.gate_proj), ("up", m.up_proj))}

    def mlp_out(self, layer: int | nn.Module) -> nn.Linear:
        """The MLP output projection; one input column per channel."""
        return self.mlp(layer).down_proj

    def num_kv_heads(self, layer: int | nn.Module) -> int:
        """KV heads of one layer (0 for an attention sublayer pruned away)."""
        if isinstance(self.attention(layer), EmptyAttention):
            return 0
        return self.attn_in(layer)["k"].w.shape[0] // self.head_dim

    def num_query_heads(self, layer: int | nn.Module) -> int:
        """Query heads of one layer (0 for an attention sublayer pruned away)."""
        return self.attn_out(layer).in_features // self.head_dim if self.num_kv_heads(layer) else 0

    def layer_group_size(self, layer: int | nn.Module) -> int:
        """Query heads per KV head in one layer: :attr:`group_size`, unless query heads were pruned inside a single
        KV head."""
        n_kv = self.num_kv_heads(layer)
        return self.num_query_heads(layer) // n_kv if n_kv else self.group_size

    def num_channels(self, layer: int | nn.Module) -> int:
        """MLP channels of one layer (0 for an MLP sublayer pruned away)."""
        return 0 if isinstance(self.mlp(layer), EmptyMLP) else self.mlp_out(layer).in_features

    def attn_out_bias(self, layer: int | nn.Module) -> torch.Tensor | None:
        """The bias the attention sublayer adds whatever heads are kept, or None."""
        a = self.attention(layer)
        return a.o_bias if isinstance(a, EmptyAttention) else self.attn_out(layer).bias

    def mlp_out_bias(self, layer: int | nn.Module) -> torch.Tensor | None:
        """The bias the MLP sublayer adds whatever channels are kept, or None."""
        m = self.mlp(layer)
        return m.down_bias if isinstance(m, EmptyMLP) else self.mlp_out(layer).bias

    # ------------------------------------------------------------------------------------- forward, piecewise
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T] -> [B, T, H]`` the input of the first layer (any embedding scale included)."""
        return self.embed_tokens(input_ids)

    def layer_type(self, li: int) -> str | None:
        """Which rotary table layer ``li`` uses (None: the model has one)."""
        return None

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> Rotary:
        """The rotary tables of every layer type for positions ``position_ids`` ``[1, T]``."""
        return {None: self.base_model.rotary_emb(x, position_ids)}

    def rotary_fn(self, attn: nn.Module) -> Callable:
        """The family's own ``apply_rotary_pos_emb`` (from the module that defines the attention class)."""
        fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        return fn if fn is not None else apply_rotary_pos_emb

    def qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head normalisation of queries and keys ``[B, n, T, d]`` before RoPE (none in this layout)."""
        return q, k

    def sliding_window(self, attn: nn.Module) -> int | None:
        """The attention window of one layer (None: full causal attention)."""
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(getattr(attn, "config", None), "sliding_window", None)

    def activation(self, mlp: nn.Module) -> Callable:
        return mlp.act_fn

    def attn_block(self, layer: nn.Module, hidden: torch.Tensor, attend: Callable) -> torch.Tensor:
        """Residual attention block: ``h + attend(norm(h))`` (pre-norm)."""
        return hidden + attend(layer.input_layernorm(hidden))

    def mlp_block(self, layer: nn.Module, hidden: torch.Tensor, mlp: Callable) -> torch.Tensor:
        """Residual MLP block: ``h + mlp(norm(h))`` (pre-norm)."""
        return hidden + mlp(layer.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head`` logits of final hidden states ``[..., H] -> [..., V]`` (any soft-capping included)."""
        return self.lm_head(hidden)

    def layer_device(self, layer: nn.Module) -> torch.device:
        return next(layer.parameters()).device

    # ------------------------------------------------------------------------------------------------ shapes
    def layer_shape(self, i: int) -> LayerShape:
        layer = self.layers[i]
        hidden, d = self.config.hidden_size, self.head_dim
        n_kv = self.num_kv_heads(i)
        qkv_bias = n_kv > 0 and self.attn_in(i)["q"].bias is not None
        n_ch = self.num_channels(i)
        attn = self.attention(i)
        in_attn = {id(p) for p in attn.parameters()}
        norm_params = sum(p.numel() for n, p in layer.named_parameters() if "norm" in n and id(p) not in in_attn)
        attn_fixed = sum(p.numel() for n, p in attn.named_parameters() if "norm" in n)
        return LayerShape(
            num_kv_heads=n_kv,
            group_size=self.layer_group_size(i),
            head_dim=d,
            hidden_size=hidden,
            intermediate_size=n_ch,
            qkv_bias=qkv_bias,
            o_bias=self.attn_out_bias(i) is not None,
            mlp_bias=self.mlp_out_bias(i) is not None,
            norm_params=norm_params,
            attn_fixed=attn_fixed,
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
        query_heads: bool = False,
    ) -> MaskSpace:
        """Build the mask space of this model (see :class:`probprune.mask_space.MaskSpace`)."""
        total = sum(p.numel() for p in self.model.parameters())  # tied weights are counted once
        return MaskSpace(
            layers=self.layer_shapes(),
            include_heads=heads,
            include_channels=channels,
            include_layers=layers,
            channel_block=channel_block,
            channel_perm=channel_perm,
            total_params=total,
            query_heads=query_heads,
        )

    # ---------------------------------------------------------------------------------------- gathered forward
    def attention_forward(
        self, attn: nn.Module, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], sl
    ) -> torch.Tensor:
        """Causal self-attention on gathered weights (:class:`probprune.models.functional.AttentionSlice`).

        Args:
            attn: the attention module (read for ``head_dim``, ``scaling``, q/k norms, window, RoPE function).
            x: ``[B, T, H]`` normed hidden states.
            rot: ``(cos, sin)`` of this layer.
            sl: the kept heads' weights.

        Returns:
            ``[B, T, H]`` the sublayer output (output projection applied, bias included).
        """
        return F.linear(self.attention_heads(attn, x, rot, sl), sl.w_o, sl.b_o)  # [B, T, H]

    def attention_heads(
        self, attn: nn.Module, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], sl
    ) -> torch.Tensor:
        """The input of the output projection in :meth:`attention_forward`: ``[B, T, n_q d]``, head by head."""
        b, t, _ = x.shape
        d = attn.head_dim
        qkv = F.linear(x, sl.w_qkv, sl.b_qkv)  # [B, T, (n_q + 2 n_kv) d]
        q, k, v = qkv.split([sl.n_q * d, sl.n_kv * d, sl.n_kv * d], dim=-1)
        q = q.view(b, t, sl.n_q, d).transpose(1, 2)  # [B, n_q, T, d]
        k = k.view(b, t, sl.n_kv, d).transpose(1, 2)  # [B, n_kv, T, d]
        v = v.view(b, t, sl.n_kv, d).transpose(1, 2)  # [B, n_kv, T, d]
        q, k = self.qk_norm(attn, q, k)
        cos, sin = rot
        q, k = self.rotary_fn(attn)(q, k, cos, sin)
        window = self.sliding_window(attn)
        mask = window_mask(t, window, x.device) if window is not None and window < t else None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scaling, enable_gqa=sl.n_q != sl.n_kv
        )  # [B, n_q, T, d]
        return out.transpose(1, 2).reshape(b, t, sl.n_q * d)  # [B, T, n_q d]

    def mlp_forward(self, mlp: nn.Module, x: torch.Tensor, sl) -> torch.Tensor:
        """Gated MLP on gathered channels: ``down(act(gate(x)) * up(x))``. ``[B, T, H] -> [B, T, H]``."""
        return F.linear(self.mlp_hidden(mlp, x, sl), sl.w_down, sl.b_down)  # [B, T, H]

    def mlp_hidden(self, mlp: nn.Module, x: torch.Tensor, sl) -> torch.Tensor:
        """The input of the output projection in :meth:`mlp_forward`: ``act(gate(x)) * up(x)``, ``[B, T, c]``."""
        gu = F.linear(x, sl.w_gate_up, sl.b_gate_up)  # [B, T, 2c]
        gate, up = gu.split(sl.n, dim=-1)  # [B, T, c] each
        return self.activation(mlp)(gate) * up

    def layer_forward(
        self, layer: nn.Module, hidden: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], attn, mlp
    ) -> torch.Tensor:
        """One decoder layer with only the gathered slices (``None``: nothing kept in that sublayer).

        A sublayer with nothing kept adds only its output bias (if the model has one), exactly as the masked model
        (all heads or channels zeroed) and the compacted model (``EmptyAttention`` / ``EmptyMLP``) do.

        Args:
            layer: the decoder layer (its norms and modules are read, never written).
            hidden: ``[B, T, H]`` residual stream.
            rot: ``(cos, sin)`` of this layer's rotary table.
            attn, mlp: gathered slices, or ``None``.

        Returns:
            ``[B, T, H]`` the new residual stream.
        """
        return self.mlp_sublayer(layer, self.attn_sublayer(layer, hidden, rot, attn), mlp)

    def attn_sublayer(
        self, layer: nn.Module, hidden: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], attn
    ) -> torch.Tensor:
        """The attention half of :meth:`layer_forward`: ``[B, T, H] -> [B, T, H]``."""
        if attn is not None:
            return self.attn_block(layer, hidden, lambda x: self.attention_forward(layer.self_attn, x, rot, attn))
        bias = self.attn_out_bias(layer)
        return hidden if bias is None else self.attn_block(layer, hidden, lambda x: torch.zeros_like(x) + bias)

    def mlp_sublayer(self, layer: nn.Module, hidden: torch.Tensor, mlp) -> torch.Tensor:
        """The MLP half of :meth:`layer_forward`: ``[B, T, H] -> [B, T, H]``."""
        if mlp is not None:
            return self.mlp_block(layer, hidden, lambda x: self.mlp_forward(layer.mlp, x, mlp))
        bias = self.mlp_out_bias(layer)
        return hidden if bias is None else self.mlp_block(layer, hidden, lambda x: torch.zeros_like(x) + bias)

    # ---------------------------------------------------------------------------------------- pruned models
    def stock_class(self, arch: str) -> type:
        import transformers

        return getattr(transformers, arch)


def window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` bool, True where query i may attend key j: causal and ``i - j < window`` (as transformers)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & (j > i - window)
