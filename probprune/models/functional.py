"""Gathered weight slices: the kept heads and channels of one decoder layer, copied into reusable buffers.

Given what a mask keeps of a layer (:class:`probprune.mask_space.LayerKeep`), :func:`slice_layer` copies only those rows
and columns of the layer's projections (located through the family adapter, fused or not), so
:meth:`probprune.models.base.FamilyAdapter.layer_forward` runs the layer at the pruned width and a forward costs what
the pruned model costs. Weights are only read, never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..mask_space import LayerKeep

if TYPE_CHECKING:
    from .base import FamilyAdapter


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


class Workspace:
    """Reusable buffers for gathered weights.

    On CPU a fresh multi-megabyte tensor costs page faults on first touch, which can cost far more than the copy
    itself; slices are therefore written into buffers that live as long as the workspace.
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

    On CPU ``index_select`` along dim 1 is fast for 4-byte types only; for bf16/fp16 ``gather`` is faster
    (``benchmarks/fastpath.py``).
    """
    if w.element_size() == 4 or w.device.type != "cpu":
        return torch.index_select(w, 1, idx, out=out)
    return torch.gather(w, 1, idx.expand(w.shape[0], -1), out=out)


def _head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    """Rows (or columns) of heads ``heads`` in a projection laid out head by head: ``[len(heads) * d]``."""
    return (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()


def gather_attention(
    adapter: FamilyAdapter, layer: nn.Module, kv_heads: torch.Tensor | None, q_heads: torch.Tensor | None, ws: Workspace
) -> AttentionSlice:
    """Copy the weight slices of the kept heads of one attention sublayer into ``ws``.

    Args:
        adapter: the model's adapter (where q/k/v and the output projection live, fused or not).
        layer: the decoder layer.
        kv_heads: ``[g]`` long, sorted kept KV heads (on the weights' device), or ``None`` for all.
        q_heads: ``[q]`` long, sorted kept query heads, all of kept KV heads, the same number per kept KV head
            (``None`` for all, with ``kv_heads`` None).
        ws: where the slices are written.

    Returns:
        The gathered slice (the output projection's weight itself when all heads are kept).
    """
    parts, o = adapter.attn_in(layer), adapter.attn_out(layer)
    d = adapter.head_dim
    q, k, v = parts["q"], parts["k"], parts["v"]
    if kv_heads is None:
        q_rows = kv_rows = None
        n_kv, n_q = k.w.shape[0] // d, q.w.shape[0] // d
    else:
        kv_rows, q_rows = _head_rows(kv_heads, d), _head_rows(q_heads, d)
        n_kv, n_q = int(kv_heads.numel()), int(q_heads.numel())
    w_qkv = _gather_rows(ws, "w_qkv", [(q.w, q_rows), (k.w, kv_rows), (v.w, kv_rows)], q.weight)
    b_qkv = None
    if q.bias is not None:
        b_qkv = _gather_rows(ws, "b_qkv", [(q.b, q_rows), (k.b, kv_rows), (v.b, kv_rows)], q.bias)
    if q_rows is None:
        w_o = o.weight
    else:
        w_o = _gather_cols(o.weight, q_rows, ws.take("w_o", (o.out_features, n_q * d), o.weight))
    return AttentionSlice(w_qkv, b_qkv, w_o, o.bias, n_q=n_q, n_kv=n_kv)  # w_o: [H, n_q d]


def gather_mlp(adapter: FamilyAdapter, layer: nn.Module, channels: torch.Tensor | None, ws: Workspace) -> MLPSlice:
    """Copy the weight slices of the kept channels of one MLP sublayer into ``ws``.

    Args:
        adapter: the model's adapter (where gate/up and the output projection live, fused or not).
        layer: the decoder layer.
        channels: ``[c]`` long indices of the kept intermediate channels (on the weights' device), or ``None`` for
            all.
        ws: where the slices are written.

    Returns:
        The gathered slice (the output projection's weight itself when all channels are kept).
    """
    parts, dn = adapter.mlp_in(layer), adapter.mlp_out(layer)
    g, u = parts["gate"], parts["up"]
    w_gu = _gather_rows(ws, "w_gu", [(g.w, channels), (u.w, channels)], g.weight)
    b_gu = None if g.bias is None else _gather_rows(ws, "b_gu", [(g.b, channels), (u.b, channels)], g.bias)
    if channels is None:
        w_down, n = dn.weight, dn.in_features
    else:
        n = int(channels.numel())
        w_down = _gather_cols(dn.weight, channels, ws.take("w_down", (dn.out_features, n), dn.weight))
    return MLPSlice(w_gu, b_gu, w_down, dn.bias, n=n)  # w_down: [H, c]


def slice_layer(
    adapter: FamilyAdapter, layer: nn.Module, keep: LayerKeep, ws: Workspace
) -> tuple[AttentionSlice | None, MLPSlice | None]:
    """Gather the kept units of one decoder layer.

    Args:
        adapter: the model's adapter.
        layer: the decoder layer.
        keep: what the mask keeps of it (index tensors on the weights' device).
        ws: where the slices are written (they are valid until the next call with ``ws``).

    Returns:
        ``(attention, mlp)`` slices; ``None`` for a sublayer with nothing kept.
    """
    n_kv, n_q, n_ch = int(keep.kv_heads.numel()), int(keep.q_heads.numel()), int(keep.channels.numel())
    a = m = None
    if n_kv > 0:
        every = n_kv == adapter.num_kv_heads(layer) and n_q == adapter.num_query_heads(layer)
        a = gather_attention(adapter, layer, None if every else keep.kv_heads, None if every else keep.q_heads, ws)
    if n_ch > 0:
        m = gather_mlp(adapter, layer, None if n_ch == adapter.num_channels(layer) else keep.channels, ws)
    return a, m
