"""The search policy: keep probabilities s, mask sampling, the score-function gradient, and the update.

One step: draw K masks m_j ~ Bernoulli(s), the caller measures their losses L_j with forward passes only,
then

    score_j = (m_j − s) / √(s(1−s) + 1e-7)            ("sqrt", the paper's code)   or
    score_j = (m_j − s) / (s(1−s) + 1e-7)             ("exact" Bernoulli score)
    g       = Σ_j (L_j − δ)·score_j / max(K−1, 1)     ("ema" baseline δ, updated after use)   or
    g       = Σ_j (L_j − b_j)·score_j / K             ("loo": b_j = mean of the other samples' losses)
    s       ← project(s − lr_t·g)

Samples with a non-finite loss are dropped before anything else. The policy owns a seeded ``torch.Generator``; its
state is part of :meth:`Policy.state_dict`, so a resumed run draws exactly the masks an uninterrupted one would.

:class:`ScoreFunctionPolicy` holds what :class:`Policy` shares with :class:`probprune.allocation.AllocationPolicy`
(settings and their validation, the baselines and the dropping of non-finite losses, the step, the counters, the
state); each subclass adds only its parameterisation, sampling, scores, projection and final mask.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from probprune import projection
from probprune.errors import ConfigError, UserError
from probprune.mask_space import CHANNEL, HEAD, LAYER, MaskSpace

LR_SCHEDULES = ("cosine", "constant")
BASELINES = ("ema", "loo")
SCORE_SCALINGS = ("sqrt", "exact")
SAMPLINGS = ("independent", "antithetic")
SCORE_EPS = 1e-7


# ----------------------------------------------------------------------------------------------- schedules
def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` at step 0 to 0 at ``total_steps``.

    Args:
        base_lr: learning rate at step 0.
        step: steps already taken (clipped to [0, total_steps]).
        total_steps: length of the run; ≤ 0 means no decay.

    Returns:
        ``base_lr · 0.5 · (1 + cos(π · step / total_steps))``.
    """
    if total_steps <= 0:
        return float(base_lr)
    frac = min(max(step, 0), total_steps) / total_steps
    return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_at(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate of a schedule at a step.

    Args:
        schedule: ``"cosine"`` or ``"constant"``.
        base_lr: learning rate at step 0.
        step: steps already taken.
        total_steps: length of the run.

    Returns:
        The learning rate.

    Raises:
        UserError: unknown schedule.
    """
    if schedule == "cosine":
        return cosine_lr(base_lr, step, total_steps)
    if schedule == "constant":
        return float(base_lr)
    raise UserError(f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {schedule!r}")


# ---------------------------------------------------------------------------------------------- init probs
def _check_keep_ratio(keep_ratio: float) -> None:
    if not 0.0 <= keep_ratio <= 1.0:
        raise UserError(f"keep_ratio must be in [0, 1], got {keep_ratio}")


def _shift_to_mean(p: np.ndarray, space: MaskSpace, keep_ratio: float) -> np.ndarray:
    """Per unit type, add a constant so the type's mean is ``keep_ratio``, then clamp to [0, 1]."""
    out = p.astype(np.float64, copy=True)
    for t in (HEAD, CHANNEL, LAYER):
        sel = space.unit_type == t
        if sel.any():
            out[sel] += keep_ratio - out[sel].mean()
    return np.clip(out, 0.0, 1.0)


def _zscore(x: np.ndarray) -> np.ndarray:
    """z-scores of a group; 0 for a single unit or zero variance."""
    if x.size < 2:
        return np.zeros_like(x)
    std = x.std()
    if not std > 1e-12 * max(1.0, float(np.abs(x).max())):
        return np.zeros_like(x)
    return (x - x.mean()) / std


def scores_to_probs(space: MaskSpace, scores: np.ndarray, keep_ratio: float) -> np.ndarray:
    """Wanda-sp-style initial probabilities from importance scores.

    For each unit type separately: z-score the scores per layer (over that type's units in the layer; layer units are
    z-scored across layers), squash with a sigmoid, shift so the type's mean equals ``keep_ratio``, clamp to [0, 1].
    A higher score means a more important unit and a higher probability; the order inside a layer is kept.

    Args:
        space: the mask space.
        scores: ``[N]`` importance scores (higher = keep).
        keep_ratio: target mean probability per type, ρ = 1 − sparsity.

    Returns:
        ``[N]`` float64 probabilities.

    Raises:
        UserError: ``keep_ratio`` outside [0, 1].
        ValueError: ``scores`` has the wrong shape or a non-finite value.
    """
    _check_keep_ratio(keep_ratio)
    x = np.asarray(scores, dtype=np.float64)
    if x.shape != (space.num_units,):
        raise ValueError(f"scores must have shape ({space.num_units},), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"scores contain {int((~np.isfinite(x)).sum())} non-finite values")
    z = np.zeros_like(x)
    for sel in space.unit_groups():  # per layer and type; layer units across layers
        z[sel] = _zscore(x[sel])
    return _shift_to_mean(1.0 / (1.0 + np.exp(-z)), space, keep_ratio)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def uniform_probs(space: MaskSpace, keep_ratio: float) -> np.ndarray:
    """Every unit at ``keep_ratio``.

    Args:
        space: the mask space.
        keep_ratio: ρ in [0, 1].

    Returns:
        ``[N]`` float64 probabilities.

    Raises:
        UserError: ``keep_ratio`` outside [0, 1].
    """
    _check_keep_ratio(keep_ratio)
    return np.full(space.num_units, float(keep_ratio), dtype=np.float64)


def random_probs(space: MaskSpace, keep_ratio: float, generator: torch.Generator | np.random.Generator) -> np.ndarray:
    """Uniform random probabilities in [0, 1], shifted per unit type to mean ``keep_ratio``, clamped.

    Args:
        space: the mask space.
        keep_ratio: ρ in [0, 1].
        generator: a seeded ``torch.Generator`` or ``numpy.random.Generator``.

    Returns:
        ``[N]`` float64 probabilities.

    Raises:
        UserError: ``keep_ratio`` outside [0, 1].
    """
    _check_keep_ratio(keep_ratio)
    if isinstance(generator, np.random.Generator):
        u = generator.random(space.num_units)
    else:
        u = torch.rand(space.num_units, generator=generator, dtype=torch.float64).numpy()
    return _shift_to_mean(u, space, keep_ratio)


# -------------------------------------------------------------------------------------------- shared base
class ScoreFunctionPolicy(ABC):
    """Keep probabilities θ ([P] float64) trained by a score-function gradient: what :class:`Policy` (θ = s, one
    probability per unit, P = N) and :class:`probprune.allocation.AllocationPolicy` (θ = a, one keep fraction per
    (layer, type) group, P = G) share.

    It owns the settings and their validation, the policy's generator, the baseline (EMA δ or leave-one-out) and the
    dropping of non-finite losses in :meth:`gradient`, the update in :meth:`step`, the counters (δ, ``step_count``,
    ``total_dropped``, ``last_dropped``) and :meth:`state_dict` / :meth:`load_state_dict`. A subclass sets
    ``self.probs`` after calling ``__init__`` and supplies the parameterisation: :meth:`sample`, :meth:`scores`,
    :meth:`_project`, :meth:`_unit_keep_probs`, :meth:`final_mask` and :meth:`_load_probs` (optionally :meth:`_metric`
    and extra state keys around ``super().state_dict()``).

    Args:
        space: the mask space.
        lr: base learning rate.
        total_steps: planned steps (the cosine schedule reaches 0 there).
        sparsity: fraction to remove, in [0, 1].
        lr_schedule: ``"cosine"`` or ``"constant"``.
        baseline: ``"ema"`` or ``"loo"`` (leave-one-out).
        ema_window: EMA window w, λ = 1/w.
        score_scaling: ``"sqrt"`` or ``"exact"``.
        budget: ``"per_type"`` or ``"params"``.
        seed: seed of the policy's own generator.
        extra_choices: ``(name, value, allowed)`` of further choice settings, validated (and listed) before
            ``budget``.

    Raises:
        ConfigError: every invalid setting, listed together.
    """

    # how load_state_dict names the state in its "missing keys" error
    _state_label = "policy"
    probs: torch.Tensor  # [P] float64, set by the subclass

    def __init__(
        self,
        space: MaskSpace,
        *,
        lr: float,
        total_steps: int,
        sparsity: float,
        lr_schedule: str = "cosine",
        baseline: str = "ema",
        ema_window: float = 5,
        score_scaling: str = "sqrt",
        budget: str = "per_type",
        seed: int = 0,
        extra_choices: tuple[tuple[str, Any, tuple[str, ...]], ...] = (),
    ) -> None:
        errors = []
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            errors.append(f"lr must be a finite number >= 0, got {lr!r}")
        if not (isinstance(total_steps, int) and total_steps >= 1):
            errors.append(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity <= 1.0):
            errors.append(f"sparsity must be a number in [0, 1], got {sparsity!r}")
        if not (isinstance(ema_window, (int, float)) and ema_window >= 1):
            errors.append(f"ema_window must be >= 1, got {ema_window!r}")
        for name, value, allowed in (
            ("lr_schedule", lr_schedule, LR_SCHEDULES),
            ("baseline", baseline, BASELINES),
            ("score_scaling", score_scaling, SCORE_SCALINGS),
            *extra_choices,
            ("budget", budget, projection.BUDGETS),
        ):
            if value not in allowed:
                errors.append(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if errors:
            raise ConfigError(errors)

        self.space = space
        self.lr = float(lr)
        self.total_steps = total_steps
        self.sparsity = float(sparsity)
        self.lr_schedule = lr_schedule
        self.baseline = baseline
        self.ema_window = float(ema_window)
        self.score_scaling = score_scaling
        self.budget = budget
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.delta = 0.0  # EMA baseline δ
        self.delta_initialised = False
        self.step_count = 0
        self.total_dropped = 0
        self.last_dropped = 0

    # ------------------------------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def sample(self, k: int) -> torch.Tensor:
        """Draw K masks (``[K, N]`` float32 of 0/1) with the policy's generator."""

    @abstractmethod
    def final_mask(self) -> np.ndarray:
        """Deterministic final mask, ``[N]`` float32 of 0/1, within the budget."""

    @abstractmethod
    def scores(self, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Per-sample score vectors at the current θ: ``[K, N]`` masks -> ``[K, P]`` float64."""

    @abstractmethod
    def _project(self, x: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
        """``[P]`` θ onto the budget, in the metric ``metric`` (``[P]``) if given; None = Euclidean."""

    def _metric(self) -> torch.Tensor | None:
        """``[P]`` metric :meth:`step` projects in, taken at the θ the samples were drawn from; None = Euclidean."""
        return None

    @abstractmethod
    def _unit_keep_probs(self) -> torch.Tensor:
        """``[N]`` marginal keep probability of every unit under :meth:`sample` (for ``expected_sparsity``)."""

    @abstractmethod
    def _load_probs(self, state: dict[str, Any]) -> torch.Tensor:
        """The saved θ (``[P]`` float64) of a state holding every key; raises UserError if it is not this policy's."""

    # ----------------------------------------------------------------------------------------------- gradient
    def gradient(self, masks: torch.Tensor | np.ndarray, losses: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Score-function estimate of dE[L]/dθ; drops non-finite losses and, for ``ema``, advances δ.

        ``ema``: g = Σ_j (L_j − δ)·score_j / max(K_valid − 1, 1) with δ from previous steps (set to this step's mean
        loss the first time a valid sample arrives), then δ ← (1 − λ)δ + λ·mean_j L_j.
        ``loo``: g = Σ_j (L_j − b_j)·score_j / K_valid with b_j the mean of the other valid losses; K_valid < 2 gives 0.
        No valid sample gives 0 and leaves δ unchanged. Call once per step: it updates ``last_dropped``,
        ``total_dropped`` and δ. score_j is row j of :meth:`scores`.

        Args:
            masks: ``[K, N]`` 0/1 masks the losses belong to.
            losses: ``[K]`` losses.

        Returns:
            ``[P]`` float64 gradient (``[N]`` for :class:`Policy`, ``[G]`` for the allocation policy).

        Raises:
            ValueError: shapes disagree.
        """
        m = torch.as_tensor(masks, dtype=torch.float64)  # [K, N]
        loss = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)  # [K]
        if m.dim() != 2 or m.shape[1] != self.space.num_units or m.shape[0] != loss.shape[0]:
            n = self.space.num_units
            raise ValueError(f"masks must be [K, {n}] and losses [K]; got {tuple(m.shape)} and {tuple(loss.shape)}")
        valid = torch.isfinite(loss)  # [K]
        self.last_dropped = int((~valid).sum())
        self.total_dropped += self.last_dropped
        m, loss = m[valid], loss[valid]  # [K_valid, N], [K_valid]
        k = int(loss.shape[0])
        grad = torch.zeros(self.probs.shape[0], dtype=torch.float64)  # [P]
        if k == 0:
            return grad
        score = self.scores(m)  # [K_valid, P]
        mean = float(loss.mean())
        if self.baseline == "ema":
            if not math.isfinite(mean):  # finite losses whose mean overflows: no usable step, keep δ sane
                return torch.full_like(grad, float("nan"))
            if not self.delta_initialised:
                self.delta, self.delta_initialised = mean, True
            grad = ((loss - self.delta)[:, None] * score).sum(0) / max(k - 1, 1)  # [P]
            lam = 1.0 / self.ema_window
            self.delta = (1.0 - lam) * self.delta + lam * mean
            return grad
        if k < 2:
            return grad
        b = (loss.sum() - loss) / (k - 1)  # [K_valid] leave-one-out baselines
        return ((loss - b)[:, None] * score).sum(0) / k  # [P]

    # --------------------------------------------------------------------------------------------------- step
    def step(self, masks: torch.Tensor | np.ndarray, losses: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """One update: θ ← project(θ − lr_t·g) (in the metric of :meth:`_metric`, taken before the update).

        If the gradient is not finite (a finite but huge loss can overflow), θ is left unchanged and the stats say
        ``skipped=True``; θ never becomes NaN.

        Args:
            masks: ``[K, N]`` masks from :meth:`sample`.
            losses: ``[K]`` their losses.

        Returns:
            Stats: ``step`` (steps done, after this one), ``lr``, ``loss_mean`` and ``loss_min`` (over valid samples,
            NaN if none), ``baseline`` (δ used for ``ema``; mean of the leave-one-out baselines for ``loo``),
            ``n_dropped`` (this step), ``expected_sparsity`` (of a mask drawn by :meth:`sample`), ``grad_norm``,
            ``skipped``.
        """
        lr_t = lr_at(self.lr_schedule, self.lr, self.step_count, self.total_steps)
        delta_before, init_before = self.delta, self.delta_initialised
        loss = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
        finite = loss[torch.isfinite(loss)]
        metric = self._metric()  # [P] or None, at the θ the samples were drawn from
        grad = self.gradient(masks, losses)  # [P]
        candidate = self.probs - lr_t * grad  # [P]
        skipped = not bool(torch.isfinite(candidate).all())
        if not skipped:  # projecting a finite vector gives a finite vector in [0, 1]
            self.probs = self._project(candidate, metric)
        self.step_count += 1
        if self.baseline == "ema":
            if init_before:
                base = delta_before
            else:  # the first valid step sets δ to its mean loss
                base = float(finite.mean()) if finite.numel() else float("nan")
        else:
            base = float(finite.mean()) if finite.numel() >= 2 else float("nan")
        return {
            "step": self.step_count,
            "lr": lr_t,
            "loss_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "loss_min": float(finite.min()) if finite.numel() else float("nan"),
            "baseline": base,
            "n_dropped": self.last_dropped,
            "expected_sparsity": projection.expected_sparsity(self.space, self._unit_keep_probs()),
            "grad_norm": float(grad.norm()),
            "skipped": skipped,
        }

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-for-bit (safe for ``torch.load(weights_only=True)``).

        Returns:
            ``probs``, ``delta``, ``delta_initialised``, ``step_count``, ``total_dropped``, ``generator_state``,
            ``num_units``.
        """
        return {
            "probs": self.probs.clone(),
            "delta": float(self.delta),
            "delta_initialised": bool(self.delta_initialised),
            "step_count": int(self.step_count),
            "total_dropped": int(self.total_dropped),
            "generator_state": self.generator.get_state(),
            "num_units": int(self.space.num_units),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`.

        Args:
            state: the saved dict.

        Raises:
            UserError: a key is missing, or the state belongs to another kind of policy or another mask space (see
                the subclass's :meth:`_load_probs`).
        """
        missing = {"probs", "delta", "delta_initialised", "step_count", "total_dropped", "generator_state"} - set(state)
        if missing:
            raise UserError(f"{self._state_label} state is missing {', '.join(sorted(missing))}")
        self.probs = self._load_probs(state).clone()
        self.delta = float(state["delta"])
        self.delta_initialised = bool(state["delta_initialised"])
        self.step_count = int(state["step_count"])
        self.total_dropped = int(state["total_dropped"])
        self.generator.set_state(state["generator_state"])


# -------------------------------------------------------------------------------------------------- policy
class Policy(ScoreFunctionPolicy):
    """Bernoulli keep probabilities over a mask space, trained by a score-function gradient.

    Baselines, the update, the counters and the state come from :class:`ScoreFunctionPolicy` (θ = s, P = N).

    Args:
        space: the mask space.
        probs: ``[N]`` initial keep probabilities (clamped to [0, 1]; not projected — start from a feasible init).
        sampling: ``"independent"`` or ``"antithetic"`` (pairs u and 1 − u).
        **options: the settings of :class:`ScoreFunctionPolicy`: ``lr`` (base learning rate), ``total_steps`` (the
            cosine schedule reaches 0 there), ``sparsity`` (fraction to remove, in [0, 1]), ``lr_schedule``
            (``"cosine"``, the paper's, or ``"constant"``), ``baseline`` (``"ema"``, the paper's, or ``"loo"``,
            leave-one-out), ``ema_window`` (w, λ = 1/w; paper: 5), ``score_scaling`` (``"sqrt"``, the paper code's,
            or ``"exact"``), ``budget`` (``"per_type"``, the paper's, or ``"params"``) and ``seed`` (of the policy's
            own mask generator).

    Raises:
        ConfigError: every invalid setting, listed together.
        ValueError: ``probs`` has the wrong shape or a non-finite value.

    Example:
        >>> policy = Policy(space, uniform_probs(space, 0.5), lr=0.02, total_steps=300, sparsity=0.5)
        >>> masks = policy.sample(2)                      # [2, N]
        >>> stats = policy.step(masks, evaluator(masks))  # losses: [2]
    """

    def __init__(
        self, space: MaskSpace, probs: torch.Tensor | np.ndarray, *, sampling: str = "independent", **options: Any
    ) -> None:
        super().__init__(space, extra_choices=(("sampling", sampling, SAMPLINGS),), **options)
        p = torch.as_tensor(probs, dtype=torch.float64).detach().clone()  # [N]
        if tuple(p.shape) != (space.num_units,):
            raise ValueError(f"probs must have shape ({space.num_units},), got {tuple(p.shape)}")
        if not torch.isfinite(p).all():
            raise ValueError("probs contain non-finite values")
        self.probs = p.clamp_(0.0, 1.0)  # [N] float64
        self.sampling = sampling

    # ----------------------------------------------------------------------------------------------- sampling
    def sample(self, k: int) -> torch.Tensor:
        """Draw K masks m ~ Bernoulli(s) with the policy's generator.

        With ``sampling="antithetic"`` rows come in pairs (2i, 2i+1) from uniforms u and 1 − u (m = u < s); an odd K
        drops the partner of the last pair. Each row is still an exact Bernoulli(s) draw.

        Args:
            k: number of masks, ≥ 1.

        Returns:
            ``[K, N]`` float32 tensor of 0/1.

        Raises:
            ValueError: ``k`` < 1.
        """
        _check_k(k)
        n = self.space.num_units
        if self.sampling == "independent":
            u = torch.rand(k, n, generator=self.generator, dtype=torch.float64)  # [K, N]
        else:
            half = torch.rand((k + 1) // 2, n, generator=self.generator, dtype=torch.float64)  # [⌈K/2⌉, N]
            u = torch.stack([half, 1.0 - half], dim=1).reshape(-1, n)[:k]  # [K, N], rows 2i and 2i+1 antithetic
        return (u < self.probs).to(torch.float32)

    # ----------------------------------------------------------------------------------------------- gradient
    def scores(self, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Per-sample scores at the current s.

        Args:
            masks: ``[K, N]`` 0/1 masks.

        Returns:
            ``[K, N]`` float64: (m − s)/√(s(1−s)+ε) for ``sqrt``, (m − s)/(s(1−s)+ε) for ``exact``, ε = 1e-7.
        """
        m = torch.as_tensor(masks, dtype=torch.float64)  # [K, N]
        s = self.probs  # [N]
        var = s * (1.0 - s) + SCORE_EPS  # [N]
        denom = var.sqrt() if self.score_scaling == "sqrt" else var
        return (m - s) / denom  # [K, N]

    # ---------------------------------------------------------------------------------------------- projection
    def _project(self, x: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
        """s ([N]) onto the budget with :func:`probprune.projection.project` (Euclidean; ``metric`` is unused)."""
        return projection.project(self.space, x, self.sparsity, self.budget)

    # ------------------------------------------------------------------------------------------------- output
    def _unit_keep_probs(self) -> torch.Tensor:
        return self.probs  # [N]: s is the units' keep probability

    def final_mask(self) -> np.ndarray:
        """Deterministic final mask (see :func:`probprune.projection.final_mask`), ``[N]`` float32 of 0/1."""
        return projection.final_mask(self.space, self.probs, self.sparsity, self.budget)

    # -------------------------------------------------------------------------------------------------- state
    def _load_probs(self, state: dict[str, Any]) -> torch.Tensor:
        """The saved s; raises UserError if it belongs to a mask space of another size."""
        probs = torch.as_tensor(state["probs"], dtype=torch.float64)
        if tuple(probs.shape) != (self.space.num_units,):
            raise UserError(
                f"policy state has {probs.numel()} units, the mask space has {self.space.num_units}: "
                "was it saved for another model or mask space?"
            )
        return probs
