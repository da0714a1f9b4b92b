"""Built-in pruning baselines: one binary mask per method, meeting the same budget as the search.

===========  ============================  ========================================================================
method       scores                         selection
===========  ============================  ========================================================================
magnitude    :func:`magnitude_scores`       uniform per layer
wanda-sp     :func:`wanda_sp_scores`        uniform per layer (as in the Wanda-sp / FLAP papers)
flap         :func:`flap_scores`            global per type on standardised scores (adaptive per-layer widths)
random       seeded uniform random          global per type
shortgpt     :func:`block_influence_scores` whole layers, lowest influence first, until the parameter budget is met
                                            (without layer units: all heads and channels of those layers)
sleb         calibration loss               whole layers, one at a time: the layer whose removal raises the loss
                                            least (:func:`sleb_mask`), until the parameter budget is met
taylor       :func:`taylor_scores`          uniform per layer (**uses gradients**)
===========  ============================  ========================================================================

"Uniform per layer" with ``budget="per_type"``: for each unit type, exactly ``round(ρ·n_type)`` units are kept
(ρ = 1 − sparsity, halves up, as :func:`probprune.projection.final_mask`), shared among layers in proportion to their
unit counts by largest remainder — with equal layers the per-layer counts differ by at most one, and the layers that
get the extra unit are those whose next-best unit scores highest; inside a layer the top scores are kept. Layer units
(one per layer) are thereby chosen globally by score. With ``budget="params"`` the scores are mapped to within-layer
quantiles per type (layer units: quantiles across layers) and handed to :func:`~probprune.projection.final_mask`, so
every layer loses about the same share of its heads and channels until the parameter budget is met.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import UserError
from .importance import CRITERIA, collect_input_stats, column_mean, criterion_scores
from .mask_space import CHANNEL, HEAD, LAYER, MaskSpace
from .models.base import FamilyAdapter
from .projection import BUDGETS, _round_half_up, final_mask

# baseline -> the importance criterion it ranks units by (None: random); how it selects is in baseline_mask
CRITERION = {
    "magnitude": "magnitude",
    "wanda-sp": "wanda-sp",
    "flap": "flap",
    "random": None,
    "shortgpt": "block-influence",
    "taylor": "taylor",
    "sleb": None,
}
BASELINES = tuple(CRITERION)
USES_GRADIENTS = {b for b, c in CRITERION.items() if c is not None and CRITERIA[c].needs == "gradients"}
SLEB_BLOCKS = 8  # calibration blocks SLEB scores each trial on (1,024 tokens at block_len 128)
_TYPES = (HEAD, CHANNEL, LAYER)


def _check_args(method: str, sparsity: float, budget: str) -> None:
    if method not in BASELINES:
        raise UserError(f"unknown baseline {method!r}: valid baselines are {', '.join(BASELINES)}")
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) <= 1.0):
        raise UserError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if budget not in BUDGETS:
        raise UserError(f"budget must be one of {', '.join(map(repr, BUDGETS))}, got {budget!r}")


# ---------------------------------------------------------------------------------------------- selections
def uniform_per_layer_mask(space: MaskSpace, scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep exactly ``round(ρ·n_type)`` units per type, spread over layers by largest remainder (see module doc).

    Args:
        space: the mask space.
        scores: ``[N]`` importance scores (higher = keep).
        sparsity: fraction of each type to remove, in [0, 1].

    Returns:
        ``[N]`` float32 mask of 0/1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    keep = 1.0 - float(sparsity)
    mask = np.zeros(space.num_units, dtype=np.float32)
    for t in _TYPES:
        idx = np.flatnonzero(space.unit_type == t)
        n_type = idx.size
        if n_type == 0:
            continue
        total = min(n_type, _round_half_up(keep * n_type))
        ranked, base, extra_keys = {}, {}, []
        for li in np.unique(space.unit_layer[idx]):
            units = idx[space.unit_layer[idx] == li]
            ranked[li] = units[np.argsort(-scores[units], kind="stable")]  # best first, lower index on ties
            n_l = units.size
            base[li], rem = divmod(total * n_l, n_type)  # exact quota total·n_l/n_type = base + rem/n_type
            if rem > 0:
                extra_keys.append((-rem, -scores[ranked[li][base[li]]], int(li)))
        extra = total - sum(base.values())
        for _, _, li in sorted(extra_keys)[:extra]:
            base[li] += 1
        for li, units in ranked.items():
            mask[units[: base[li]]] = 1.0
    return mask


def _quantiles(x: np.ndarray) -> np.ndarray:
    """``(rank + 0.5) / n`` with ascending ranks (ties: lower index ranks lower)."""
    r = np.empty(x.size, dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return (r + 0.5) / max(x.size, 1)


def layer_quantiles(space: MaskSpace, scores: np.ndarray) -> np.ndarray:
    """``[N]`` in (0, 1): each head/channel unit's quantile among its type in its layer; layer units: across layers."""
    out = np.zeros(space.num_units, dtype=np.float64)
    for sel in space.unit_groups():
        out[sel] = _quantiles(scores[sel])
    return out


