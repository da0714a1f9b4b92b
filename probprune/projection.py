"""Projections of keep probabilities onto a sparsity budget, and the deterministic final mask.

Two budgets:

- ``per_type`` (the paper): for each unit type present (heads, channels, layers), Σ_u s_u ≤ ρ·n_type,
  ρ = 1 − sparsity.
- ``params``: one joint budget in parameters, Σ_u c_u s_u ≤ (1 − sparsity)·Σ_u c_u, c_u = parameters unit u removes.
  With layer units the budget is on the *expected kept parameters*, in which a layer's probability gates its heads
  and channels (:func:`expected_kept_params`), so what the search trains on is what its masks keep
  (:func:`project_nested`).

Both projections are Euclidean: s ← clamp(s − v·c, 0, 1) with v ≥ 0 found by bisection (c = 1 for ``per_type``), or a
plain clamp when s is already inside. Everything is float64 internally and deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from probprune.errors import UserError
from probprune.mask_space import CHANNEL, HEAD, LAYER, MaskSpace

BUDGETS = ("per_type", "params")


# ------------------------------------------------------------------------------------------------ validation
def _check_budget(budget: str) -> None:
    if budget not in BUDGETS:
        raise UserError(f"budget must be one of {', '.join(map(repr, BUDGETS))}, got {budget!r}")


def _check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) <= 1.0):
        raise UserError(f"sparsity must be a number in [0, 1], got {sparsity!r}")


def _as_probs(space: MaskSpace, s: torch.Tensor | np.ndarray) -> np.ndarray:
    """``s`` as a float64 numpy vector of length N; raises if the shape is wrong or a value is not finite."""
    arr = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
    arr = arr.astype(np.float64, copy=False)
    if arr.shape != (space.num_units,):
        raise ValueError(f"probabilities must have shape ({space.num_units},), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"probabilities contain {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


# ---------------------------------------------------------------------------------------------- projections
def project_keep_ratio(s: torch.Tensor, keep_ratio: float, iters: int = 100) -> torch.Tensor:
    """Euclidean projection onto {x ∈ [0, 1]^N : Σ x ≤ keep_ratio·N}.

    Args:
        s: ``[N]`` probabilities (any real values; they are clamped).
        keep_ratio: ρ in [0, 1].
        iters: bisection steps for the shift v (100 reaches float64 resolution).

    Returns:
        ``[N]`` tensor of the same dtype as ``s``: ``clamp(s, 0, 1)`` if that is inside the budget, else
        ``clamp(s − v, 0, 1)`` with v ≥ 0 the smallest shift found that meets Σ ≤ ρN.

    Raises:
        ValueError: ``keep_ratio`` outside [0, 1], ``s`` not 1-D, or ``s`` not finite.
    """
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    ones = torch.ones_like(s, dtype=torch.float64)
    return _project_shift(s, ones, keep_ratio * s.numel(), iters)


def project_weighted(s: torch.Tensor, cost: torch.Tensor, budget: float, iters: int = 100) -> torch.Tensor:
    """Euclidean projection onto {x ∈ [0, 1]^N : Σ c_u x_u ≤ B}.

    The solution is ``clamp(s − v·c, 0, 1)`` with v ≥ 0 (v = 0 if already inside). Costs are normalised by their
    mean internally, so v stays O(1) whatever the parameter counts.

    Args:
        s: ``[N]`` probabilities.
        cost: ``[N]`` non-negative weights c_u (parameters per unit).
        budget: B ≥ 0, in the units of ``cost``.
        iters: bisection steps.

    Returns:
        ``[N]`` tensor of the same dtype as ``s``.

    Raises:
        ValueError: shapes differ, a cost is negative, the budget is negative, or ``s`` is not finite.
    """
    c = torch.as_tensor(cost, dtype=torch.float64)
    if c.shape != s.shape:
        raise ValueError(f"cost has shape {tuple(c.shape)}, s has shape {tuple(s.shape)}")
    if (c < 0).any():
        raise ValueError("cost must be non-negative")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    scale = float(c.mean()) if c.numel() and float(c.mean()) > 0 else 1.0
    return _project_shift(s, c / scale, budget / scale, iters)


def _project_shift(
    s: torch.Tensor, c: torch.Tensor, budget: float, iters: int, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """clamp(s − v·w, 0, 1) with the smallest v ≥ 0 (to bisection precision) such that Σ c·x ≤ budget.

    ``w`` is ``shift`` (default ``c``, the Euclidean projection); ``w = d·c`` projects in the norm Σ (x − s)²/d.
    """
    if s.dim() != 1:
        raise ValueError(f"s must be 1-D, got shape {tuple(s.shape)}")
    x = s.detach().to(torch.float64)  # [N]
    if not torch.isfinite(x).all():
        raise ValueError("s contains non-finite values")
    w = c if shift is None else shift  # [N]
    clamped = x.clamp(0.0, 1.0)
    if x.numel() == 0 or float((c * clamped).sum()) <= budget:
        return clamped.to(s.dtype)
    pos = w > 0
    lo, hi = 0.0, float((x[pos] / w[pos]).max().clamp_min(0.0))  # at v = hi every shifted unit is 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((c * (x - mid * w).clamp(0.0, 1.0)).sum()) > budget:
            lo = mid
        else:
            hi = mid
    return (x - hi * w).clamp(0.0, 1.0).to(s.dtype)  # hi side: always inside the budget


def project(space: MaskSpace, s: torch.Tensor, sparsity: float, budget: str, fill: bool = False) -> torch.Tensor:
    """Project keep probabilities onto the sparsity budget of a mask space.

    Args:
        space: the mask space (gives unit types and costs).
        s: ``[N]`` probabilities.
        sparsity: fraction to remove, in [0, 1].
        budget: ``"per_type"`` — each unit type present separately at keep ratio ρ = 1 − sparsity (the paper:
            heads globally across layers, channels globally); ``"params"`` — one joint budget
            Σ c_u s_u ≤ (1 − sparsity)·Σ c_u, or, with layer units, expected kept parameters
            (:func:`expected_kept_params`, nesting counted once) ≤ (1 − sparsity)·prunable (:func:`project_nested`).
        fill: with layer units and ``params``, also raise probabilities that lie below the budget onto it (for a
            search's initial probabilities: see :func:`project_nested`). Ignored otherwise.

    Returns:
        ``[N]`` projected probabilities, same dtype as ``s``.

    Raises:
        UserError: unknown budget or sparsity outside [0, 1].
        ValueError: ``s`` has the wrong shape or is not finite.
    """
    _check_budget(budget)
    _check_sparsity(sparsity)
    if tuple(s.shape) != (space.num_units,):
        raise ValueError(f"probabilities must have shape ({space.num_units},), got {tuple(s.shape)}")
    keep = 1.0 - float(sparsity)
    if budget == "params" and space.include_layers:
        x = torch.as_tensor(s, dtype=torch.float64)
        out = project_nested(
            x,
            space.unit_type,
            space.unit_layer,
            space.cost,
            layer_fixed_params(space),
            keep * space.prunable_params,
            fill=fill,
        )
        return out.to(s.dtype)
    if budget == "params":
        cost = torch.as_tensor(space.cost, dtype=torch.float64)
        return project_weighted(s, cost, keep * float(cost.sum()))
    out = s.detach().clone()
    for t in (HEAD, CHANNEL, LAYER):
        sl = space.type_slice(t)
        if sl.stop > sl.start:
            out[sl] = project_keep_ratio(s[sl], keep)
    return out


# ----------------------------------------------------------------------------------------------- final mask
def _round_half_up(x: float) -> int:
    return int(math.floor(round(x, 9) + 0.5))


def _layer_base_params(space: MaskSpace) -> np.ndarray:
    """``[L]`` prunable parameters each layer holds when nothing is pruned (what ``kept_params`` counts for it)."""
    base = []
    for ls in space.layers:
        heads, channels = ls.attn_total(ls.num_query_heads, ls.num_kv_heads), ls.intermediate_size * ls.channel_cost
        base.append(ls.layer_params if space.include_layers else heads + channels)
    return np.asarray(base, dtype=np.int64)


def final_mask(space: MaskSpace, s: torch.Tensor | np.ndarray, sparsity: float, budget: str) -> np.ndarray:
    """Deterministic binary mask from keep probabilities that meets the budget (never a coin flip).

    - ``per_type``: for each unit type present, keep exactly the top ``round(ρ·n_type)`` units by s (ρ = 1 − sparsity,
      halves round up; ties broken by lower index).
    - ``params``: start from all kept; remove units in ascending s (ties: lower index first), skipping units inside an
      already removed layer, until ``space.kept_params(mask) ≤ (1 − sparsity)·space.prunable_params``. A removed layer
      removes what it still held. The budget is met within the last removed unit. Accounting is incremental
      (O(N log N) overall).

    Args:
        space: the mask space.
        s: ``[N]`` keep probabilities (tensor or array).
        sparsity: fraction to remove, in [0, 1].
        budget: ``"per_type"`` or ``"params"``.

    Returns:
        ``[N]`` float32 array of 0/1.

    Raises:
        UserError: unknown budget or sparsity outside [0, 1].
        ValueError: ``s`` has the wrong shape or is not finite.
    """
    _check_budget(budget)
    _check_sparsity(sparsity)
    probs = _as_probs(space, s)
    keep = 1.0 - float(sparsity)
    if budget == "per_type":
        mask = np.ones(space.num_units, dtype=np.float32)
        for t in (HEAD, CHANNEL, LAYER):
            idx = np.flatnonzero(space.unit_type == t)
            if idx.size == 0:
                continue
            n_keep = min(idx.size, _round_half_up(keep * idx.size))
            order = np.argsort(-probs[idx], kind="stable")  # descending s, lower index first on ties
            mask[idx[order[n_keep:]]] = 0.0
        return mask
    return _final_mask_params(space, probs, keep)[0]


def uniform_final_mask(space: MaskSpace, s: torch.Tensor | np.ndarray, sparsity: float) -> np.ndarray:
    """Deterministic final mask with **the same shape in every layer**: for each unit type, every layer keeps its
    top ``round(ρ·n)`` units by s (n = that layer's units of the type, equal in every layer; halves round up).

    The compacted model then has one head count and one MLP width, i.e. it is a stock checkpoint (plain
    ``from_pretrained``, any runtime that loads the architecture). The budget is met to within rounding per layer.

    Raises:
        UserError: the space has layer units, or a type's unit count differs between layers (e.g. a last channel
            block narrower than the others), so equal counts would not give equal widths.
    """
    _check_sparsity(sparsity)
    probs = _as_probs(space, s)
    if space.include_layers:
        raise UserError("mask.shape='uniform' keeps every layer: set mask.layers=false")
    keep = 1.0 - float(sparsity)
    mask = np.zeros(space.num_units, dtype=np.float32)
    for t in (HEAD, CHANNEL):
        groups = [np.flatnonzero((space.unit_type == t) & (space.unit_layer == li)) for li in range(space.num_layers)]
        groups = [g for g in groups if g.size]
        if not groups:
            continue
        sizes = {g.size for g in groups}
        widths = {tuple(space.cost[g]) for g in groups}
        if len(sizes) != 1 or len(widths) != 1 or len(set(space.cost[groups[0]])) != 1:
            raise UserError(
                "mask.shape='uniform' needs the same units in every layer, all of one size (MLP width a "
                f"multiple of mask.channel_block={space.channel_block})"
            )
        k = min(groups[0].size, _round_half_up(keep * groups[0].size))
        for g in groups:
            mask[g[np.argsort(-probs[g], kind="stable")[:k]]] = 1.0
    return mask


def _final_mask_params(space: MaskSpace, probs: np.ndarray, keep: float) -> tuple[np.ndarray, int]:
    """Greedy removal in ascending s until kept prunable params <= keep·prunable. Returns (mask, kept params)."""
    probs = _as_probs(space, probs)
    mask = np.ones(space.num_units, dtype=np.float32)
    limit = keep * space.prunable_params
    layer_kept = [int(v) for v in _layer_base_params(space)]
    layer_gone = [False] * space.num_layers
    kept = sum(layer_kept)
    order = np.argsort(probs, kind="stable").tolist()  # ascending s, lower index first on ties
    types, layers, costs = space.unit_type.tolist(), space.unit_layer.tolist(), space.cost.tolist()
    for u in order:
        if kept <= limit:
            break
        li = layers[u]
        if layer_gone[li]:
            continue
        if types[u] == LAYER:
            kept -= layer_kept[li]
            layer_kept[li] = 0
            layer_gone[li] = True
        else:
            kept -= costs[u]
            layer_kept[li] -= costs[u]
        mask[u] = 0.0
    return mask, kept


# ------------------------------------------------------------------------------------------ expected budget
def layer_fixed_params(space: MaskSpace) -> np.ndarray:
    """``[L]`` prunable parameters a layer holds that no head or channel unit of the space removes: heads / channels
    that are not units, shared attention parameters (q/k norms), and (with layer units) the layer's norms and output
    biases — removed only with the layer."""
    fixed = np.zeros(space.num_layers)
    for li, ls in enumerate(space.layers):
        heads, channels = ls.attn_params(ls.num_query_heads, ls.num_kv_heads), ls.intermediate_size * ls.channel_cost
        fixed[li] = (0 if space.include_heads else heads) + (0 if space.include_channels else channels)
        if space.include_layers:
            fixed[li] += ls.layer_params - heads - channels  # norms, output biases, shared attention parameters
        else:
            fixed[li] += ls.attn_fixed  # q/k norms: removed only with every head of the layer
    return fixed


def _nested_terms(
    x: np.ndarray, types: np.ndarray, layers: np.ndarray, cost: np.ndarray, fixed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(``[L]`` layer keep probabilities, ``[L]`` expected kept head/channel params per layer) of probabilities x."""
    sub = types != LAYER
    weighted = np.bincount(layers[sub], weights=cost[sub] * x[sub], minlength=fixed.size)  # [L]
    layer_p = np.ones(fixed.size)
    layer_p[layers[~sub]] = x[~sub]
    return layer_p, weighted


def nested_expected_kept(
    x: np.ndarray, types: np.ndarray, layers: np.ndarray, cost: np.ndarray, fixed: np.ndarray
) -> float:
    """Σ_l x_layer(l) · (fixed_l + Σ_{u in l, not a layer unit} c_u x_u): expected kept parameters when a layer unit
    gates everything inside its layer (layers without a layer unit have x_layer = 1).

    Args:
        x: ``[M]`` keep probabilities (units, or the allocation's groups with ``cost`` = the group's cost).
        types, layers, cost: ``[M]`` type, layer and parameters of each entry (a layer entry's cost is not used: its
            weight is what the layer holds).
        fixed: ``[L]`` parameters of each layer that no entry removes but its layer unit (:func:`layer_fixed_params`).
    """
    layer_p, weighted = _nested_terms(x, types, layers, np.asarray(cost, dtype=np.float64), fixed)
    return float((layer_p * (fixed + weighted)).sum())


def project_nested(
    x: torch.Tensor,
    types: np.ndarray,
    layers: np.ndarray,
    cost: np.ndarray,
    fixed: np.ndarray,
    budget: float,
    metric: torch.Tensor | None = None,
    iters: int = 100,
    fill: bool = False,
) -> torch.Tensor:
    """Onto {y ∈ [0, 1]^M : :func:`nested_expected_kept` (y) ≤ budget}: ``clamp(x − v·D·w, 0, 1)``, v ≥ 0 by bisection.

    The expected kept parameters E(y) = Σ_l y_layer·(fixed_l + Σ c_u y_u) are bilinear, so their budget set is not a
    half-space and the weighted projection does not apply as is (counting a layer's full cost on top of its heads' and
    channels' would count nested parameters twice: at 0.5 everywhere E is 25 % of the model, not 50 %). The step is
    taken along w = ∇E at clamp(x) — an inner unit's cost times its layer's probability, a layer unit's expected
    content — scaled by the metric D (1 = Euclidean) and sized so that E(clamp(x − v·D·w)) meets the budget exactly
    (E is non-increasing in v). Without layer entries w = c and this is :func:`project_weighted`.

    Args:
        x: ``[M]`` float64 values (clamped to [0, 1]).
        types, layers, cost, fixed: as :func:`nested_expected_kept`.
        budget: kept parameters allowed.
        metric: ``[M]`` positive scaling D of the step (None = 1).
        iters: bisection steps.
        fill: also move x that lies *below* the budget up onto it (v ≤ 0), for initial probabilities: a uniform
            ρ everywhere keeps only ≈ ρ² of a model whose layers are units too, so a search started there would
            sample far sparser masks than the final mask it returns.

    Returns:
        ``[M]`` float64, inside the budget (to bisection precision, on the inside); on it when ``fill``.
    """
    y = x.detach().to(torch.float64)  # [M]
    if not torch.isfinite(y).all():
        raise ValueError("probabilities contain non-finite values")
    types, layers = np.asarray(types), np.asarray(layers, dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    clamped = y.clamp(0.0, 1.0)

    def kept(v: float) -> float:  # E(clamp(y − v·w)), non-increasing in v
        return nested_expected_kept((y - v * w).clamp(0.0, 1.0).numpy(), types, layers, cost, fixed)

    e0 = nested_expected_kept(clamped.numpy(), types, layers, cost, fixed)
    if e0 <= budget and not (fill and e0 < budget):
        return clamped
    layer_p, weighted = _nested_terms(clamped.numpy(), types, layers, cost, fixed)
    w = np.where(types == LAYER, fixed[layers] + weighted[layers], cost * layer_p[layers])  # [M] ∇E at clamp(x)
    if e0 < budget:  # filling: a layer with nothing kept inside still gets its own weight, so it can rise
        w = np.where(
            types == LAYER,
            fixed[layers]
            + np.bincount(layers[types != LAYER], weights=cost[types != LAYER], minlength=fixed.size)[layers] * 0.5,
            w,
        )
        w = np.where((types != LAYER) & (w == 0), cost * 0.5, w)
    w = torch.as_tensor(w / max(float(w.mean()), 1e-300))
    if metric is not None:
        w = w * metric.to(torch.float64)
    pos = w > 0
    if e0 < budget:  # v in [lo, 0]: at lo every moving entry is 1
        lo, hi = -float(((1.0 - y[pos]) / w[pos]).max().clamp_min(0.0)), 0.0
        if kept(lo) <= budget:
            return (y - lo * w).clamp(0.0, 1.0)
    else:
        lo, hi = 0.0, float((y[pos] / w[pos]).max().clamp_min(0.0))  # at v = hi every moving entry is 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if kept(mid) > budget:
            lo = mid
        else:
            hi = mid
    return (y - hi * w).clamp(0.0, 1.0)


def expected_kept_params(space: MaskSpace, s: torch.Tensor | np.ndarray) -> float:
    """Expected prunable parameters kept by a mask m ~ Bernoulli(s) (independent units).

    Without layer units this is Σ c_u s_u over heads and channels (plus any heads/channels not in the space, which are
    always kept). With layer units each layer's contents (its head/channel terms and its norms) are weighted by the
    layer's s, so nested units are not double counted. For a 0/1 ``s`` it equals ``space.kept_params(s)``.

    Args:
        space: the mask space.
        s: ``[N]`` keep probabilities.

    Returns:
        The expectation, in parameters.
    """
    return nested_expected_kept(
        _as_probs(space, s), space.unit_type, space.unit_layer, space.cost, layer_fixed_params(space)
    )


def expected_sparsity(space: MaskSpace, s: torch.Tensor | np.ndarray) -> float:
    """Expected fraction of prunable parameters removed: ``1 − expected_kept_params / prunable_params``.

    Args:
        space: the mask space.
        s: ``[N]`` keep probabilities.

    Returns:
        A number in [0, 1].
    """
    return 1.0 - expected_kept_params(space, s) / space.prunable_params
