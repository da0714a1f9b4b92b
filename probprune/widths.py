"""Aligned shapes: round every layer's kept MLP width to a multiple of ``mask.align`` channels.

GPU matmuls are fastest when the inner dimension is a multiple of 64 or 128; a pruned layer 1,075 channels wide runs
no faster than one 1,088 wide. :func:`align_mask` turns any final mask into one whose kept channel widths are
multiples of ``align`` (or 0, or the layer's full width), moving as few channels as it can and staying within the
budget to one aligned block. Heads are left as they are: a KV group (``group_size × head_dim`` query rows) is already
a multiple of the head dimension.

How (per surviving layer; layers whose layer unit is dropped are left untouched):

1. Order the layer's full-width channel blocks: the kept ones first, then the dropped ones, each by descending
   priority (``scores_or_probs``). A narrower last block (intermediate size not a multiple of ``channel_block``) goes
   last: it is kept only at full width.
2. Cut that order into chunks of ``align`` channels; the last chunk holds what is left (so its end is the full width).
   A layer keeps a prefix of its chunks, so its width is a multiple of ``align``, 0 or full.
3. Chunk j of a layer with kept width w gets the priority w/align − j: the first ⌊w/align⌋ chunks come first
   (rounding down), then the straddling chunks by their remainder (rounding up the layers closest to the next
   multiple; ties: the chunk with the higher mean priority), then chunks beyond the kept width if room is left.
4. Take chunks in that order while they fit the budget; a chunk that does not fit closes its layer.

Budgets: ``per_type`` — kept channels ≤ ρ·Σ_l I_l (ρ = 1 − sparsity; channels of dropped layers count as they are,
as in the per-type unit count), ending less than ``align`` channels below it when some layer could still grow;
``params`` — ``space.kept_params(mask) ≤ ρ·space.prunable_params``, ending less than one chunk's parameters below it.
"""

from __future__ import annotations

import numpy as np

from probprune.errors import UserError
from probprune.mask_space import CHANNEL, LAYER, MaskSpace
from probprune.projection import BUDGETS


def check_align(space: MaskSpace, align: int) -> None:
    """Check that ``align`` can be applied to ``space``.

    Args:
        space: the mask space.
        align: channels per aligned block (1 = off).

    Raises:
        UserError: ``align`` is not an integer ≥ 1, the space has no channel units, or ``align`` is not a multiple
            of ``channel_block``.
    """
    if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align < 1:
        raise UserError(f"mask.align must be an integer >= 1, got {align!r}")
    if align == 1:
        return
    if not space.include_channels:
        raise UserError(
            f"mask.align ({align}) rounds MLP widths, but the mask space has no channel units: set "
            "mask.channels=true or mask.align=1"
        )
    if align % space.channel_block:
        raise UserError(
            f"mask.align ({align}) must be a multiple of mask.channel_block ({space.channel_block}): kept widths are "
            "whole channel blocks"
        )


