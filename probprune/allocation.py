"""Allocation search: learn how much of each layer to keep, let the metric choose which units.

With tens of thousands of single-channel units a few hundred forwards give no usable signal per unit (a channel
moves the loss by ~4e-4 nats against 0.3–1.5 nats of noise per forward on SmolLM2-135M), so this policy searches a few dozen numbers instead — one keep fraction a_g ∈ [0, 1] per group g = (layer l, unit type t)
(t ∈ heads, channel blocks, layers; a layer unit is a group of one) — and keeps, inside each group, the units with the
highest init-metric score (e.g. Wanda-sp).

One step draws K masks:

    k_jg ~ Binomial(n_g, a_g)        drawn as n_g Bernoulli(a_g) coin flips and counted (policy's own generator)
    m_j  = top-k_jg units of every group g by metric score

the caller measures their losses L_j, then

    score_jg = (k_jg − n_g·a_g) / √(n_g·a_g(1−a_g) + 1e-7)     ("sqrt", default: a z-score of the count)   or
    score_jg = (k_jg − n_g·a_g) / (a_g(1−a_g) + 1e-7)          ("exact": d log Binomial(k; n, a) / da)
    g        = Σ_j (L_j − b_j)·score_j / (K−1 for "ema", K for "loo")   (baselines exactly as in :class:`Policy`)
    a        ← project_D(a − lr_t·g)     (projection in the metric of the scaling D, see below)

The "exact" score is the true score function of the count, so its estimate is unbiased; "sqrt" multiplies group g's
component by the positive factor a(1−a)/√(n·a(1−a)) (a per-group preconditioner, like the paper's per-unit √ scaling),
so every group moves by O(lr·ΔL) per step whatever its size — a 48-block layer is not pushed √48 times harder than a
3-head layer. A per-group rescaled step followed by a Euclidean projection would converge to the wrong point (its fixed
point has D·∇E[L] ∝ c instead of ∇E[L] ∝ c; on a toy objective it settled a whole unit away from the optimum), so the
step is projected in the metric of D: x = clamp(y − v·D·c, 0, 1), which keeps the constrained optimum of E[L] as the
fixed point. The counts are read back from the masks (k_jg = Σ_{u∈g} m_ju), so :meth:`AllocationPolicy.step` needs
nothing but what :meth:`AllocationPolicy.sample` returned.

Budgets (the same two as :mod:`probprune.projection`, on the allocation):

- ``per_type``: Σ_l n_lt·a_lt ≤ ρ·N_t for each unit type t (ρ = 1 − sparsity); weighted projection, weights n_lt.
- ``params``: Σ_g C_g·a_g ≤ (1 − sparsity)·Σ_u c_u with C_g = Σ_{u∈g} c_u (the parameters the whole group removes),
  mirroring the unit policy's projection. With layer groups a layer's fraction gates its heads and channels: the
  budget is on the expected kept parameters Σ_l a_layer·(fixed_l + Σ_g C_g·a_g) (nesting counted once, what the
  sampled and final masks keep), projected by :func:`probprune.projection.project_nested` in the same metric.

Final mask (deterministic): each unit u of group g at rank r (0 = best score) gets the priority q_u = n_g·a_g − r;
:func:`probprune.projection.final_mask` then keeps the top units by q under the budget. Units with q > 0.5 are exactly
"round(n_g·a_g) top units per group"; the budget fix then drops (or adds) the units whose groups have the largest
rounding remainders — largest-remainder apportionment — so ``per_type`` meets the unit count of each type exactly and
``params`` meets the parameter budget within one unit. Since q decreases with rank, every group keeps a top-k prefix.

Initialisation: ``probs=None`` gives a = ρ everywhere (the final mask is then the Wanda-sp uniform-per-layer mask);
``probs=[N]`` unit probabilities (e.g. the search's Wanda-sp init) give each group the mean probability of its units
("the layer's share of the init"); either is then projected onto the budget.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from probprune import projection
from probprune.errors import UserError
from probprune.mask_space import CHANNEL, HEAD, LAYER, TYPE_NAMES, MaskSpace
from probprune.policy import SCORE_EPS, ScoreFunctionPolicy, _check_k

STATE_KIND = "allocation"


class AllocationPolicy(ScoreFunctionPolicy):
    """Per-(layer, unit type) keep fractions, trained by a score-function gradient of the kept counts.

    Same interface as :class:`probprune.policy.Policy` (``sample``, ``step``, ``final_mask``, ``state_dict``,
    ``load_state_dict``, ``probs``, ``step_count``, ``total_dropped``, ``last_dropped``), so
    :func:`probprune.search.run_search` drives either; baselines, the update, the counters and the state come from
    their shared base :class:`probprune.policy.ScoreFunctionPolicy` (θ = a, P = G).

    Args:
        space: the mask space.
        scores: ``[N]`` unit importance scores (higher = keep first), e.g. Wanda-sp; they fix the order in which a
            group's units are kept. Ties: lower unit index first.
        probs: ``[N]`` unit keep probabilities to initialise from (each group gets the mean of its units), or None
            for a = ρ = 1 − sparsity everywhere. Projected onto the budget either way.
        **options: the settings of :class:`~probprune.policy.ScoreFunctionPolicy`: ``lr`` (base learning rate; a
            step moves a fraction a_g, not a unit probability), ``total_steps``, ``sparsity``, ``lr_schedule``,
            ``baseline`` (``"ema"`` or ``"loo"``), ``ema_window``, ``score_scaling`` (``"sqrt"``, the count z-score,
            or ``"exact"``; see the module docstring), ``budget`` and ``seed``.

    Attributes:
        probs: ``[G]`` float64 keep fractions a_g, groups ordered by type (heads, channels, layers), then layer.
        group_type, group_layer: ``[G]`` type and layer of each group.
        group_size: ``[G]`` int64 units per group n_g.
        group_cost: ``[G]`` float64 parameters the whole group removes, C_g.
        unit_group: ``[N]`` int64 group of each unit.
        unit_rank: ``[N]`` int64 rank of each unit inside its group (0 = highest score).

    Raises:
        ConfigError: every invalid setting, listed together.
        ValueError: ``scores`` or ``probs`` has the wrong shape or a non-finite value.

    Example:
        >>> policy = AllocationPolicy(space, wanda_scores, lr=0.05, total_steps=300, sparsity=0.5)
        >>> masks = policy.sample(4)                      # [4, N], top-k per (layer, type)
        >>> stats = policy.step(masks, evaluator(masks))  # losses: [4]
        >>> mask = policy.final_mask()                    # [N], meets the budget
    """

    _state_label = "allocation policy"

    def __init__(
        self,
        space: MaskSpace,
        scores: torch.Tensor | np.ndarray,
        *,
        probs: torch.Tensor | np.ndarray | None = None,
        **options: Any,
    ) -> None:
        super().__init__(space, **options)
        n_units = space.num_units
        sc = _finite_vector(scores, n_units, "scores")

        # groups: runs of units with the same (type, layer); the space orders units by type, then layer
        key = space.unit_type.astype(np.int64) * (space.num_layers + 1) + space.unit_layer
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        if np.unique(key[starts]).size != starts.size:
            raise ValueError("the mask space does not hold each (type, layer) group contiguously")
        unit_group = np.cumsum(np.r_[False, key[1:] != key[:-1]]).astype(np.int64)  # [N]
        n_groups = starts.size
        unit_rank = np.empty(n_units, dtype=np.int64)
        for lo, hi in zip(starts, np.r_[starts[1:], n_units]):
            order = np.argsort(-sc[lo:hi], kind="stable")  # best first, lower index first on ties
            unit_rank[lo + order] = np.arange(hi - lo)
        self.group_type = space.unit_type[starts].copy()  # [G]
        self.group_layer = space.unit_layer[starts].copy()  # [G]
        self.group_size = np.bincount(unit_group, minlength=n_groups).astype(np.int64)  # [G]
        self.group_cost = np.bincount(unit_group, weights=space.cost.astype(np.float64), minlength=n_groups)  # [G]
        self.unit_group = unit_group
        self.unit_rank = unit_rank
        self._unit_group_t = torch.as_tensor(unit_group)  # [N]
        self._unit_rank_t = torch.as_tensor(unit_rank, dtype=torch.int32)  # [N]
        self._n_t = torch.as_tensor(self.group_size, dtype=torch.float64)  # [G]
        self._ends = torch.as_tensor(np.r_[starts[1:], n_units] - 1)  # [G] last unit of each group
        self._group_units = [torch.arange(lo, hi) for lo, hi in zip(starts, np.r_[starts[1:], n_units])]

        keep = 1.0 - self.sparsity
        if probs is None:
            a = torch.full((n_groups,), keep, dtype=torch.float64)
        else:
            p = torch.as_tensor(_finite_vector(probs, n_units, "probs")).clamp(0.0, 1.0)  # [N]
            a = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, self._unit_group_t, p) / self._n_t
        self.probs = self._project(a, fill=True)  # [G] float64, on the budget

    # ------------------------------------------------------------------------------------------------- groups
    @property
    def num_groups(self) -> int:
        return int(self.group_size.shape[0])

    def group_names(self) -> list[str]:
        """``"layer 3 channel"``-style labels of the groups, in the order of :attr:`probs`."""
        return [f"layer {int(li)} {TYPE_NAMES[int(t)]}" for t, li in zip(self.group_type, self.group_layer)]

    def counts(self, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Kept units per group.

        Args:
            masks: ``[K, N]`` (or ``[N]``) 0/1 masks.

        Returns:
            ``[K, G]`` (or ``[G]``) float64 counts.
        """
        m = torch.as_tensor(masks, dtype=torch.float64)
        squeeze = m.dim() == 1
        m = m[None] if squeeze else m  # [K, N]
        if m.dim() != 2 or m.shape[1] != self.space.num_units:
            raise ValueError(f"masks must be [K, {self.space.num_units}], got {tuple(m.shape)}")
        k = self._group_sums(m)  # [K, G]
        return k[0] if squeeze else k

    def _group_sums(self, x: torch.Tensor) -> torch.Tensor:
        # x: [K, N] -> [K, G] sums over each group's contiguous run (exact for 0/1 values)
        c = x.cumsum(1)[:, self._ends]  # [K, G] running total at each group's last unit
        return torch.cat([c[:, :1], c[:, 1:] - c[:, :-1]], dim=1)

    def _masks_from_counts(self, counts: torch.Tensor) -> torch.Tensor:
        # counts: [K, G] -> masks [K, N]: unit kept iff its rank < its group's count
        k = counts.to(torch.float64).round().to(torch.int32)[:, self._unit_group_t]  # [K, N]
        return (self._unit_rank_t[None] < k).to(torch.float32)

    # ----------------------------------------------------------------------------------------------- sampling
    def sample(self, k: int) -> torch.Tensor:
        """Draw K ≥ 1 masks ``[K, N]`` (float32 0/1): per group a count k ~ Binomial(n, a) (n coin flips), then the
        top-k units by score."""
        _check_k(k)
        u = torch.rand(k, self.space.num_units, generator=self.generator, dtype=torch.float64)  # [K, N]
        hits = (u < self.probs[self._unit_group_t]).to(torch.int32)  # [K, N] one Bernoulli(a_g) per slot
        return self._masks_from_counts(self._group_sums(hits))  # [K, N]

    # ----------------------------------------------------------------------------------------------- gradient
    def scores(self, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Per-sample scores of the group counts at the current a.

        Args:
            masks: ``[K, N]`` 0/1 masks.

        Returns:
            ``[K, G]`` float64: (k − n·a)/√(n·a(1−a)+ε) for ``sqrt``, (k − n·a)/(a(1−a)+ε) for ``exact``, ε = 1e-7.
        """
        k = self.counts(masks)  # [K, G]
        a, n = self.probs, self._n_t  # [G], [G]
        var = a * (1.0 - a)  # [G]
        denom = (n * var + SCORE_EPS).sqrt() if self.score_scaling == "sqrt" else var + SCORE_EPS
        return (k - n * a) / denom  # [K, G]

    # ---------------------------------------------------------------------------------------------- projection
    def metric(self) -> torch.Tensor:
        """``[G]`` float64 preconditioner D at the current a: the factor that turns the exact score into the used one.

        ``sqrt``: D = (a(1−a) + ε)/√(n·a(1−a) + ε) (so D·exact score = the "sqrt" score); ``exact``: D = 1.
        """
        if self.score_scaling == "exact":
            return torch.ones(self.num_groups, dtype=torch.float64)
        var = self.probs * (1.0 - self.probs)  # [G]
        return (var + SCORE_EPS) / (self._n_t * var + SCORE_EPS).sqrt()

    def _metric(self) -> torch.Tensor:
        return self.metric()  # [G]: steps are projected in the metric of D

    def _project(self, a: torch.Tensor, metric: torch.Tensor | None = None, fill: bool = False) -> torch.Tensor:
        """a ([G]) onto the budget: per type Σ n·a ≤ ρ·N_t, or Σ C·a ≤ (1 − sparsity)·Σ c (``params``).

        With ``metric`` D the projection is taken in the norm Σ (x − a)²/D, i.e. x = clamp(a − v·D·c, 0, 1): a step
        preconditioned by D and projected in the same metric has the constrained optimum of E[L] as its fixed point
        (a Euclidean projection after a per-group rescaled step would converge elsewhere). None = Euclidean.
        ``fill`` (the initial a): with layer groups and ``params``, a below the budget is raised onto it.
        """
        keep = 1.0 - self.sparsity
        a = a.to(torch.float64)
        d = torch.ones_like(a) if metric is None else metric.to(torch.float64)
        if self.budget == "params" and self.space.include_layers:  # a layer's fraction gates its heads and channels
            return projection.project_nested(
                a,
                self.group_type,
                self.group_layer,
                self.group_cost,
                projection.layer_fixed_params(self.space),
                keep * self.space.prunable_params,
                metric=d,
                fill=fill,
            )
        if self.budget == "params":
            cost = torch.as_tensor(self.group_cost)
            scale = float(cost.mean()) if float(cost.mean()) > 0 else 1.0
            return _project_metric(a, d, cost / scale, keep * float(self.space.cost.sum()) / scale)
        out = a.clamp(0.0, 1.0)
        for t in (HEAD, CHANNEL, LAYER):
            sel = torch.as_tensor(np.flatnonzero(self.group_type == t))
            if sel.numel():
                n = self._n_t[sel]
                out[sel] = _project_metric(a[sel], d[sel], n, keep * float(n.sum()))
        return out

    # ------------------------------------------------------------------------------------------------- output
    def unit_probs(self) -> torch.Tensor:
        """Marginal keep probability of every unit under :meth:`sample`: P(Binomial(n_g, a_g) > rank).

        Returns:
            ``[N]`` float64, non-increasing in rank inside each group (use it where a unit-level probability is
            wanted, e.g. :func:`probprune.widths.align_mask`).
        """
        out = torch.empty(self.space.num_units, dtype=torch.float64)
        for g, sel in enumerate(self._group_units):
            out[sel] = _binomial_survival(int(self.group_size[g]), float(self.probs[g]))[self._unit_rank_t[sel].long()]
        return out

    def _unit_keep_probs(self) -> torch.Tensor:
        return self.unit_probs()  # [N]

    def expected_kept_params(self) -> float:
        """Expected prunable parameters kept by a mask from :meth:`sample` (the quantity the ``params`` budget holds):
        Σ_l a_layer·(fixed_l + Σ_g C_g·a_g), a layer without a layer group counting as a_layer = 1."""
        return projection.nested_expected_kept(
            self.probs.numpy(),
            self.group_type,
            self.group_layer,
            self.group_cost,
            projection.layer_fixed_params(self.space),
        )

    def priorities(self) -> np.ndarray:
        """``[N]`` float64 q_u = n_g·a_g − rank_u: the order in which :meth:`final_mask` keeps units."""
        a = self.probs.numpy()
        return self.group_size[self.unit_group] * a[self.unit_group] - self.unit_rank

    def final_mask(self) -> np.ndarray:
        """Deterministic final mask: round(n·a) top units per group, then the budget fix (module docstring).

        Returns:
            ``[N]`` float32 array of 0/1; ``per_type`` keeps exactly round(ρ·N_t) units of each type, ``params``
            meets the parameter budget within one unit.
        """
        return projection.final_mask(self.space, self.priorities(), self.sparsity, self.budget)

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-for-bit (safe for ``torch.load(weights_only=True)``).

        Returns:
            ``kind`` (``"allocation"``), ``probs`` ([G]), ``delta``, ``delta_initialised``, ``step_count``,
            ``total_dropped``, ``generator_state``, ``num_units``, ``num_groups``.
        """
        return {"kind": STATE_KIND, **super().state_dict(), "num_groups": int(self.num_groups)}

    def _load_probs(self, state: dict[str, Any]) -> torch.Tensor:
        """The saved a, for :meth:`load_state_dict`.

        Raises:
            UserError: the state is a unit policy's, or it belongs to another mask space.
        """
        if state.get("kind") != STATE_KIND:
            raise UserError(
                "the saved policy state is not an allocation search's (search.method=units?); resume it "
                "with the method it was started with"
            )
        probs = torch.as_tensor(state["probs"], dtype=torch.float64)
        if tuple(probs.shape) != (self.num_groups,) or int(state.get("num_units", -1)) != self.space.num_units:
            raise UserError(
                f"allocation state has {probs.numel()} groups over {state.get('num_units')} units, this mask space "
                f"has {self.num_groups} groups over {self.space.num_units} units: was it saved for another model or "
                "mask space?"
            )
        return probs


# ------------------------------------------------------------------------------------------------- helpers
def _finite_vector(x: torch.Tensor | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def _project_metric(y: torch.Tensor, d: torch.Tensor, c: torch.Tensor, budget: float, iters: int = 100) -> torch.Tensor:
    """clamp(y − v·d·c, 0, 1) with the smallest v ≥ 0 (to bisection precision) such that Σ c·x ≤ budget.

    The projection of y onto {x ∈ [0, 1]^G : Σ c·x ≤ budget} in the norm Σ (x − y)²/d (d > 0); d = 1 is
    :func:`probprune.projection.project_weighted`. Groups with c·d = 0 only clamp.
    """
    return projection._project_shift(y.to(torch.float64), c, budget, iters, shift=d * c)


def _binomial_survival(n: int, a: float) -> torch.Tensor:
    """``[n]`` float64: P(K > r) for r = 0..n−1, K ~ Binomial(n, a)."""
    if a <= 0.0:
        return torch.zeros(n, dtype=torch.float64)
    if a >= 1.0:
        return torch.ones(n, dtype=torch.float64)
    k = torch.arange(n + 1, dtype=torch.float64)  # [n+1]
    log_pmf = (
        math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1) + k * math.log(a) + (n - k) * math.log1p(-a)
    )
    pmf = log_pmf.exp()  # [n+1]
    tail = pmf.flip(0).cumsum(0).flip(0)  # [n+1], tail[r] = P(K >= r)
    return tail[1:].clamp(0.0, 1.0)  # P(K >= r+1) = P(K > r)
