"""Work that reads the model's weights, as tasks of a replica, so that a driver holding no model can send it out.

Every task is a module-level function ``task(model, adapter, *args)``. An engine runs it on one replica
(``engine.run``) or once per share of the work, one share per replica (``engine.map``, shares from
:func:`split_shares`); the driver keeps only the mask space, the policy and the results, so its memory does not grow
with the model. Shares are combined here, exactly:

- calibration statistics: sums of squares, sums and token counts add up; the per-layer cosine is the token-weighted
  mean (:func:`merge_stats`);
- perplexity: each share returns its summed next-token cross-entropy and its token count (:func:`window_nll`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..losses import token_losses
from ..mask_space import MaskSpace
from ..models.base import FamilyAdapter


# ----------------------------------------------------------------------------------------------------- tasks
def input_stats(model: nn.Module, adapter: FamilyAdapter, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """:func:`probprune.importance.collect_input_stats` of this replica on ``blocks`` (one share of the blocks)."""
    from ..importance import collect_input_stats

    return collect_input_stats(adapter, blocks, batch_size)


def channel_ranking(model: nn.Module, adapter: FamilyAdapter, stats: dict) -> list[np.ndarray]:
    """:func:`probprune.importance.rank_channels` (it reads the MLP output weights)."""
    from ..importance import rank_channels

    return rank_channels(adapter, stats)


def criterion_scores(
    model: nn.Module,
    adapter: FamilyAdapter,
    name: str,
    space: MaskSpace,
    stats: dict | None,
    blocks: torch.Tensor | None,
) -> np.ndarray:
    """:func:`probprune.importance.criterion_scores` of ``name`` over ``space``."""
    from ..importance import criterion_scores as scores

    return scores(name, adapter, space, stats, blocks)


def warm_start_candidates(
    model: nn.Module,
    adapter: FamilyAdapter,
    space: MaskSpace,
    blocks: torch.Tensor,
    stats: dict,
    sparsity: float,
    budget: str,
    init_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """:func:`probprune.warmstart.candidate_masks` (the baselines read the weights)."""
    from ..warmstart import candidate_masks

    return candidate_masks(adapter, space, blocks, stats, sparsity, budget, init_mask)


def baseline_mask(
    model: nn.Module,
    adapter: FamilyAdapter,
    method: str,
    space: MaskSpace,
    blocks: torch.Tensor,
    sparsity: float,
    seed: int,
    budget: str,
    stats: dict | None,
) -> np.ndarray:
    """:func:`probprune.baselines.baseline_mask` of ``method`` (the baselines read the weights)."""
    from ..baselines import baseline_mask as mask_of

    return mask_of(method, adapter, space, blocks, sparsity, seed=seed, budget=budget, stats=stats)


def flap_compensation(
    model: nn.Module, adapter: FamilyAdapter, space: MaskSpace, mask: np.ndarray, stats: dict
) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`probprune.baselines.flap_bias_compensation` (it reads the output projections)."""
    from ..baselines import flap_bias_compensation

    return flap_bias_compensation(adapter, space, mask, stats)


@torch.no_grad()
def window_nll(
    model: nn.Module,
    adapter: FamilyAdapter,
    space: MaskSpace,
    mask: np.ndarray | None,
    windows: torch.Tensor,
    batch_size: int = 4,
) -> tuple[float, int]:
    """Summed next-token cross-entropy (float64) and the number of predicted tokens of the model under ``mask``
    (None = dense) on ``windows`` ``[W, T]``, computed on the gathered fast path (the pruned width only)."""
    from ..fastpath import fast_forward_hidden
    from ..losses import next_token_logits

    mask = space.full_mask() if mask is None else np.asarray(mask, dtype=np.float32)
    total, count = 0.0, 0
    for lo in range(0, windows.shape[0], batch_size):
        x = windows[lo : lo + batch_size]  # [b, T]
        hidden = fast_forward_hidden(adapter, space, mask, x)  # [b, T, H]
        targets = x[:, 1:].reshape(-1)
        for rows, logits in next_token_logits(adapter, hidden):
            total += float(token_losses(logits, targets[rows]).double().sum())
        count += x.shape[0] * (x.shape[1] - 1)
    return total, count


# ------------------------------------------------------------------------------------------------- combining
def merge_stats(parts: Sequence[dict]) -> dict:
    """Combine the :func:`input_stats` of disjoint shares of the blocks into the statistics of all of them."""
    if len(parts) == 1:
        return parts[0]

    def merge(entries):
        if entries[0] is None:
            return None
        return {
            "sumsq": sum(e["sumsq"] for e in entries),
            "sum": sum(e["sum"] for e in entries),
            "count": sum(int(e["count"]) for e in entries),
        }

    tokens = np.asarray([p["tokens"] for p in parts], dtype=np.float64)  # [S]
    cos = np.stack([np.asarray(p["cos"], dtype=np.float64) for p in parts])  # [S, L]
    return {
        "o_proj": [merge([p["o_proj"][li] for p in parts]) for li in range(len(parts[0]["o_proj"]))],
        "down_proj": [merge([p["down_proj"][li] for p in parts]) for li in range(len(parts[0]["down_proj"]))],
        "cos": (cos * tokens[:, None]).sum(0) / tokens.sum(),
        "tokens": int(tokens.sum()),
    }


def split_shares(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` shares of ``range(n)`` over ``parts`` replicas, the first ``n % parts`` one larger; no
    empty share. The one way work is split: mask shares, batch rows, calibration blocks, held-out windows.

    Examples:
        >>> split_shares(3, 2)
        [(0, 2), (2, 3)]
        >>> split_shares(1, 4)
        [(0, 1)]
    """
    if parts < 1:
        raise ValueError(f"need at least one replica, got {parts}")
    base, extra = divmod(n, parts)
    shares, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        if hi > lo:
            shares.append((lo, hi))
        lo = hi
    return shares
