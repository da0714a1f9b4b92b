"""Forward-only reconstruction of the kept weights once the mask is chosen.

The mask decides which heads and channels stay; reconstruction then adjusts what the kept units write to the
residual stream, so that each pruned sublayer's output matches the dense one. Layer by layer, in order, the
calibration blocks run through the pruned model built so far; for every attention or MLP sublayer that lost some
(but not all) of its heads or channels, the kept input columns ``S`` of its output projection (``o_proj`` /
``down_proj``, fused or not: located through the family adapter) are solved for from accumulated statistics of the
projection's inputs ``Z_S`` (tokens × k) and the target ``Y`` (tokens × H):

- ``refit``: ridge least squares toward the original columns ``W_S⁰``,
  ``W_Sᵀ = (Z_SᵀZ_S + λI)⁻¹ (Z_SᵀY + λ W_S⁰ᵀ)``, λ = ``damping`` × the mean diagonal of ``Z_SᵀZ_S``
  (Kwon et al. 2022); no new parameters, so shapes, export and serving stay as they are;
- ``bias``: the columns stay, the output bias gets ``b = mean(Y − Z_S W_S⁰ᵀ)`` (with the ``local`` target this is
  FLAP's compensation ``W_removed · mean(z_removed)``, measured on the pruned model's own inputs);
- ``refit+bias``: both, solved jointly (the ridge problem on centred statistics, then the bias).

Targets: ``local`` — the dense sublayer on the pruned model's own input (``Y = Z_full W⁰ᵀ``); ``dense`` — the dense
model's own sublayer output at that depth (error-correcting: it also undoes the drift of the layers before).
Removed layers (``removed_layers``, after ReplaceMe): a span of removed layers is folded into the ``down_proj`` of
the kept layer before it — its target also carries what the dense span would have added to the residual stream
(exact for pre-norm blocks), so one re-fit replaces the span's linear effect without a new parameter. Families
whose sublayer outputs pass through a norm of their own before the residual add (Gemma 3's sandwich norms:
``FamilyAdapter.normed_sublayer_output``) are not folded: the ``down_proj`` writes before that norm, so the fold
would fit the wrong quantity (Gemma 3 270M, SLEB at 20 %: check-set loss 4.960 as it is, 5.200 folded).
Otherwise a sublayer that lost nothing, or everything, is left exactly as it is (one that lost everything keeps the
output bias the model is returned with, FLAP's compensation: it has no column to re-fit). A bias is a new parameter
where the model has none: the compacted model records it in ``config.probprune_layout`` (it loads with
:func:`probprune.models.load_pruned` and exports to GGUF, but is no longer stock-shaped).

Where the work runs: statistics are weight tasks (``task(model, adapter, *args)``) run on the replicas — this process,
or with ``engine.kind: ray`` the actors, one share of the blocks each — and combined by summing (exact up to the
order of float64 additions); the driver only solves. The calibration activations of each share travel with the
tasks, so a task holds no state between calls and a share can be retried on another actor.

Memory, one sublayer at a time: the driver holds the hidden states of the calibration blocks (``n·T·H`` in the model's
dtype, twice with the ``dense`` target: for 13B, 16,384 tokens × 5,120 × 2 bytes = 168 MB each), the statistics of
one sublayer in float64 — ``Z_SᵀZ_S`` (k²) and ``Z_SᵀY`` (k·H): a 13B ``down_proj`` keeping all 13,824 channels would
be 13,824² × 8 B = 1.5 GB plus 13,824 × 5,120 × 8 B = 0.57 GB, at 50 % a quarter and a half of that — and the solved
columns of the layers done so far (the kept ``o_proj``/``down_proj`` weights, in the model's dtype). Each replica holds
one batch's activations and one copy of the same statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .compaction import surviving_layers
from .engine.tasks import split_shares
from .errors import UserError
from .mask_space import LayerKeep, MaskSpace
from .models import functional as fn
from .models.base import FamilyAdapter

log = logging.getLogger(__name__)

TARGETS = ("local", "dense")
MODES = ("bias", "refit", "refit+bias")
ATTN, MLP = "o_proj", "down_proj"  # the two output projections of a decoder layer
_BIAS_KEY = {ATTN: "o_bias", MLP: "down_bias"}


@dataclass
class Reconstruction:
    """What reconstruction changed, per decoder layer of the model the mask space was built from.

    Attributes:
        weights: ``{layer: {"o_proj" | "down_proj": [H, k]}}`` the new kept input columns, in kept order.
        biases: ``{layer: {"o_proj" | "down_proj": [H]}}`` added to that projection's output bias.
        info: per sublayer ``"layer.which"``: tokens, kept columns, λ, and the relative fit error before/after.
        seconds: wall time of the reconstruction.
    """

    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    biases: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    info: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def changes_nothing(self) -> bool:
        """No weight and no bias changed (e.g. a mask that only removes layers, where they are not folded in)."""
        return not self.weights and not self.biases

    def override(self) -> dict[int, dict[str, torch.Tensor]]:
        """The ``override`` argument of :func:`probprune.compaction.compact` / ``compact_checkpoint``."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for li, parts in self.weights.items():
            out.setdefault(li, {}).update(parts)
        for li, parts in self.biases.items():
            out.setdefault(li, {}).update({_BIAS_KEY[w]: b for w, b in parts.items()})
        return out


