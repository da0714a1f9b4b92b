"""Warm starts and the check set: begin the search at the best forward-only answer, never return anything worse.

A search that starts from a poor mask spends its forwards climbing to where a cheap heuristic already is, and one
seed may end worse than that heuristic. With ``search.init=best`` the search

1. builds the candidate start masks — every forward-only built-in baseline that the mask space can express
   (:data:`CANDIDATES`: ShortGPT's layer removal, SLEB's greedy layer removal by calibration loss, Wanda-sp, FLAP,
   magnitude) and the Wanda-sp init mask — all at the search's budget. SLEB is the dearest candidate: it scores
   ``L + (L−1) + … `` pruned models on the first :data:`~probprune.baselines.SLEB_BLOCKS` of the warm start's blocks;
2. scores each on the **check set** (calibration blocks held out of the search's batches, never the held-out test
   split) by mean next-token cross-entropy — FLAP as it is returned, with its bias compensation added at compaction
   (candidates are scored without reconstruction, which would cost one re-fit each) — and starts from the best: keep probabilities
   ``(1 − init_mix)·mask + init_mix·(1 − sparsity)``, projected onto the budget (the mix keeps every unit's
   probability away from 0 and 1, so the samples still explore and the gradient is not zero);
3. after the search, scores its final mask on the same check set and returns whichever of {search result, start}
   has the lower loss (:func:`choose_final`; a FLAP start keeps its biases), so the result is never worse than the
   start on the check set.

The allocation search (:class:`probprune.allocation.AllocationPolicy`) starts from the same unit probabilities: each
(layer, unit type) group gets the kept fraction of the chosen mask, pulled the same way. A layer that ShortGPT drops is
a layer with no head and no channel units kept, so thin-or-drop allocations contain ShortGPT's answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import projection
from .engine.base import Engine
from .errors import UserError
from .mask_space import MaskSpace
from .models.base import FamilyAdapter

log = logging.getLogger(__name__)

CANDIDATES = ("shortgpt", "sleb", "wanda-sp", "flap", "magnitude")  # forward-only baselines (taylor needs gradients)
REFIT = "+rec"  # check_losses entry of a candidate scored with its kept weights re-fit


@dataclass
class WarmStart:
    """The start a search was given and how it was chosen.

    Attributes:
        name: the chosen candidate (a baseline name, or ``"init"`` for the search's own Wanda-sp initialisation).
        mask: ``[N]`` its binary mask.
        probs: ``[N]`` the keep probabilities the search starts from (already on the budget).
        check_losses: every candidate's check-set cross-entropy.
    """

    name: str
    mask: np.ndarray
    probs: np.ndarray
    check_losses: dict[str, float] = field(default_factory=dict)
    rec: Any = None  # the chosen candidate's weight changes at compaction (FLAP's bias compensation), or None
    refit: tuple[Any, float] | None = None  # the chosen candidate re-fit (Reconstruction, check loss), if scored


def candidate_masks(
    adapter: FamilyAdapter,
    space: MaskSpace,
    blocks: torch.Tensor,
    stats: dict,
    sparsity: float,
    budget: str,
    init_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """The start masks a warm start chooses from: the Wanda-sp init mask and every expressible baseline of
    :data:`CANDIDATES`, each at ``sparsity`` under ``budget``.

    Args:
        adapter: the model's adapter.
        space: the search's mask space.
        blocks: ``[n, T]`` calibration blocks the statistics came from.
        stats: :func:`probprune.importance.collect_input_stats` on ``blocks``.
        sparsity: the search's sparsity.
        budget: the search's budget.
        init_mask: ``[N]`` the Wanda-sp init's final mask.

    Returns:
        ``{name: [N] float32 mask}``, ``"init"`` (the search's own Wanda-sp initial mask) first; a baseline the space cannot express (e.g. ShortGPT on a
        heads-only space) is left out.
    """
    from .baselines import baseline_mask

    out = {"init": np.asarray(init_mask, dtype=np.float32)}
    for method in CANDIDATES:
        try:
            out[method] = baseline_mask(method, adapter, space, blocks, sparsity, budget=budget, stats=stats)
        except UserError as err:
            log.info("warm start: %s left out (%s)", method, err)
    return out


def check_losses(engine: Engine, masks: np.ndarray, check: torch.Tensor, batch_size: int) -> np.ndarray:
    """Mean next-token cross-entropy of each mask over all check blocks.

    Args:
        engine: any :class:`~probprune.engine.Engine` (local or Ray).
        masks: ``[K, N]`` 0/1 masks.
        check: ``[n, T]`` check blocks.
        batch_size: blocks per engine call.

    Returns:
        ``[K]`` float64: the token-weighted mean over the check blocks (every block has T tokens).
    """
    masks = np.asarray(masks, dtype=np.float32)  # [K, N]
    total = np.zeros(masks.shape[0], dtype=np.float64)
    for lo in range(0, check.shape[0], batch_size):
        rows = check[lo : lo + batch_size]  # [b, T]
        total += np.asarray(engine.losses(masks, rows, objective="ce"), dtype=np.float64) * rows.shape[0]
    return total / check.shape[0]


def warm_probs(space: MaskSpace, mask: np.ndarray, mix: float, sparsity: float, budget: str) -> np.ndarray:
    """Keep probabilities pulled toward ``mask``: ``(1 − mix)·mask + mix·(1 − sparsity)``, projected onto the budget.

    Args:
        space: the mask space.
        mask: ``[N]`` 0/1 start mask.
        mix: in (0, 1); the share of the uniform keep ratio.
        sparsity: the search's sparsity.
        budget: the search's budget.

    Returns:
        ``[N]`` float64 probabilities; their top units by probability are ``mask`` when it meets the budget.
    """
    if not 0.0 < mix < 1.0:
        raise ValueError(f"mix must be in (0, 1), got {mix}")
    p = (1.0 - mix) * np.asarray(mask, dtype=np.float64) + mix * (1.0 - sparsity)  # [N]
    return projection.project(space, torch.as_tensor(p), sparsity, budget, fill=True).numpy()


def choose_start(
    engine: Engine,
    candidates: dict[str, np.ndarray],
    check: torch.Tensor,
    batch_size: int,
    space: MaskSpace,
    mix: float,
    sparsity: float,
    budget: str,
    as_returned: dict[str, tuple[float, Any]] | None = None,
    refit: Callable[[np.ndarray, Any], tuple[Any, float]] | None = None,
    refit_top: int = 0,
) -> WarmStart:
    """Score every candidate on the check set and start from the best (ties: the first listed).

    Args:
        as_returned: ``{name: (check-set loss, rec)}`` for candidates that are returned with weight changes
            (FLAP with its bias compensation): that loss replaces the mask's own, and ``rec`` goes with the start.
        refit: ``(mask, its weight changes as returned or None) -> (reconstruction, its check-set loss)``: the
            ``refit_top`` best candidates are also scored re-fit (entries ``NAME+rec`` of ``check_losses``); the
            start is the mask of the best entry of either kind.

    Returns:
        The :class:`WarmStart`.
    """
    names = list(candidates)
    losses = check_losses(engine, np.stack([candidates[n] for n in names]), check, batch_size)  # [C]
    as_returned = as_returned or {}
    table = {n: float(as_returned[n][0] if n in as_returned else v) for n, v in zip(names, losses)}
    refits = {}
    if refit is not None:
        for n in sorted(names, key=table.get)[:refit_top]:
            refits[n] = refit(candidates[n], as_returned[n][1] if n in as_returned else None)
            table[n + REFIT] = float(refits[n][1])
    entry = min(table, key=table.get)
    name = entry.removesuffix(REFIT)
    log.info(
        "warm start: check-set loss %s; starting from %s", ", ".join(f"{n} {v:.4f}" for n, v in table.items()), entry
    )
    mask = candidates[name]
    rec = as_returned[name][1] if name in as_returned else None
    return WarmStart(name, mask, warm_probs(space, mask, mix, sparsity, budget), table, rec, refits.get(name))


def choose_final(
    engine: Engine,
    final: np.ndarray,
    start: np.ndarray,
    check: torch.Tensor,
    batch_size: int,
    start_loss: float | None = None,
) -> tuple[np.ndarray, dict[str, float | str]]:
    """The search's final mask or its start, whichever has the lower check-set loss (ties: the search's).

    Args:
        start_loss: the start's check-set loss as it would be returned (with its weight changes), if it has any;
            None scores its mask.

    Returns:
        ``(mask, record)`` with record ``{"search_loss", "start_loss", "returned": "search" | "start"}``.
    """
    if start_loss is None:
        search_loss, start_loss = check_losses(engine, np.stack([final, start]), check, batch_size)
    else:
        (search_loss,) = check_losses(engine, np.asarray(final)[None], check, batch_size)
    returned = "search" if search_loss <= start_loss else "start"
    log.info("check set: search result %.4f, start %.4f: returning the %s", search_loss, start_loss, returned)
    record = {"search_loss": float(search_loss), "start_loss": float(start_loss), "returned": returned}
    return (np.asarray(final) if returned == "search" else np.asarray(start)), record