def _uniform(space: MaskSpace, scores: np.ndarray, sparsity: float, budget: str) -> np.ndarray:
    if budget == "per_type":
        return uniform_per_layer_mask(space, scores, sparsity)
    return final_mask(space, layer_quantiles(space, scores), sparsity, budget)


def layer_units(space: MaskSpace, method: str) -> dict[int, np.ndarray]:
    """The units to switch off to remove each decoder layer: its layer unit, or (without layer units) all of its
    head and channel units, which leaves the layer adding nothing to the residual stream.

    Raises:
        UserError: the space can drop no layer (no layer units, and heads or channels are not both units).
    """
    lay = np.flatnonzero(space.unit_type == LAYER)
    if lay.size:
        return {int(space.unit_layer[u]): np.array([u]) for u in lay}
    if space.include_heads and space.include_channels:
        return {li: np.flatnonzero(space.unit_layer == li) for li in range(space.num_layers)}
    raise UserError(
        f"the {method} baseline removes whole layers: set mask.layers=true, or make both heads and "
        "channels units (mask.heads=true mask.channels=true)"
    )


def shortgpt_mask(space: MaskSpace, influence: np.ndarray, sparsity: float) -> np.ndarray:
    """Drop whole layers in ascending block influence until kept prunable params ≤ (1 − sparsity)·prunable.

    With layer units the layer's unit is switched off (heads and channels stay 1). Without them a layer is dropped
    by switching off all of its head and channel units: its attention and MLP then add nothing to the residual
    stream, which is exactly a removed layer (only its two norm vectors stay), so the same answer lives in the
    heads-and-channels space the search uses.

    Args:
        space: a mask space with layer units, or with both head and channel units.
        influence: ``[L]`` block influence per decoder layer (:func:`probprune.importance.block_influence_scores`
            gives it per unit; pass ``[N]`` and the layer units are read, or ``[L]``).
        sparsity: fraction of prunable parameters to remove.

    Returns:
        ``[N]`` float32 mask.

    Raises:
        UserError: the space can drop no layer (no layer units, and heads or channels are not both units).
    """
    influence = np.asarray(influence, dtype=np.float64)
    lay = np.flatnonzero(space.unit_type == LAYER)
    if influence.shape == (space.num_units,):
        if lay.size == 0:
            raise UserError("layer influence given per unit, but the mask space has no layer units")
        per_layer = np.empty(space.num_layers)
        per_layer[space.unit_layer[lay]] = influence[lay]
    elif influence.shape == (space.num_layers,):
        per_layer = influence
    else:
        raise ValueError(
            f"influence must have shape ({space.num_units},) or ({space.num_layers},), got {influence.shape}"
        )
    units_of = layer_units(space, "shortgpt")
    mask = space.full_mask()
    limit = (1.0 - float(sparsity)) * space.prunable_params
    for li in np.argsort(per_layer, kind="stable"):
        if space.kept_params(mask) <= limit:
            break
        mask[units_of[int(li)]] = 0.0
    return mask