# ------------------------------------------------------------------------------------------- one sublayer
def _rotary(adapter: FamilyAdapter, li: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(h.shape[1], device=h.device)[None]  # [1, T]
    return adapter.rotary(h, pos)[adapter.layer_type(li)]


def _full_slice(adapter: FamilyAdapter, layer: nn.Module, which: str, ws: fn.Workspace):
    if which == ATTN:
        return fn.gather_attention(adapter, layer, None, None, ws)
    return fn.gather_mlp(adapter, layer, None, ws)


@dataclass
class _Emptied:
    """A sublayer with nothing kept that still adds an output bias: its own (if any) plus an added one."""

    bias: torch.Tensor  # [H]


def _plus_own(bias: torch.Tensor, own: torch.Tensor | None, dev) -> torch.Tensor:
    """An added output bias plus the sublayer's own (if any), in float64 on ``dev``."""
    return bias.to(dev, torch.float64) + (0.0 if own is None else own.double())


def _emptied(keep: LayerKeep, which: str) -> bool:
    """Whether sublayer ``which`` keeps nothing (no KV head, or no channel)."""
    return (keep.kv_heads if which == ATTN else keep.channels).numel() == 0


def _kept_slice(
    adapter: FamilyAdapter,
    layer: nn.Module,
    which: str,
    keep: LayerKeep,
    ws: fn.Workspace,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
):
    """The kept units' slice of one sublayer, its output columns/bias replaced if given; None where nothing is kept
    and no bias added (the adapter then adds the sublayer's own output bias, if any), :class:`_Emptied` where a
    bias is added to a sublayer with nothing kept (as :func:`probprune.compaction.compact` builds it)."""
    dev = adapter.layer_device(layer)
    keep = LayerKeep(*(t.to(dev) for t in (keep.kv_heads, keep.q_heads, keep.channels)))
    if _emptied(keep, which):
        if bias is None:
            return None
        own = adapter.attn_out_bias(layer) if which == ATTN else adapter.mlp_out_bias(layer)
        return _Emptied(_plus_own(bias, own, dev).to(next(layer.parameters()).dtype))
    if which == ATTN:
        every = keep.kv_heads.numel() == adapter.num_kv_heads(
            layer
        ) and keep.q_heads.numel() == adapter.num_query_heads(layer)
        sl = fn.gather_attention(adapter, layer, None if every else keep.kv_heads, None if every else keep.q_heads, ws)
        w_key, b_key = "w_o", "b_o"
    else:
        every = keep.channels.numel() == adapter.num_channels(layer)
        sl = fn.gather_mlp(adapter, layer, None if every else keep.channels, ws)
        w_key, b_key = "w_down", "b_down"
    new = {}
    if weight is not None:
        new[w_key] = weight.to(dev, getattr(sl, w_key).dtype)
    if bias is not None:
        new[b_key] = _plus_own(bias, getattr(sl, b_key), dev).to(getattr(sl, w_key).dtype)
    return dataclasses.replace(sl, **new) if new else sl


def _sublayer(adapter: FamilyAdapter, layer: nn.Module, li: int, which: str, h: torch.Tensor, sl) -> torch.Tensor:
    """Residual sublayer ``which`` of layer ``li`` on ``h`` ``[B, T, H]`` with slice ``sl`` (None: nothing kept)."""
    if isinstance(sl, _Emptied):  # the sublayer's output is its bias (through the family's norms, as compacted)
        block = adapter.attn_block if which == ATTN else adapter.mlp_block
        return block(layer, h, lambda x: torch.zeros_like(x) + sl.bias.to(x.device))
    if which == ATTN:
        return adapter.attn_sublayer(layer, h, _rotary(adapter, li, h), sl)
    return adapter.mlp_sublayer(layer, h, sl)


def _proj_input(adapter: FamilyAdapter, layer: nn.Module, li: int, which: str, h: torch.Tensor, sl) -> torch.Tensor:
    """The input ``z`` of the sublayer's output projection on residual stream ``h``: ``[B, T, width of sl]``."""
    got = []

    def capture(x: torch.Tensor) -> torch.Tensor:
        if which == ATTN:
            got.append(adapter.attention_heads(layer.self_attn, x, _rotary(adapter, li, h), sl))
        else:
            got.append(adapter.mlp_hidden(layer.mlp, x, sl))
        return x

    (adapter.attn_block if which == ATTN else adapter.mlp_block)(layer, h, capture)
    return got[0]


def _out_columns(sl, which: str) -> torch.Tensor:
    return sl.w_o if which == ATTN else sl.w_down  # [H, width]


def _batches(n: int, batch_size: int):
    for lo in range(0, n, batch_size):
        yield slice(lo, min(lo + batch_size, n))


# --------------------------------------------------------------------------------------------- weight tasks
@torch.no_grad()
def embed_blocks(model: nn.Module, adapter: FamilyAdapter, blocks: torch.Tensor) -> torch.Tensor:
    """``[n, T] -> [n, T, H]`` the input of the first decoder layer (on the CPU, in the model's dtype)."""
    return adapter.embed(blocks.to(adapter.embed_tokens.weight.device)).cpu()


@torch.no_grad()
def out_columns(model: nn.Module, adapter: FamilyAdapter, li: int, which: str, cols: torch.Tensor) -> torch.Tensor:
    """``[H, k]`` float64: the columns ``cols`` of layer ``li``'s output projection ``which``."""
    proj = adapter.attn_out(li) if which == ATTN else adapter.mlp_out(li)
    return proj.weight.detach().index_select(1, cols.to(proj.weight.device)).double().cpu()


@torch.no_grad()
def sublayer_stats(
    model: nn.Module,
    adapter: FamilyAdapter,
    li: int,
    which: str,
    cols: torch.Tensor | None,
    hidden: torch.Tensor,
    dense: torch.Tensor | None,
    gram: bool,
    batch_size: int = 4,
    span: Sequence[int] = (),
) -> tuple[dict | None, torch.Tensor | None]:
    """Statistics of one sublayer's least-squares problem on one share of the blocks (sums: shares add up).

    Args:
        li, which: the layer and its output projection (``"o_proj"`` / ``"down_proj"``).
        cols: ``[k]`` the kept input columns of that projection, or None (no statistics: only ``dense`` advances).
        hidden: ``[n, T, H]`` the pruned model's residual stream before this sublayer.
        dense: ``[n, T, H]`` the dense model's residual stream there (the ``dense`` target), or None (``local``).
        gram: also sum ``Z_SᵀZ_S`` and ``Z_SᵀY`` (the re-fit), not only the means (the bias).
        batch_size: blocks per forward.
        span: removed layers right after this MLP sublayer: the target also carries what they would have added to
            the residual stream (the dense layers run on the same stream), so the re-fit folds them in (ReplaceMe).

    Returns:
        ``(stats, dense_next)``: stats ``{"zz": [k, k], "zy": [k, H], "z": [k], "y": [H], "yy": float, "n": int}``
        (float64 sums over tokens; ``Y`` excludes the projection's own bias) or None; the dense stream after the
        sublayer, or None.
    """
    layer = adapter.layers[li]
    dev = adapter.layer_device(layer)
    ws = fn.Workspace()
    full = _full_slice(adapter, layer, which, ws)
    w0 = _out_columns(full, which)  # [H, width]
    stats = None
    if cols is not None:
        k, hsz = int(cols.numel()), w0.shape[0]
        stats = {
            "z": torch.zeros(k, dtype=torch.float64),
            "y": torch.zeros(hsz, dtype=torch.float64),
            "yy": 0.0,
            "n": 0,
        }
        if gram:
            stats.update(zz=torch.zeros(k, k, dtype=torch.float64), zy=torch.zeros(k, hsz, dtype=torch.float64))
        cols_dev = cols.to(dev)
    dense_next = None if dense is None else torch.empty_like(dense)
    for b in _batches(hidden.shape[0], batch_size):
        if cols is not None:
            z = _proj_input(adapter, layer, li, which, hidden[b].to(dev), full)  # [b, T, width]
            src = z if dense is None else _proj_input(adapter, layer, li, which, dense[b].to(dev), full)
            y = F.linear(src, w0)  # [b, T, H] the target, without the projection's bias
            if span:
                y = y + _span_delta(adapter, li, span, (hidden if dense is None else dense)[b].to(dev), y)
            y = y.flatten(0, 1).float()  # [bT, H]
            zs = z.index_select(-1, cols_dev).flatten(0, 1).float()  # [bT, k]
            stats["z"] += zs.sum(0).double().cpu()
            stats["y"] += y.sum(0).double().cpu()
            stats["yy"] += float(y.double().pow(2).sum())
            stats["n"] += zs.shape[0]
            if gram:  # products in float32 per batch, sums in float64
                stats["zz"] += (zs.T @ zs).double().cpu()
                stats["zy"] += (zs.T @ y).double().cpu()
        if dense is not None:
            dense_next[b] = _sublayer(adapter, layer, li, which, dense[b].to(dev), full).cpu()
    return stats, dense_next


@torch.no_grad()
def sublayer_advance(
    model: nn.Module,
    adapter: FamilyAdapter,
    li: int,
    which: str,
    keep: LayerKeep,
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    batch_size: int = 4,
) -> torch.Tensor:
    """The pruned residual stream ``[n, T, H]`` after sublayer ``which`` of layer ``li``, with its kept output
    columns replaced by ``weight`` ``[H, k]`` and ``bias`` ``[H]`` added (None: as they are)."""
    layer = adapter.layers[li]
    dev = adapter.layer_device(layer)
    sl = _kept_slice(adapter, layer, which, keep, fn.Workspace(), weight, bias)
    out = torch.empty_like(hidden)
    for b in _batches(hidden.shape[0], batch_size):
        out[b] = _sublayer(adapter, layer, li, which, hidden[b].to(dev), sl).cpu()
    return out


def _span_delta(
    adapter: FamilyAdapter, li: int, span: Sequence[int], h: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """What the dense layers ``span`` add to the residual stream after MLP sublayer ``li`` writes ``out`` onto
    ``h``: ``[b, T, H]`` (exact as an addition to the MLP output for pre-norm blocks)."""
    layer = adapter.layers[li]
    start = adapter.mlp_block(layer, h, lambda x: out)  # [b, T, H] the stream after this MLP
    cur, ws = start, fn.Workspace()
    for j in span:
        lj = adapter.layers[j]
        cur = cur.to(adapter.layer_device(lj))
        a = fn.gather_attention(adapter, lj, None, None, ws) if adapter.num_kv_heads(lj) else None
        cur = adapter.attn_sublayer(lj, cur, _rotary(adapter, j, cur), a)
        cur = adapter.mlp_sublayer(lj, cur, fn.gather_mlp(adapter, lj, None, ws) if adapter.num_channels(lj) else None)
    return cur.to(start.device) - start


def merge_sums(parts: Sequence[dict | None]) -> dict | None:
    """Sum the :func:`sublayer_stats` of disjoint shares (every entry is a sum over tokens)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {key: sum(p[key] for p in parts) for key in parts[0]}


# -------------------------------------------------------------------------------------------------- solving
def solve(
    stats: dict, w0: torch.Tensor, mode: str, damping: float
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """Solve one sublayer from its summed statistics (float64).

    Args:
        stats: merged :func:`sublayer_stats` (``zz``/``zy`` needed for the re-fit modes).
        w0: ``[H, k]`` float64 the original kept columns.
        mode: ``"bias"``, ``"refit"`` or ``"refit+bias"``.
        damping: λ relative to the mean diagonal of ``Z_SᵀZ_S`` (centred for ``refit+bias``).

    Returns:
        ``(weight [H, k] or None, bias [H] or None, info)``; info has ``lambda`` and the relative squared error
        ``‖Z_S Wᵀ + b − Y‖² / ‖Y‖²`` before (original columns) and after.
    """
    n = float(stats["n"])
    zbar, ybar = stats["z"] / n, stats["y"] / n  # [k], [H]

    def rel_err(w: torch.Tensor, b: torch.Tensor | None) -> float:
        # ‖ZWᵀ + 1bᵀ − Y‖² = tr(W ZᵀZ Wᵀ) − 2 tr(W ZᵀY) + ‖Y‖² + 2 bᵀ(W Σz − Σy) + n‖b‖²
        if "zz" not in stats:
            return float("nan")
        wf = w.float()  # a diagnostic: float32 is plenty, and H·k² float64 FLOPs per call are not
        e = float((wf @ stats["zz"].float() * wf).sum()) - 2 * float((w * stats["zy"].T).sum()) + stats["yy"]
        if b is not None:
            e = e + 2 * b @ (w @ stats["z"] - stats["y"]) + n * b @ b
        return float(e / max(stats["yy"], 1e-300))

    info = {"tokens": n, "kept": float(w0.shape[1]), "err_before": rel_err(w0, None)}
    if mode == "bias":
        bias = ybar - w0 @ zbar  # [H]
        info.update({"lambda": 0.0, "err_after": rel_err(w0, bias)})
        return None, bias, info
    zz, zy = stats["zz"], stats["zy"]  # [k, k], [k, H]
    if mode == "refit+bias":  # centred problem: the bias absorbs the means
        zz = zz - n * torch.outer(zbar, zbar)
        zy = zy - n * torch.outer(zbar, ybar)
    lam = float(damping) * float(torch.diagonal(zz).mean().clamp_min(0.0))
    a = zz + lam * torch.eye(zz.shape[0], dtype=torch.float64)  # [k, k]
    rhs = zy + lam * w0.T  # [k, H]
    chol, bad = torch.linalg.cholesky_ex(a)
    if int(bad) == 0:
        wt = torch.cholesky_solve(rhs, chol)  # [k, H]
    else:
        wt = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    weight = wt.T.contiguous()  # [H, k]
    bias = ybar - weight @ zbar if mode == "refit+bias" else None
    info.update({"lambda": lam, "err_after": rel_err(weight, bias)})
    return weight, bias, info


# --------------------------------------------------------------------------------------------------- driver
def _check(target: str, mode: str, damping: float) -> None:
    if target not in TARGETS:
        raise UserError(f"reconstruct.target must be one of {', '.join(TARGETS)}, got {target!r}")
    if mode not in MODES:
        raise UserError(f"reconstruct.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not damping >= 0.0:
        raise UserError(f"reconstruct.damping must be >= 0, got {damping!r}")


def _sublayer_work(
    space: MaskSpace, plan: list, li: int, which: str, head_dim: int, removed_layers: bool
) -> tuple[torch.Tensor | None, list[int]]:
    """What reconstruction solves for sublayer ``which`` of layer ``li``: its kept input columns (None where it lost
    nothing and folds no removed layer in, or kept nothing: left as it is) and the removed layers folded into it."""
    keep = plan[li]
    if keep is None:
        return None, []
    cols, span = _cols(keep, which, head_dim), []
    ls = space.layers[li]
    width = ls.num_query_heads * head_dim if which == ATTN else ls.intermediate_size
    if removed_layers and which == MLP and cols.numel():
        j = li + 1
        while j < space.num_layers and plan[j] is None:
            span.append(j)
            j += 1
    if cols.numel() == 0 or (cols.numel() == width and not span):
        return None, span
    return cols, span


def _cols(keep: LayerKeep, which: str, head_dim: int) -> torch.Tensor:
    if which == ATTN:
        return (keep.q_heads[:, None] * head_dim + torch.arange(head_dim)[None]).flatten()  # [n_q d]
    return keep.channels


def reconstruct(
    replicas: Any,
    adapter: FamilyAdapter,
    space: MaskSpace,
    mask: np.ndarray,
    blocks: torch.Tensor,
    target: str = "local",
    mode: str = "refit",
    damping: float = 0.1,
    batch_size: int = 4,
    progress: bool = False,
    removed_layers: bool = False,
    emptied_biases: dict[int, dict[str, torch.Tensor]] | None = None,
) -> Reconstruction:
    """Reconstruct the kept output columns of the model under ``mask`` (see the module docstring).

    Args:
        replicas: where the weights are (an :class:`~probprune.engine.base.Engine`: this process or Ray actors): the
            statistics are computed there, one share of ``blocks`` per replica.
        adapter: the model's adapter (shapes are read; on a driver without weights, the meta skeleton's).
        space: the mask space, ``mask``: ``[N]`` its binary mask.
        blocks: ``[n, T]`` calibration token ids.
        target: ``"local"`` or ``"dense"``; mode: ``"bias"``, ``"refit"`` or ``"refit+bias"``.
        damping: ridge λ relative to the mean diagonal of the Gram matrix.
        batch_size: blocks per forward on a replica.
        progress: a progress bar over the layers.
        removed_layers: fold each span of removed layers into the ``down_proj`` of the kept layer before it
            (ReplaceMe, solved in the space of that MLP's channels: no new parameters); that ``down_proj`` is re-fit
            even where it lost no channel. Ignored (with a warning) for families with normed sublayer outputs.
        emptied_biases: ``{layer: {"o_proj" | "down_proj": [H]}}`` the output biases the model is returned with
            without reconstruction (a baseline's own weight changes: FLAP's compensation). A sublayer with nothing
            kept has no column to re-fit, so it keeps its bias from there (recorded in ``biases``; the layers after
            it are fitted on the stream that includes it); the other entries are replaced by the re-fit.

    Returns:
        The :class:`Reconstruction` (apply it with ``compact(..., override=rec.override())``).

    Raises:
        UserError: an unknown target or mode, a negative damping, or no blocks.
    """
    t0 = time.perf_counter()
    _check(target, mode, damping)
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise UserError(f"reconstruction needs calibration blocks [n, T], got shape {tuple(blocks.shape)}")
    plan = surviving_layers(space, mask)
    removed_layers = removed_layers and folds_removed_layers(adapter, warn=any(k is None for k in plan))
    d = adapter.head_dim
    work = {  # (layer, which) -> (kept columns to solve or None, removed layers to fold in)
        (li, w): _sublayer_work(space, plan, li, w, d, removed_layers)
        for li in range(space.num_layers)
        for w in (ATTN, MLP)
    }
    fixed = {  # sublayers with nothing kept that keep the bias they are returned with
        (li, w): emptied_biases[li][w].float()
        for (li, w) in work
        if plan[li] is not None and _emptied(plan[li], w) and w in (emptied_biases or {}).get(li, {})
    }
    rec = Reconstruction()
    if all(cols is None for cols, _ in work.values()) and not fixed:  # nothing to solve: no forward pass either
        rec.seconds = time.perf_counter() - t0
        return rec
    shares = split_shares(blocks.shape[0], replicas.num_replicas)
    hidden = replicas.map(embed_blocks, [(blocks[lo:hi],) for lo, hi in shares])  # per share [n_s, T, H]
    dense = list(hidden) if target == "dense" else None
    gram = mode != "bias"
    dtype = next(adapter.model.parameters()).dtype  # the solved columns are kept in the model's dtype
    steps = [(li, w) for li in range(space.num_layers) for w in (ATTN, MLP)]
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="reconstruct", unit="sublayer")
    for li, which in steps:
        keep = plan[li]
        cols, span = work[(li, which)]
        weight = bias = None
        if (li, which) in fixed:  # nothing to re-fit: the sublayer keeps the bias it has
            bias = fixed[(li, which)]
            rec.biases.setdefault(li, {})[which] = bias
        if cols is not None or dense is not None:
            args = [
                (li, which, cols, hidden[i], None if dense is None else dense[i], gram, batch_size, span)
                for i in range(len(shares))
            ]
            parts = replicas.map(sublayer_stats, args)
            if dense is not None:
                dense = [p[1] for p in parts]
            stats = merge_sums([p[0] for p in parts])
            if stats is not None:
                w0 = replicas.run(out_columns, li, which, cols)  # [H, k]
                weight, bias, info = solve(stats, w0, mode, damping)
                rec.info[f"{li}.{which}"] = info
                if weight is not None:
                    weight = weight.to(dtype)
                    rec.weights.setdefault(li, {})[which] = weight
                if bias is not None:
                    bias = bias.float()
                    rec.biases.setdefault(li, {})[which] = bias
        if keep is not None:
            hidden = replicas.map(
                sublayer_advance, [(li, which, keep, hidden[i], weight, bias, batch_size) for i in range(len(shares))]
            )
    rec.seconds = time.perf_counter() - t0
    errs = [(v["err_before"], v["err_after"]) for v in rec.info.values() if np.isfinite(v["err_before"])]
    if errs:
        before, after = np.mean(errs, 0)
        log.info(
            "reconstruction (%s, %s, damping %g) of %d sublayers on %d tokens: mean relative error %.4f -> %.4f",
            mode,
            target,
            damping,
            len(rec.info),
            blocks.numel(),
            before,
            after,
        )
    return rec


# ---------------------------------------------------------------------------------------- scoring a result
@torch.no_grad()
def reconstructed_hidden(
    adapter: FamilyAdapter, space: MaskSpace, mask: np.ndarray, rec: Reconstruction | None, input_ids: torch.Tensor
) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm) of the model under ``mask`` with ``rec`` applied, on
    the gathered path (the pruned width only); equals the compacted reconstructed model's."""
    plan = surviving_layers(space, mask)
    h = adapter.embed(input_ids.to(adapter.embed_tokens.weight.device))  # [B, T, H]
    ws = fn.Workspace()
    for li, keep in enumerate(plan):
        if keep is None:
            continue
        layer = adapter.layers[li]
        h = h.to(adapter.layer_device(layer))
        for which in (ATTN, MLP):
            w = None if rec is None else rec.weights.get(li, {}).get(which)
            b = None if rec is None else rec.biases.get(li, {}).get(which)
            h = _sublayer(adapter, layer, li, which, h, _kept_slice(adapter, layer, which, keep, ws, w, b))
    norm = adapter.final_norm
    return norm(h.to(next(norm.parameters()).device))


@torch.no_grad()
def reconstructed_nll(
    model: nn.Module,
    adapter: FamilyAdapter,
    space: MaskSpace,
    mask: np.ndarray,
    rec: Reconstruction | None,
    windows: torch.Tensor,
    batch_size: int = 4,
) -> tuple[float, int]:
    """Weight task: summed next-token cross-entropy (float64) and predicted-token count of the reconstructed model
    on ``windows`` ``[W, T]`` (as :func:`probprune.engine.tasks.window_nll`)."""
    from .losses import next_token_logits, token_losses

    total, count = 0.0, 0
    for b in _batches(windows.shape[0], batch_size):
        x = windows[b]  # [b, T]
        hidden = reconstructed_hidden(adapter, space, mask, rec, x)
        targets = x[:, 1:].reshape(-1)
        for rows, logits in next_token_logits(adapter, hidden):
            total += float(token_losses(logits, targets[rows]).double().sum())
        count += x.shape[0] * (x.shape[1] - 1)
    return total, count


def reconstructed_loss(
    replicas: Any,
    space: MaskSpace,
    mask: np.ndarray,
    rec: Reconstruction | None,
    blocks: torch.Tensor,
    batch_size: int = 4,
) -> float:
    """Mean next-token cross-entropy of the reconstructed model on ``blocks``, the blocks split among the replicas."""
    shares = [
        (space, mask, rec, blocks[lo:hi], batch_size) for lo, hi in split_shares(blocks.shape[0], replicas.num_replicas)
    ]
    parts = replicas.map(reconstructed_nll, shares)
    return sum(p[0] for p in parts) / sum(p[1] for p in parts)


def reconstruct_local(
    model: nn.Module, space: MaskSpace, mask: np.ndarray, blocks: torch.Tensor, **kwargs: Any
) -> Reconstruction:
    """:func:`reconstruct` on a model held by this process."""
    from .engine.local import LocalEngine

    engine = LocalEngine(model, space)
    return reconstruct(engine, engine.adapter, space, mask, blocks, **kwargs)


# -------------------------------------------------------------------------------------------------- pipeline
_WARNED_NO_FOLD: set[str] = set()  # families already warned about in this process (a run reconstructs several times)


def folds_removed_layers(adapter: FamilyAdapter, warn: bool = False) -> bool:
    """Whether removed layers can be folded into the layer before them in this family (pre-norm blocks only).

    ``warn``: say why not, once per family and process."""
    if not adapter.normed_sublayer_output:
        return True
    if warn and adapter.family not in _WARNED_NO_FOLD:
        _WARNED_NO_FOLD.add(adapter.family)
        log.warning(
            "reconstruct.removed_layers: removed layers are not folded in for %s: each sublayer's output passes "
            "through its own norm before the residual stream, so the fold (exact for pre-norm blocks) does not apply",
            adapter.family,
        )
    return False


def for_session(s: Any, mask: np.ndarray, own: Reconstruction | None = None) -> Reconstruction:
    """:func:`reconstruct` of ``mask`` with the settings of ``s.cfg.reconstruct``, on the session's replicas and its
    first ``reconstruct.blocks`` calibration blocks (:func:`session_blocks`). ``own``: the weight changes the model
    is returned with without reconstruction (FLAP's biases): its sublayers with nothing kept keep their biases."""
    r = s.cfg.reconstruct
    blocks = s.calib.first(session_blocks(s))
    return reconstruct(
        s.engine,
        s.adapter,
        s.space,
        mask,
        blocks,
        target=r.target,
        mode=r.mode,
        damping=r.damping,
        batch_size=s.cfg.eval.batch_size,
        progress=s.progress,
        removed_layers=r.removed_layers,
        emptied_biases=None if own is None else own.biases,
    )


def session_blocks(s: Any) -> int:
    """How many calibration blocks reconstruction uses: ``reconstruct.blocks``, at most all but the check set (the
    last ``search.check_blocks`` blocks, which it never sees)."""
    return max(1, min(s.cfg.reconstruct.blocks, len(s.calib) - s.cfg.search.check_blocks))


def choose_final(
    s: Any,
    final: np.ndarray,
    start: np.ndarray,
    check: torch.Tensor,
    start_rec: Reconstruction | None = None,
    start_loss: float | None = None,
    start_refit: tuple[Reconstruction, float] | None = None,
) -> tuple[np.ndarray, Reconstruction | None, dict[str, Any], tuple[np.ndarray, Reconstruction | None]]:
    """:func:`probprune.warmstart.choose_final` over the models as they may be returned: the search's result and its
    start, each as it is and reconstructed, scored on the check set; the lowest loss wins (ties: the search's, then
    the reconstructed one), so reconstruction is kept only where it helps there.

    Args:
        start_rec: the start's own weight changes as its baseline returns it (FLAP's bias compensation), or None;
            its reconstruction replaces them (but for the sublayers with nothing kept, which keep their biases).
        start_loss: the check-set loss of the start as returned (with ``start_rec``), if already measured.
        start_refit: the start's reconstruction and its check-set loss, if already made (by the warm start).

    Returns:
        ``(mask, its reconstruction or None, record, plain)``; record has ``choose_final``'s ``search_loss``,
        ``start_loss`` and ``returned``, plus ``search_loss_reconstructed``, ``start_loss_reconstructed``,
        ``reconstructed`` (whether the returned model is) and ``without_reconstruction`` (which of the two a run
        without reconstruction returns); plain is that model, ``(mask, its weight changes or None)``.
    """
    same = np.array_equal(np.asarray(final), np.asarray(start))
    bs = s.cfg.search.batch_size
    masks = {"search": final, "start": start}
    as_is = {"search": None, "start": start_rec}  # each model as a run without reconstruction returns it
    share = same and start_rec is None  # one mask, one model: a start with biases of its own is another model
    recs, loss = {}, {}
    if start_refit is not None:
        recs["start"], loss[("start", True)] = start_refit
    if share and "start" in recs:
        recs["search"], loss[("search", True)] = recs["start"], loss[("start", True)]
    for name, m in masks.items():
        if name not in recs:
            recs[name] = recs["search"] if share and name == "start" else for_session(s, m, as_is[name])
            loss[(name, True)] = reconstructed_loss(s.engine, s.space, m, recs[name], check, bs)
    loss[("search", False)] = reconstructed_loss(s.engine, s.space, final, None, check, bs)
    if start_loss is not None and start_rec is not None:
        loss[("start", False)] = start_loss
    elif same and start_rec is None:
        loss[("start", False)] = loss[("search", False)]
    else:
        loss[("start", False)] = reconstructed_loss(s.engine, s.space, start, start_rec, check, bs)
    order = [("search", True), ("search", False), ("start", True), ("start", False)]
    name, rec_on = min(order, key=lambda k: (loss[k], order.index(k)))
    if rec_on and recs[name].changes_nothing and as_is[name] is None:
        rec_on = False  # the same model: it is returned as it is, not called reconstructed
    plain = "search" if loss[("search", False)] <= loss[("start", False)] else "start"  # warmstart.choose_final's rule
    log.info(
        "check set: search result %.4f (reconstructed %.4f), start %.4f (reconstructed %.4f): returning the %s%s",
        loss[("search", False)],
        loss[("search", True)],
        loss[("start", False)],
        loss[("start", True)],
        name,
        ", reconstructed" if rec_on else "",
    )
    record = {
        "search_loss": float(loss[("search", False)]),
        "start_loss": float(loss[("start", False)]),
        "search_loss_reconstructed": float(loss[("search", True)]),
        "start_loss_reconstructed": float(loss[("start", True)]),
        "returned": name,
        "reconstructed": rec_on,
        "without_reconstruction": plain,
    }
    chosen = np.asarray(masks[name]), (recs[name] if rec_on else as_is[name])
    return *chosen, record, (np.asarray(masks[plain]), as_is[plain])


def summary_record(s: Any, rec: Reconstruction) -> dict[str, Any]:
    """What ``summary.json`` says about a reconstruction: its settings, the sublayers solved, the mean relative
    fit error before and after (where measured), and its wall time."""
    r = s.cfg.reconstruct
    errs = [(v["err_before"], v["err_after"]) for v in rec.info.values() if np.isfinite(v["err_before"])]
    return {
        "target": r.target,
        "mode": r.mode,
        "damping": r.damping,
        "removed_layers": r.removed_layers and folds_removed_layers(s.adapter),
        "blocks": session_blocks(s),
        "sublayers": len(rec.info),
        "mean_rel_error": [round(float(x), 5) for x in np.mean(errs, 0)] if errs else None,
        "seconds": round(rec.seconds, 2),
    }
