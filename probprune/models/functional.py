"""Functional decoder-layer forward of the LLaMA family on gathered weight slices.

This is the family knowledge behind :mod:`probprune.fastpath`: where a KV group's rows live in ``q/k/v_proj``, which
``o_proj`` columns belong to it, how a channel maps to ``gate/up`` rows and a ``down_proj`` column, and how the layer
combines norms, attention, RoPE and MLP. Given the kept KV groups and channels of one layer it copies only those weight
slices and runs the layer at the pruned width, so a forward costs what the pruned model costs. The model's modules
are only read: norms, ``act_fn`` and ``rotary_emb`` are called as they are, weights are never written.

Covers LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (q/k/v biases, per-layer sliding windows), stock or
pruned (:class:`~probprune.models.modeling_probprune.EmptyAttention` / ``EmptyMLP`` sublayers).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_probprune import EmptyAttention, EmptyMLP


# ----------------------------------------------------------------------------------------------- gathered weights
@dataclass
class AttentionSlice:
    """Weights of the kept KV groups of one attention sublayer (q, k, v rows fused into one matrix).

    Attributes:
        w_qkv: ``[(n_q + 2 n_kv) d, H]`` rows of q (kept query heads), then k, then v (kept KV heads).
        b_qkv: ``[(n_q + 2 n_kv) d]`` or ``None``.
        w_o: ``[H, n_q d]`` the matching o_proj columns.
        b_o: ``[H]`` or ``None``.
        n_q, n_kv: kept query heads and KV heads.
    """

    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    n_q: int
    n_kv: int


@dataclass
class MLPSlice:
    """Weights of the kept channels of one MLP sublayer (gate and up rows fused into one matrix).

    Attributes:
        w_gate_up: ``[2 c, H]`` gate rows, then up rows, of the kept channels.
        b_gate_up: ``[2 c]`` or ``None``.
        w_down: ``[H, c]`` the matching down_proj columns.
        b_down: ``[H]`` or ``None``.
        n: kept channels ``c``.
    """

    w_gate_up: torch.Tensor
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    n: int


def num_kv_heads(attn: nn.Module) -> int:
    """KV heads of an attention sublayer (0 for a pruned-away one)."""
    if isinstance(attn, EmptyAttention):
        return 0
    return attn.k_proj.out_features // attn.head_dim


def num_channels(mlp: nn.Module) -> int:
    """Intermediate channels of an MLP sublayer (0 for a pruned-away one)."""
    return 0 if isinstance(mlp, EmptyMLP) else mlp.down_proj.in_features


def output_bias_attention(attn: nn.Module) -> torch.Tensor | None:
    """The bias the attention sublayer adds whatever heads are kept (o_proj's bias), or ``None``."""
    return attn.o_bias if isinstance(attn, EmptyAttention) else attn.o_proj.bias


def output_bias_mlp(mlp: nn.Module) -> torch.Tensor | None:
    """The bias the MLP sublayer adds whatever channels are kept (down_proj's bias), or ``None``."""
    return mlp.down_bias if isinstance(mlp, EmptyMLP) else mlp.down_proj.bias


class Workspace:
    """Reusable buffers for gathered weights.

    On CPU a fresh multi-megabyte tensor costs page faults on first touch, which made gathering into new tensors
    ~10x slower than the copy itself; slices are therefore written into buffers that live as long as the workspace.
    A slice returned by :func:`slice_layer` is valid until the next call with the same workspace.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device (contents undefined)."""
        n = 1
        for s in shape:
            n *= s
        key = (name, like.device, like.dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = like.new_empty(n)
            self._bufs[key] = buf
        return buf[:n].view(shape)


def _gather_rows(
    ws: Workspace, name: str, parts: list[tuple[torch.Tensor, torch.Tensor | None]], like: torch.Tensor
) -> torch.Tensor:
    """Concatenate ``src[idx]`` (``src`` itself where ``idx`` is None) for each part into one workspace tensor."""
    n = sum(int(src.shape[0] if idx is None else idx.numel()) for src, idx in parts)
    out = ws.take(name, (n, *like.shape[1:]), like)
    at = 0
    for src, idx in parts:
        k = int(src.shape[0] if idx is None else idx.numel())
        if idx is None:
            out[at : at + k].copy_(src)
        else:
            torch.index_select(src, 0, idx, out=out[at : at + k])
        at += k
    return out


def _gather_cols(w: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``w[:, idx]`` into ``out`` (``[rows, len(idx)]``).

    On CPU ``index_select`` along dim 1 is fast for 4-byte types only; for bf16/fp16 ``gather`` is ~2.5x faster.
    """
    if w.element_size() == 4 or w.device.type != "cpu":
        return torch.index_select(w, 1, idx, out=out)
    return torch.gather(w, 1, idx.expand(w.shape[0], -1), out=out)


def gather_attention(attn: nn.Module, kv_groups: torch.Tensor | None, ws: Workspace) -> AttentionSlice:
    """Copy the weight slices of the kept KV groups of one attention sublayer into ``ws``.

    Args:
        attn: a stock attention module (``q/k/v/o_proj``, ``head_dim``).
        kv_groups: ``[g]`` long, sorted indices of the kept KV groups (on the weights' device), or ``None`` for all;
            group ``j`` owns query heads ``j*group_size .. (j+1)*group_size-1``.
        ws: where the slices are written.

    Returns:
        The gathered slice (o_proj's weight itself when all groups are kept).
    """
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    d = attn.head_dim
    if kv_groups is None:
        q_rows = kv_rows = None
        n_kv, n_q = k.out_features // d, q.out_features // d
    else:
        gs = q.out_features // k.out_features  # query heads per KV head
        offs = torch.arange(d, device=kv_groups.device)
        kv_rows = (kv_groups[:, None] * d + offs).flatten()  # [g d]
        q_heads = (kv_groups[:, None] * gs + torch.arange(gs, device=kv_groups.device)).flatten()  # [g gs]
        q_rows = (q_heads[:, None] * d + offs).flatten()  # [g gs d]
        n_kv, n_q = int(kv_groups.numel()), int(q_heads.numel())
    w_qkv = _gather_rows(ws, "w_qkv", [(q.weight, q_rows), (k.weight, kv_rows), (v.weight, kv_rows)], q.weight)
    b_qkv = None
    if q.bias is not None:
        b_qkv = _gather_rows(ws, "b_qkv", [(q.bias, q_rows), (k.bias, kv_rows), (v.bias, kv_rows)], q.bias)
    if q_rows is None:
        w_o = o.weight
    else:
        w_o = _gather_cols(o.weight, q_rows, ws.take("w_o", (o.out_features, n_q * d), o.weight))
    return AttentionSlice(w_qkv, b_qkv, w_o, o.bias, n_q=n_q, n_kv=n_kv)  # w_o: [H, n_q d]


def gather_mlp(mlp: nn.Module, channels: torch.Tensor | None, ws: Workspace) -> MLPSlice:
    """Copy the weight slices of the kept channels of one MLP sublayer into ``ws``.

    Args:
        mlp: a stock MLP module (``gate/up/down_proj``, ``act_fn``).
        channels: ``[c]`` long indices of the kept intermediate channels (on the weights' device), or ``None`` for
            all.
        ws: where the slices are written.

    Returns:
        The gathered slice (down_proj's weight itself when all channels are kept).
    """
    g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    w_gu = _gather_rows(ws, "w_gu", [(g.weight, channels), (u.weight, channels)], g.weight)
    b_gu = None if g.bias is None else _gather_rows(ws, "b_gu", [(g.bias, channels), (u.bias, channels)], g.bias)
    if channels is None:
        w_down, n = dn.weight, dn.in_features
    else:
        n = int(channels.numel())
        w_down = _gather_cols(dn.weight, channels, ws.take("w_down", (dn.out_features, n), dn.weight))
    return MLPSlice(w_gu, b_gu, w_down, dn.bias, n=n)  # w_down: [H, c]


def slice_layer(
    layer: nn.Module, kv_groups: torch.Tensor, channels: torch.Tensor, ws: Workspace
) -> tuple[AttentionSlice | None, MLPSlice | None]:
    """Gather the kept units of one decoder layer.

    Args:
        layer: the decoder layer.
        kv_groups: ``[g]`` long, sorted kept KV groups (on the weights' device).
        channels: ``[c]`` long, sorted kept channels (on the weights' device).
        ws: where the slices are written (they are valid until the next call with ``ws``).

    Returns:
        ``(attention, mlp)`` slices; ``None`` for a sublayer with nothing kept.
    """
    attn, mlp = layer.self_attn, layer.mlp
    n_kv, n_ch = int(kv_groups.numel()), int(channels.numel())
    a = m = None
    if n_kv > 0:
        a = gather_attention(attn, None if n_kv == num_kv_heads(attn) else kv_groups, ws)
    if n_ch > 0:
        m = gather_mlp(mlp, None if n_ch == num_channels(mlp) else channels, ws)
    return a, m


# --------------------------------------------------------------------------------------------------- attention
def rotary_fn(attn: nn.Module) -> Callable:
    """The family's own ``apply_rotary_pos_emb`` (from the module that defines the attention class)."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    return fn if fn is not None else apply_rotary_pos_emb


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE, identical to the LLaMA family's (fallback when a module does not define one)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def sliding_window(attn: nn.Module) -> int | None:
    """The attention window of one layer: Qwen2 sets it per layer, Mistral in the config, LLaMA has none."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` bool, True where query i may attend key j: causal and ``i - j < window`` (as transformers)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & (j > i - window)


def attention_forward(
    attn: nn.Module,
    x: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    sl: AttentionSlice,
) -> torch.Tensor:
    """Causal self-attention with the gathered heads only.

    Args:
        attn: the attention module (read for ``head_dim``, ``scaling``, its window and its RoPE function).
        x: ``[B, T, H]`` normed hidden states.
        position_embeddings: ``(cos, sin)``, each ``[1 or B, T, d]``.
        sl: the kept heads' weights.

    Returns:
        ``[B, T, H]`` the sublayer output (o_proj applied, bias included).
    """
    b, t, _ = x.shape
    d = attn.head_dim
    qkv = F.linear(x, sl.w_qkv, sl.b_qkv)  # [B, T, (n_q + 2 n_kv) d]
    q, k, v = qkv.split([sl.n_q * d, sl.n_kv * d, sl.n_kv * d], dim=-1)
    q = q.view(b, t, sl.n_q, d).transpose(1, 2)  # [B, n_q, T, d]
    k = k.view(b, t, sl.n_kv, d).transpose(1, 2)  # [B, n_kv, T, d]
    v = v.view(b, t, sl.n_kv, d).transpose(1, 2)  # [B, n_kv, T, d]
    cos, sin = position_embeddings
    q, k = rotary_fn(attn)(q, k, cos, sin)
    window = sliding_window(attn)
    mask = window_mask(t, window, x.device) if window is not None and window < t else None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scaling, enable_gqa=sl.n_q != sl.n_kv
    )  # [B, n_q, T, d]
    out = out.transpose(1, 2).reshape(b, t, sl.n_q * d)  # [B, T, n_q d]
    return F.linear(out, sl.w_o, sl.b_o)  # [B, T, H]


def mlp_forward(mlp: nn.Module, x: torch.Tensor, sl: MLPSlice) -> torch.Tensor:
    """Gated MLP with the gathered channels only: ``down(act(gate(x)) * up(x))``.

    Args:
        mlp: the MLP module (read for ``act_fn``).
        x: ``[B, T, H]`` normed hidden states.
        sl: the kept channels' weights.

    Returns:
        ``[B, T, H]``.
    """
    gu = F.linear(x, sl.w_gate_up, sl.b_gate_up)  # [B, T, 2c]
    gate, up = gu.split(sl.n, dim=-1)  # [B, T, c] each
    return F.linear(mlp.act_fn(gate) * up, sl.w_down, sl.b_down)  # [B, T, H]


# ------------------------------------------------------------------------------------------------ decoder layer
def decoder_layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attn: AttentionSlice | None,
    mlp: MLPSlice | None,
) -> torch.Tensor:
    """One pre-norm decoder layer with only the given slices: ``h += attn(norm1(h)); h += mlp(norm2(h))``.

    A sublayer given as ``None`` has nothing kept: it adds only its output bias (if the model has one), exactly as
    the masked model (all heads or channels zeroed) and the compacted model (``EmptyAttention`` / ``EmptyMLP``) do.

    Args:
        layer: the decoder layer (its norms and modules are read, never written).
        hidden: ``[B, T, H]`` residual stream.
        position_embeddings: ``(cos, sin)`` from the model's ``rotary_emb``.
        attn, mlp: gathered slices, or ``None``.

    Returns:
        ``[B, T, H]`` the new residual stream.
    """
    if attn is not None:
        hidden = hidden + attention_forward(layer.self_attn, layer.input_layernorm(hidden), position_embeddings, attn)
    else:
        bias = output_bias_attention(layer.self_attn)
        if bias is not None:
            hidden = hidden + bias
    if mlp is not None:
        hidden = hidden + mlp_forward(layer.mlp, layer.post_attention_layernorm(hidden), mlp)
    else:
        bias = output_bias_mlp(layer.mlp)
        if bias is not None:
            hidden = hidden + bias
    return hidden