@torch.no_grad()
def sleb_mask(
    adapter: FamilyAdapter,
    space: MaskSpace,
    blocks: torch.Tensor,
    sparsity: float,
    batch_size: int = 4,
    progress: bool = False,
) -> np.ndarray:
    """SLEB (Song et al. 2024): remove decoder layers one at a time by calibration loss until the budget is met.

    Each step tries removing every remaining layer from the model pruned so far, scores each trial by the mean
    next-token cross-entropy over ``blocks`` (forward only, on the fast path, the layers before the removed one shared
    by the trials: :func:`probprune.fastpath.layer_removal_losses`), and removes the layer whose removal raises the
    loss least (ties: the lower index). Removing ``r`` of ``L`` layers scores ``L + (L−1) + … + (L−r+1)`` trials.

    Args:
        adapter: the model's adapter.
        space: a mask space with layer units, or with both head and channel units (see :func:`layer_units`).
        blocks: ``[n, T]`` calibration token ids, T >= 2.
        sparsity: fraction of prunable parameters to remove; layers go until kept ≤ (1 − sparsity)·prunable.
        batch_size: blocks per forward.
        progress: a progress bar over the removal steps.

    Returns:
        ``[N]`` float32 mask.

    Raises:
        UserError: the space can drop no layer.
    """
    from tqdm.auto import tqdm

    from .fastpath import layer_removal_losses

    units_of = layer_units(space, "sleb")
    mask = space.full_mask()
    limit = (1.0 - float(sparsity)) * space.prunable_params
    remaining = list(range(space.num_layers))
    bar = tqdm(desc="sleb: layers removed", disable=not progress)
    while space.kept_params(mask) > limit and remaining:
        loss = np.zeros(len(remaining), dtype=np.float64)  # [R] token-weighted mean over the blocks
        for lo in range(0, blocks.shape[0], batch_size):
            rows = blocks[lo : lo + batch_size]  # [b, T]
            loss += layer_removal_losses(adapter, space, mask, remaining, rows) * rows.shape[0]
        gone = remaining.pop(int(np.argmin(loss)))
        mask[units_of[gone]] = 0.0
        bar.update(1)
        bar.set_postfix(layer=gone, loss=f"{loss.min() / blocks.shape[0]:.4f}")
    bar.close()
    return mask


