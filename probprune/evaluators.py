"""Evaluators turn a batch of masks into losses. The search loop only ever sees this interface.

``LocalEvaluator`` runs in this process on one device (cpu or cuda, or one replica split by a device map): the
single-GPU fallback. The Ray evaluator (``probprune.distributed``) spreads the same work over actors.
"""

from __future__ import annotations

import hashlib
import time
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .losses import OBJECTIVES
from .masks import MaskSpace
from .models.adapter import get_adapter


@runtime_checkable
class Evaluator(Protocol):
    """Scores masks: ``losses(masks [K, N], batch [B, T]) -> [K]``, one loss per mask.

    The loss is the evaluator's objective (``"ce"``: mean next-token cross-entropy; ``"kl"``: mean per-token
    KL(dense ‖ masked)); ``objective=`` overrides it for one call (the search's check set is always scored by ``"ce"``).
    """

    def losses(self, masks: np.ndarray, batch: torch.Tensor, objective: str | None = None) -> np.ndarray: ...

    def close(self) -> None: ...


class LocalEvaluator:
    """Scores masks with the model in this process.

    Args:
        model: the dense model (never modified).
        space: the mask space the masks live in.
        fast_path: compute only kept units (gathered weights, dropped layers skipped) instead of multiplying masks
            into a dense forward. Both give the same losses; the fast path costs what the pruned model costs.
        max_rows: reference path only: at most this many (mask x sequence) rows per forward.
        threads: ``torch.set_num_threads`` for this process (None = leave as is).
        objective: ``"ce"`` (cross-entropy against the tokens) or ``"kl"`` (KL divergence from the dense model's
            next-token distribution; needs ``fast_path``). The dense log-probabilities of a batch are computed once and
            reused for every mask scored on it.

    Raises:
        ValueError: unknown objective, or ``"kl"`` without the fast path.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        space: MaskSpace,
        fast_path: bool = True,
        max_rows: int | None = None,
        threads: int | None = None,
        objective: str = "ce",
    ):
        _check_objective(objective, fast_path)
        self.objective = objective
        self._teacher: tuple[bytes, torch.Tensor] | None = None  # (batch digest, [B(T-1), V] dense log-probs)
        self.model = model.eval()
        self.adapter = get_adapter(model)
        self.space = space
        self.fast_path = fast_path
        self.max_rows = max_rows
        if threads:
            torch.set_num_threads(threads)
        self.busy_seconds = 0.0

    @torch.no_grad()
    def losses(self, masks: np.ndarray, batch: torch.Tensor, objective: str | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        objective = objective or self.objective
        _check_objective(objective, self.fast_path)
        masks = np.asarray(masks, dtype=np.float32)  # [K, N]
        if self.fast_path:
            from .fastpath import gathered_losses

            teacher = self.teacher(batch) if objective == "kl" else None
            out = gathered_losses(self.adapter, self.space, masks, batch, teacher=teacher)
        else:
            from .masked import masked_losses

            out = masked_losses(self.adapter, self.space, masks, batch, max_rows=self.max_rows)
        self.busy_seconds += time.perf_counter() - t0
        return np.asarray(out, dtype=np.float64)

    def teacher(self, batch: torch.Tensor) -> torch.Tensor:
        """The dense model's next-token log-probabilities on ``batch`` ([B·(T−1), V]); the last batch's are cached."""
        from .fastpath import dense_teacher

        digest = hashlib.sha1(np.ascontiguousarray(batch.cpu().numpy()).tobytes()).digest() + bytes(batch.shape)
        if self._teacher is None or self._teacher[0] != digest:
            self._teacher = None  # free the previous batch's before computing the next
            self._teacher = (digest, dense_teacher(self.adapter, self.space, batch))
        return self._teacher[1]

    def close(self) -> None:
        self._teacher = None


def _check_objective(objective: str, fast_path: bool) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
    if objective == "kl" and not fast_path:
        raise ValueError("the kl objective is computed on the fast path: set engine.fast_path=true")


def build_evaluator(cfg, model: torch.nn.Module, space: MaskSpace) -> Evaluator:
    """The evaluator ``cfg.engine`` asks for: ``local`` (this process) or ``ray`` (actors holding replicas).

    Raises:
        UserError: ``engine.kind=ray`` but Ray is not installed.
    """
    if cfg.engine.kind == "ray":
        try:
            from .distributed.actors import RayEvaluator
        except ImportError as e:
            from .errors import UserError

            raise UserError(
                f"engine.kind=ray needs Ray: pip install 'probprune[ray]' ({e}); or set engine.kind=local"
            ) from None
        return RayEvaluator(cfg.model, space, cfg.engine, objective=cfg.search.objective)
    return LocalEvaluator(model, space, fast_path=cfg.engine.fast_path, threads=cfg.engine.threads,
                          objective=cfg.search.objective)
