"""Importance scores of prunable units: one function per metric, each a ``[N]`` array over a :class:`MaskSpace`.

Higher = more important (keep). The criteria (:data:`CRITERIA`, one name each, used by the baselines, the search's
initialisation and the warm start) and what they score:

- ``wanda-sp`` (Wanda-sp, the paper's init): ``Σ_j Σ_i |W[i, j]|·‖X_j‖₂`` over the input columns j of ``o_proj`` (head
  groups) or ``down_proj`` (channels) a unit owns.
- ``magnitude``: L2 norm of every weight a unit owns.
- ``flap`` (FLAP, An et al. 2024): fluctuation ``Var_tokens(X_j)·‖W[:, j]‖₂²``, standardised per unit type across all
  layers.
- ``taylor`` (LLM-Pruner-style first order, **uses gradients**): ``Σ_w |w·∂L/∂w|`` over a unit's weights.
- ``block-influence`` (ShortGPT): ``1 − E_tokens cos(layer input, layer output)``, layer units only.

Ownership (the same as the costs in :mod:`probprune.mask_space`): a head group owns its query heads' q rows, its k/v rows
(and their biases) and its query heads' columns of the attention output projection (a query-head unit: its own q rows
and output columns and an equal share of its KV head's k/v rows); a channel owns its gate/up rows (and their biases)
and its column of the MLP output projection; a layer owns all its parameters. The family adapter says where those
rows and columns live (:class:`probprune.models.base.FamilyAdapter`, fused projections included); below, ``o_proj``
and ``down_proj`` name the attention and MLP output projections whatever the family calls them.

Calibration statistics come from :func:`collect_input_stats`, one forward pass over the blocks. Its ``stats`` dict::

    {
      "o_proj":    [None | {"sumsq": [C] float64, "sum": [C] float64, "count": int}] * L,   # C = H_q * head_dim
      "down_proj": [None | {"sumsq": [I] float64, "sum": [I] float64, "count": int}] * L,
      "cos":       [L] float64, mean over tokens of cos(layer input, layer output),
      "tokens":    int,
    }

``None`` marks a layer whose attention / MLP is an empty module (a pruned model with no heads / channels left there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .mask_space import CHANNEL, HEAD, LAYER, MaskSpace
from .models.base import FamilyAdapter
from .models.registry import model_device


# ------------------------------------------------------------------------------------------- calibration stats
def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect_input_stats(adapter: FamilyAdapter, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Per-column input statistics of every ``o_proj`` / ``down_proj`` and per-layer input/output cosine.

    One forward pass over ``blocks`` with pre-hooks on the projections (float64 sums of squares, sums, token counts)
    and forward hooks on the decoder layers (cosine of each token's hidden state before and after the layer).
    Hooks are removed on exit; the model is not changed.

    Args:
        adapter: the model's adapter.
        blocks: ``[n, T]`` token ids.
        batch_size: sequences per forward.

    Returns:
        The ``stats`` dict described in the module docstring.

    Raises:
        ValueError: ``blocks`` is not a non-empty 2-D tensor, or ``batch_size < 1``.
    """
    from tqdm.auto import tqdm

    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty [n, T] tensor, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_layers = len(adapter.layers)
    acc: dict[str, list] = {"o_proj": [None] * n_layers, "down_proj": [None] * n_layers}
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    cos_cnt = torch.zeros(n_layers, dtype=torch.float64)

    def column_hook(key: str, li: int):
        def hook(mod, args):
            x = args[0].detach().to(torch.float64)  # [B, T, C]
            x = x.reshape(-1, x.shape[-1])  # [B*T, C]
            entry = acc[key][li]
            if entry is None:
                entry = acc[key][li] = {
                    "sumsq": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                    "sum": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                    "count": 0,
                }
            entry["sumsq"] += (x * x).sum(0)
            entry["sum"] += x.sum(0)
            entry["count"] += x.shape[0]

        return hook

    def layer_hook(li: int):
        def hook(mod, args, kwargs, output):
            h_in, h_out = _hidden_in(args, kwargs), _hidden_out(output)  # [B, T, H] each
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [B, T]
            cos_sum[li] += float(cos.double().sum())
            cos_cnt[li] += cos.numel()

        return hook

    handles = []
    try:
        for li, layer in enumerate(adapter.layers):
            if adapter.num_kv_heads(li):
                handles.append(adapter.attn_out(li).register_forward_pre_hook(column_hook("o_proj", li)))
            if adapter.num_channels(li):
                handles.append(adapter.mlp_out(li).register_forward_pre_hook(column_hook("down_proj", li)))
            handles.append(layer.register_forward_hook(layer_hook(li), with_kwargs=True))
        dev = model_device(adapter.model)
        for s in tqdm(range(0, blocks.shape[0], batch_size), desc="calibration stats", leave=False):
            adapter.base_model(input_ids=blocks[s : s + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    def to_numpy(entry):
        if entry is None:
            return None
        return {"sumsq": entry["sumsq"].cpu().numpy(), "sum": entry["sum"].cpu().numpy(), "count": int(entry["count"])}

    return {
        "o_proj": [to_numpy(e) for e in acc["o_proj"]],
        "down_proj": [to_numpy(e) for e in acc["down_proj"]],
        "cos": (cos_sum / cos_cnt.clamp_min(1)).numpy(),
        "tokens": int(blocks.numel()),
    }


def column_norm(entry: dict) -> np.ndarray:
    """``[C]`` ‖X_j‖₂ over all calibration tokens of each input column."""
    return np.sqrt(np.asarray(entry["sumsq"], dtype=np.float64))


def column_mean(entry: dict) -> np.ndarray:
    """``[C]`` mean over tokens of each input column."""
    return np.asarray(entry["sum"], dtype=np.float64) / max(int(entry["count"]), 1)


def column_var(entry: dict) -> np.ndarray:
    """``[C]`` population variance over tokens of each input column (``E[x²] − E[x]²``, clamped at 0)."""
    n = max(int(entry["count"]), 1)
    mean = np.asarray(entry["sum"], dtype=np.float64) / n
    return np.maximum(np.asarray(entry["sumsq"], dtype=np.float64) / n - mean * mean, 0.0)


def _check_stats(adapter: FamilyAdapter, stats: dict) -> None:
    n_layers = len(adapter.layers)
    for key in ("o_proj", "down_proj"):
        if key not in stats or len(stats[key]) != n_layers:
            raise ValueError(f"stats['{key}'] must list {n_layers} layers (use collect_input_stats)")


# -------------------------------------------------------------------------------------- per-layer raw scores
def _weight(linear: nn.Linear) -> np.ndarray:
    return linear.weight.detach().to(torch.float64).cpu().numpy()


def _column_scores(
    adapter: FamilyAdapter, stats: dict, per_column: Callable[[np.ndarray, dict], np.ndarray], heads_per_unit: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer: head-unit scores ``[U_l]`` and channel scores ``[I_l]`` from a per-input-column metric.

    ``per_column(W, entry)`` maps a weight ``[out, C]`` and its input stats to ``[C]`` column scores; a head unit's
    score is the sum over the output-projection columns of its ``heads_per_unit`` query heads (0: a whole KV group).
    """
    _check_stats(adapter, stats)
    heads, chans = [], []
    for li in range(len(adapter.layers)):
        if adapter.num_kv_heads(li):
            per = heads_per_unit or adapter.layer_group_size(li)
            width = per * adapter.head_dim  # output-projection columns per head unit
            entry = stats["o_proj"][li]
            if entry is None:
                raise ValueError(f"stats have no attention-output statistics for layer {li}")
            col = per_column(_weight(adapter.attn_out(li)), entry)  # [n_q * d]
            heads.append(col.reshape(-1, width).sum(1))
        else:
            heads.append(np.zeros(0))
        if adapter.num_channels(li):
            entry = stats["down_proj"][li]
            if entry is None:
                raise ValueError(f"stats have no MLP-output statistics for layer {li}")
            chans.append(per_column(_weight(adapter.mlp_out(li)), entry))  # [I]
        else:
            chans.append(np.zeros(0))
    return heads, chans


def _heads_per_unit(adapter: FamilyAdapter, space: MaskSpace) -> int:
    """Query heads per head unit: 1 for query-head units, 0 for KV groups (each layer's own group size)."""
    return 1 if space.query_heads else 0


def _wanda_column(w: np.ndarray, entry: dict) -> np.ndarray:
    return np.abs(w).sum(0) * column_norm(entry)  # [C]: Σ_i |W[i, j]| · ‖X_j‖


def _flap_column(w: np.ndarray, entry: dict) -> np.ndarray:
    return column_var(entry) * (w * w).sum(0)  # [C]: Var(X_j) · ‖W[:, j]‖²


def _owned_sums(
    adapter: FamilyAdapter, value: Callable[[nn.Parameter], torch.Tensor], query_heads: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Sum an element-wise ``value(param)`` (same shape as the param) over what each unit owns.

    A head unit is a KV group (its query heads' q rows and output columns, its k/v rows) or, with ``query_heads``,
    one query head (its q rows and output columns, and an equal share of its KV head's k/v rows).

    Returns:
        per layer head-unit sums ``[U_l]``, per layer channel sums ``[I_l]``, and ``[L]`` sums over each whole layer.
    """
    d = adapter.head_dim
    heads, chans, layers = [], [], []

    def v(p: torch.Tensor) -> torch.Tensor:
        return value(p).detach().to(torch.float64)  # on the parameter's device; only sums move to the CPU

    def rows(part) -> torch.Tensor:
        return v(part.weight)[part.rows]

    for li, layer in enumerate(adapter.layers):
        g = adapter.num_kv_heads(li)
        if g:
            gs = adapter.layer_group_size(li)
            parts, o = adapter.attn_in(li), adapter.attn_out(li)
            per = 1 if query_heads else gs  # query heads per unit
            n = g * gs // per  # head units in the layer
            h = rows(parts["q"]).sum(1).view(n, per * d).sum(1)  # [n]
            h += v(o.weight).sum(0).view(n, per * d).sum(1)
            kv = rows(parts["k"]).sum(1).view(g, d).sum(1) + rows(parts["v"]).sum(1).view(g, d).sum(1)  # [g]
            for role, width in (("q", per * d), ("k", d), ("v", d)):
                part = parts[role]
                if part.bias is not None:
                    b = v(part.bias)[part.rows].view(-1, width).sum(1)
                    if role == "q":
                        h += b
                    else:
                        kv = kv + b
            h += kv.repeat_interleave(gs) / gs if query_heads else kv
            heads.append(h.cpu().numpy())
        else:
            heads.append(np.zeros(0))
        if adapter.num_channels(li):
            parts = adapter.mlp_in(li)
            c = rows(parts["gate"]).sum(1) + rows(parts["up"]).sum(1) + v(adapter.mlp_out(li).weight).sum(0)  # [I]
            for part in parts.values():
                if part.bias is not None:
                    c += v(part.bias)[part.rows]
            chans.append(c.cpu().numpy())
        else:
            chans.append(np.zeros(0))
        layers.append(sum(float(v(p).sum()) for p in layer.parameters()))
    return heads, chans, np.asarray(layers, dtype=np.float64)


def _to_space(
    space: MaskSpace,
    heads: Sequence[np.ndarray],
    chans: Sequence[np.ndarray],
    layers: np.ndarray | None,
    missing: float = np.inf,
) -> np.ndarray:
    """Map per-layer head scores, per-channel scores (summed into the space's channel blocks) and layer scores to
    ``[N]``. Layer units get ``missing`` when ``layers`` is None."""
    out = np.empty(space.num_units, dtype=np.float64)
    ut, ul, ui = space.unit_type, space.unit_layer, space.unit_index
    for li, ls in enumerate(space.layers):
        sel = np.flatnonzero((ut == HEAD) & (ul == li))
        if sel.size:
            n_units = ls.num_query_heads if space.query_heads else ls.num_kv_heads
            if heads[li].shape != (n_units,):
                raise ValueError(f"layer {li}: {heads[li].shape[0]} head units scored, the space has {n_units}")
            out[sel] = heads[li][ui[sel]]
        sel = np.flatnonzero((ut == CHANNEL) & (ul == li))
        if sel.size:
            if chans[li].shape != (ls.intermediate_size,):
                raise ValueError(
                    f"layer {li}: {chans[li].shape[0]} channels scored, the space has {ls.intermediate_size}"
                )
            permuted = chans[li][space.channel_perm[li]]  # [I] in block order
            starts = np.arange(0, ls.intermediate_size, space.channel_block)
            out[sel] = np.add.reduceat(permuted, starts)[ui[sel]]
        sel = np.flatnonzero((ut == LAYER) & (ul == li))
        if sel.size:
            out[sel] = missing if layers is None else layers[li]
    return out


# ------------------------------------------------------------------------------------------------- metrics
def wanda_sp_scores(adapter: FamilyAdapter, space: MaskSpace, stats: dict) -> np.ndarray:
    """Wanda-sp scores (the paper's init): ``Σ_j Σ_i |W[i, j]|·‖X_j‖₂`` over a unit's input columns.

    Head group: the columns of ``o_proj`` that its query heads feed; channel: its column of ``down_proj``; a channel
    block sums its channels (``space.channel_perm``); a layer unit sums all of its layer's head and channel scores.

    Args:
        adapter: the model's adapter (the model ``space`` was built from).
        space: the mask space.
        stats: from :func:`collect_input_stats`.

    Returns:
        ``[N]`` float64 scores, higher = more important.

    Raises:
        ValueError: ``stats`` or ``space`` do not match the model.
    """
    heads, chans = _column_scores(adapter, stats, _wanda_column, _heads_per_unit(adapter, space))
    layers = np.asarray([h.sum() + c.sum() for h, c in zip(heads, chans)])
    return _to_space(space, heads, chans, layers)


def magnitude_scores(adapter: FamilyAdapter, space: MaskSpace) -> np.ndarray:
    """L2 norm of all the weights (and biases) a unit owns; channel blocks and layers: sqrt of the summed squares.

    Args:
        adapter: the model's adapter.
        space: the mask space.

    Returns:
        ``[N]`` float64 scores, higher = more important.
    """
    with torch.no_grad():
        heads, chans, layers = _owned_sums(adapter, lambda p: p.detach().double() ** 2, space.query_heads)
    return np.sqrt(_to_space(space, heads, chans, layers))


def _standardise_per_type(space: MaskSpace, x: np.ndarray) -> np.ndarray:
    out = x.copy()
    for t in (HEAD, CHANNEL, LAYER):
        sel = space.unit_type == t
        if sel.sum() == 0:
            continue
        std = x[sel].std()
        out[sel] = (x[sel] - x[sel].mean()) / std if std > 0 else 0.0
    return out


def flap_scores(adapter: FamilyAdapter, space: MaskSpace, stats: dict) -> np.ndarray:
    """FLAP fluctuation scores, standardised per unit type across all layers (FLAP's adaptive structure search).

    Per input column j: ``Var_tokens(X_j)·‖W[:, j]‖₂²`` (``o_proj`` for head groups, summed over the group's columns;
    ``down_proj`` for channels, summed over a block). Then, per unit type, ``(x − mean) / std`` over all units of the
    type in all layers, so a global top-k gives each layer its own width. A layer unit's raw score is the sum of its
    layer's head and channel scores (FLAP itself removes no layers), standardised across layers.

    Args:
        adapter: the model's adapter.
        space: the mask space.
        stats: from :func:`collect_input_stats`.

    Returns:
        ``[N]`` float64 standardised scores (a type with zero spread gets 0), higher = more important.

    Raises:
        ValueError: ``stats`` or ``space`` do not match the model.
    """
    heads, chans = _column_scores(adapter, stats, _flap_column, _heads_per_unit(adapter, space))
    layers = np.asarray([h.sum() + c.sum() for h, c in zip(heads, chans)])
    return _standardise_per_type(space, _to_space(space, heads, chans, layers))


def block_influence_scores(space: MaskSpace, stats: dict) -> np.ndarray:
    """ShortGPT block influence: layer importance ``1 − mean_tokens cos(layer input, layer output)``.

    Only layer units are scored; head and channel units get ``+inf`` (never removed by this metric).

    Args:
        space: the mask space.
        stats: from :func:`collect_input_stats` (uses ``stats["cos"]``, ``[L]``).

    Returns:
        ``[N]`` float64 scores.

    Raises:
        ValueError: ``stats["cos"]`` does not have one entry per layer.
    """
    cos = np.asarray(stats["cos"], dtype=np.float64)
    if cos.shape != (space.num_layers,):
        raise ValueError(f"stats['cos'] has shape {cos.shape}, the space has {space.num_layers} layers")
    out = np.full(space.num_units, np.inf)
    sel = space.unit_type == LAYER
    out[sel] = 1.0 - cos[space.unit_layer[sel]]
    return out


def taylor_scores(adapter: FamilyAdapter, space: MaskSpace, blocks: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """LLM-Pruner-style first-order Taylor scores. **Uses gradients** (one backward pass per batch).

    L = mean next-token cross-entropy over all ``blocks``; a unit's score is ``Σ_w |w·∂L/∂w|`` over the weights it
    owns (layer units: over all of the layer's parameters). Gradients come from ``torch.autograd.grad``, so no
    ``.grad`` is written; ``requires_grad`` is switched on for the decoder layers' parameters (off for the others)
    only while scoring and restored afterwards. Memory: one gradient per layer parameter plus one batch's
    activations.

    Args:
        adapter: the model's adapter.
        space: the mask space.
        blocks: ``[n, T]`` token ids (T ≥ 2).
        batch_size: sequences per forward/backward.

    Returns:
        ``[N]`` float64 scores, higher = more important.

    Raises:
        ValueError: ``blocks`` is not ``[n, T]`` with n ≥ 1, T ≥ 2.
    """
    from .masked_forward import sequence_nll

    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n, T] with n >= 1 and T >= 2, got shape {tuple(blocks.shape)}")
    model = adapter.model
    flags = {p: p.requires_grad for p in model.parameters()}
    params = [p for p in adapter.layers.parameters()]
    grads = [torch.zeros_like(p) for p in params]
    dev = model_device(model)
    n = blocks.shape[0]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for s in range(0, n, batch_size):
                batch = blocks[s : s + batch_size].to(dev)
                loss = sequence_nll(adapter, batch).sum() / n  # this batch's share of the mean over all blocks
                for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                    if g is not None:
                        acc += g
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    by_param = {id(p): g for p, g in zip(params, grads)}
    with torch.no_grad():
        heads, chans, layers = _owned_sums(
            adapter, lambda p: (p.detach().double() * by_param[id(p)].double()).abs(), space.query_heads
        )
    return _to_space(space, heads, chans, layers)


# -------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Criterion:
    """One importance criterion: its name everywhere in probprune, what it needs, and how it scores a space."""

    name: str
    needs: str  # "weights" (no data), "stats" (one calibration forward), "gradients" (forward + backward)
    summary: str


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("wanda-sp", "stats", "Σ |W|·‖X‖ over the output-projection columns a unit feeds"),
        Criterion("magnitude", "weights", "L2 norm of the weights a unit owns"),
        Criterion("flap", "stats", "Var(X)·‖W‖² fluctuation, standardised per unit type across layers"),
        Criterion("taylor", "gradients", "Σ |w·∂L/∂w| over the weights a unit owns"),
        Criterion("block-influence", "stats", "1 − cos(layer input, layer output); layer units only"),
    )
}


def criterion_scores(
    name: str,
    adapter: FamilyAdapter,
    space: MaskSpace,
    stats: dict | None = None,
    blocks: torch.Tensor | None = None,
    batch_size: int = 4,
) -> np.ndarray:
    """``[N]`` scores of criterion ``name`` (a key of :data:`CRITERIA`); higher = keep.

    Args:
        name: the criterion.
        adapter: the model's adapter.
        space: the mask space.
        stats: :func:`collect_input_stats` on ``blocks``, if already collected (collected here otherwise).
        blocks: ``[n, T]`` calibration token ids (criteria that need data).
        batch_size: sequences per calibration forward.

    Raises:
        UserError: unknown name (lists the criteria), or a data-driven criterion without blocks or stats.
    """
    if name not in CRITERIA:
        raise UserError(f"unknown importance criterion {name!r}: valid criteria are {', '.join(CRITERIA)}")
    needs = CRITERIA[name].needs
    if needs == "weights":
        return magnitude_scores(adapter, space)
    if blocks is None and (needs == "gradients" or stats is None):
        raise UserError(f"importance criterion {name!r} needs calibration blocks")
    if needs == "gradients":
        return taylor_scores(adapter, space, blocks, batch_size)
    if stats is None:
        stats = collect_input_stats(adapter, blocks, batch_size)
    if name == "wanda-sp":
        return wanda_sp_scores(adapter, space, stats)
    if name == "flap":
        return flap_scores(adapter, space, stats)
    return block_influence_scores(space, stats)


def channel_wanda_scores(adapter: FamilyAdapter, stats: dict) -> list[np.ndarray]:
    """Per layer, ``[I_l]`` single-channel Wanda-sp scores ``Σ_i |W_down[i, c]|·‖X_c‖₂`` (empty for an empty MLP)."""
    return _column_scores(adapter, stats, _wanda_column, 0)[1]


def rank_channels(adapter: FamilyAdapter, stats_or_scores: dict | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per layer, the channels sorted by descending importance (ties: lower index first).

    Pass the result as ``channel_perm`` to ``adapter.mask_space(channel_block=..., channel_perm=...)`` so that each
    channel block holds channels of similar importance.

    Args:
        adapter: the model's adapter.
        stats_or_scores: a ``stats`` dict from :func:`collect_input_stats` (ranked by single-channel Wanda-sp), or
            per layer ``[I_l]`` channel scores.

    Returns:
        Per layer, an ``[I_l]`` int64 permutation.

    Raises:
        ValueError: per-layer scores do not match the model's layer count or widths.
    """
    if isinstance(stats_or_scores, dict):
        scores = channel_wanda_scores(adapter, stats_or_scores)
    else:
        scores = [np.asarray(s, dtype=np.float64) for s in stats_or_scores]
        if len(scores) != len(adapter.layers):
            raise ValueError(f"got channel scores for {len(scores)} layers, the model has {len(adapter.layers)}")
        for li, s in enumerate(scores):
            width = adapter.num_channels(li)
            if s.shape != (width,):
                raise ValueError(f"layer {li}: got {s.shape[0]} channel scores, the layer has {width} channels")
    return [np.argsort(-s, kind="stable").astype(np.int64) for s in scores]