# ------------------------------------------------------------------------------------------------ baselines
def baseline_mask(
    method: str,
    adapter: FamilyAdapter,
    space: MaskSpace,
    blocks: torch.Tensor | None,
    sparsity: float,
    seed: int = 0,
    budget: str = "per_type",
    batch_size: int = 4,
    stats: dict | None = None,
    sleb_blocks: int = SLEB_BLOCKS,
) -> np.ndarray:
    """Binary mask of one baseline at the given sparsity and budget.

    Args:
        method: one of :data:`BASELINES` (see the module table; ``taylor`` uses gradients).
        adapter: the model's adapter.
        space: the mask space (built from this model).
        blocks: ``[n, T]`` calibration token ids; unused (may be None) for ``magnitude`` and ``random``.
        sparsity: fraction to remove, in [0, 1].
        seed: seed of ``random`` (the other methods are deterministic).
        budget: ``"per_type"`` (exact count per unit type) or ``"params"`` (joint parameter budget, met within one
            unit). ``shortgpt`` always uses the parameter budget (it removes only whole layers, so with ``per_type``
            each type is cut by the share of the dropped layers: exact when the layers are alike and the budget is a
            whole number of layers, as for 20 / 30 / 50 % of a 30-layer model).
        batch_size: sequences per calibration forward.
        stats: :func:`probprune.importance.collect_input_stats` of this model on ``blocks``, if already collected
            (``wanda-sp``, ``flap`` and ``shortgpt`` then run no forward of their own).
        sleb_blocks: ``sleb`` scores its trials on the first ``sleb_blocks`` of ``blocks`` (its cost grows with
            them: see :func:`sleb_mask`); like ``shortgpt`` it always uses the parameter budget.

    Returns:
        ``[N]`` float32 array of 0/1.

    Raises:
        UserError: unknown method (lists :data:`BASELINES`), sparsity outside [0, 1], unknown budget, ``shortgpt``
            or ``sleb`` on a space that cannot drop a layer, or a data-driven method without blocks.
    """
    _check_args(method, sparsity, budget)
    if method == "random":
        return final_mask(space, np.random.default_rng(seed).random(space.num_units), sparsity, budget)
    if method == "sleb":
        if blocks is None:
            raise UserError("baseline 'sleb' needs calibration blocks")
        if sleb_blocks < 1:
            raise UserError(f"sleb_blocks must be >= 1, got {sleb_blocks}")
        return sleb_mask(adapter, space, blocks[:sleb_blocks], sparsity, batch_size)
    needs = CRITERIA[CRITERION[method]].needs
    if needs != "weights" and blocks is None:
        raise UserError(f"baseline {method!r} needs calibration blocks")
    if needs == "stats" and stats is None:
        stats = collect_input_stats(adapter, blocks, batch_size)
    scores = criterion_scores(CRITERION[method], adapter, space, stats, blocks, batch_size)  # [N]
    if method == "flap":
        return final_mask(space, _quantiles(scores), sparsity, budget)  # global: standardised scores -> (0, 1)
    if method == "shortgpt":
        return shortgpt_mask(space, 1.0 - np.asarray(stats["cos"], dtype=np.float64), sparsity)  # [L] influence
    return _uniform(space, scores, sparsity, budget)


# --------------------------------------------------------------------------------- FLAP bias compensation
@torch.no_grad()
def flap_bias_compensation(
    adapter: FamilyAdapter, space: MaskSpace, mask: np.ndarray, stats: dict
) -> dict[int, dict[str, torch.Tensor]]:
    """FLAP's bias compensation: the mean contribution of the removed input columns, per surviving layer.

    For ``o_proj`` (removed head groups' query columns) and ``down_proj`` (removed channels):
    ``W[:, removed] @ mean_tokens(X[removed])``. Adding it to the projection's output bias keeps the removed columns'
    mean contribution. Layers removed by the mask (layer units) get nothing.

    Args:
        adapter: the adapter of the (unpruned) model ``space`` was built from.
        space: the mask space.
        mask: ``[N]`` binary mask.
        stats: from :func:`probprune.importance.collect_input_stats` on the same model.

    Returns:
        ``{layer: {"o_proj": [H] float32, "down_proj": [H] float32}}`` keyed by original layer index; a key is
        present only where something was removed.
    """
    d = adapter.head_dim
    out: dict[int, dict[str, torch.Tensor]] = {}
    for li, (ls, keep) in enumerate(zip(space.layers, space.plan(np.asarray(mask, dtype=np.float32)))):
        if keep is None:
            continue
        comp = {}
        gone = np.setdiff1d(np.arange(ls.num_query_heads), keep.q_heads.numpy())  # removed query heads
        if gone.size:
            cols = (gone[:, None] * d + np.arange(d)[None]).ravel()  # [n_gone * d]
            w = adapter.attn_out(li).weight.detach().double().cpu().numpy()  # [H, C]
            comp["o_proj"] = torch.from_numpy(w[:, cols] @ column_mean(stats["o_proj"][li])[cols]).float()
        gone = np.setdiff1d(np.arange(ls.intermediate_size), keep.channels.numpy())
        if gone.size:
            w = adapter.mlp_out(li).weight.detach().double().cpu().numpy()  # [H, I]
            comp["down_proj"] = torch.from_numpy(w[:, gone] @ column_mean(stats["down_proj"][li])[gone]).float()
        if comp:
            out[li] = comp
    return out