def align_mask(
    space: MaskSpace, mask: np.ndarray, scores_or_probs: np.ndarray, align: int, sparsity: float, budget: str
) -> np.ndarray:
    """Round every surviving layer's kept channel width to a multiple of ``align`` within the budget.

    Args:
        space: the mask space.
        mask: ``[N]`` binary unit mask (e.g. a policy's final mask).
        scores_or_probs: ``[N]`` priorities, higher = keep first (keep probabilities, or metric scores).
        align: width multiple in channels; 1 returns a copy of ``mask``.
        sparsity: fraction to remove, in [0, 1] (the budget ``mask`` was made for).
        budget: ``"per_type"`` or ``"params"`` (see the module docstring).

    Returns:
        ``[N]`` float32 mask of 0/1. Head and layer units are unchanged; each surviving layer's kept channel width is
        a multiple of ``align``, 0, or the full intermediate size.

    Raises:
        UserError: a bad ``align`` (see :func:`check_align`), an unknown budget or a sparsity outside [0, 1].
        ValueError: ``mask`` or ``scores_or_probs`` has the wrong shape, or a priority is not finite.
    """
    check_align(space, align)
    if budget not in BUDGETS:
        raise UserError(f"budget must be one of {', '.join(map(repr, BUDGETS))}, got {budget!r}")
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) <= 1.0):
        raise UserError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    n = space.num_units
    out = np.asarray(mask, dtype=np.float32).copy()
    prio = np.asarray(getattr(scores_or_probs, "numpy", lambda: scores_or_probs)(), dtype=np.float64)
    if out.shape != (n,) or prio.shape != (n,):
        raise ValueError(f"mask and scores_or_probs must have shape ({n},), got {out.shape} and {prio.shape}")
    if not np.isfinite(prio).all():
        raise ValueError(f"scores_or_probs contain {int((~np.isfinite(prio)).sum())} non-finite values")
    if align == 1:
        return out
    keep = 1.0 - float(sparsity)
    b = space.channel_block
    ut, ul, ui = space.unit_type, space.unit_layer, space.unit_index

    # chunks: (priority, tie-break, layer, units, width, cost)
    chunks: list[tuple[float, float, int, np.ndarray, int, int]] = []
    alive_channels = np.zeros(n, dtype=bool)
    fixed_channels = 0  # per_type: kept channels of dropped layers (left as they are)
    for li, ls in enumerate(space.layers):
        units = np.flatnonzero((ut == CHANNEL) & (ul == li))  # in block order
        if units.size == 0:
            continue
        width = np.minimum(b, ls.intermediate_size - ui[units] * b)  # [n_blocks] channels per block
        layer_unit = np.flatnonzero((ut == LAYER) & (ul == li))
        if layer_unit.size and out[layer_unit[0]] < 0.5:
            fixed_channels += int(width[out[units] > 0.5].sum())
            continue
        alive_channels[units] = True
        kept = out[units] > 0.5
        full = width == b
        order = []
        for sel in (kept & full, ~kept & full):
            cand = units[sel]
            order.extend(cand[np.argsort(-prio[cand], kind="stable")].tolist())
        per_chunk = align // b
        pieces = [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]
        narrow = units[~full].tolist()
        if narrow:
            if pieces and len(pieces[-1]) < per_chunk:
                pieces[-1] = pieces[-1] + narrow
            else:
                pieces.append(narrow)
        w_kept = int(width[kept].sum())
        chan_width = dict(zip(units.tolist(), width.tolist()))
        for j, piece in enumerate(pieces):
            members = np.asarray(piece, dtype=np.int64)
            cw = int(sum(chan_width[u] for u in piece))
            chunks.append((w_kept / align - j, float(prio[members].mean()), li, members, cw, cw * ls.channel_cost))

    if budget == "per_type":
        target = keep * sum(ls.intermediate_size for ls in space.layers) - fixed_channels
        cost_index = 4  # channels
    else:
        base = out.copy()
        base[alive_channels] = 0.0
        target = keep * space.prunable_params - space.kept_params(base)
        cost_index = 5  # parameters
    out[alive_channels] = 0.0
    chunks.sort(key=lambda c: (-c[0], -c[1], c[2]))
    closed: set[int] = set()
    total = 0
    for chunk in chunks:
        li = chunk[2]
        if li in closed:
            continue
        if total + chunk[cost_index] <= target + 1e-9:
            total += chunk[cost_index]
            out[chunk[3]] = 1.0
        else:
            closed.add(li)
    return out


def channel_widths(space: MaskSpace, mask: np.ndarray) -> list[int]:
    """Kept MLP channels per layer (channel units only; a dropped layer still reports its channel mask).

    Args:
        space: the mask space.
        mask: ``[N]`` binary unit mask.

    Returns:
        Per layer, the kept channel count.
    """
    e = space.expand(np.asarray(mask, dtype=np.float32))["channels"]  # [L, I_max]
    return [int((e[li, : ls.intermediate_size] > 0.5).sum()) for li, ls in enumerate(space.layers)]
