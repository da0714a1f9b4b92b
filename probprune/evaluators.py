"""Evaluators turn a batch of masks into losses. The search loop only ever sees this interface.

``LocalEvaluator`` runs in this process on one device (cpu or cuda, or one replica split by a device map): the
single-GPU fallback. The Ray evaluator (``probprune.ray_backend``) spreads the same work over actors.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .masks import MaskSpace
from .models.adapter import get_adapter


@runtime_checkable
class Evaluator(Protocol):
    """Scores masks: ``losses(masks [K, N], batch [B, T]) -> [K]`` mean next-token cross-entropy per mask."""

    def losses(self, masks: np.ndarray, batch: torch.Tensor) -> np.ndarray: ...

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
    """

    def __init__(
        self,
        model: torch.nn.Module,
        space: MaskSpace,
        fast_path: bool = True,
        max_rows: int | None = None,
        threads: int | None = None,
    ):
        self.model = model.eval()
        self.adapter = get_adapter(model)
        self.space = space
        self.fast_path = fast_path
        self.max_rows = max_rows
        if threads:
            torch.set_num_threads(threads)
        self.busy_seconds = 0.0

    @torch.no_grad()
    def losses(self, masks: np.ndarray, batch: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        masks = np.asarray(masks, dtype=np.float32)  # [K, N]
        if self.fast_path:
            from .fastpath import gathered_losses

            out = gathered_losses(self.adapter, self.space, masks, batch)
        else:
            from .masked import masked_losses

            out = masked_losses(self.adapter, self.space, masks, batch, max_rows=self.max_rows)
        self.busy_seconds += time.perf_counter() - t0
        return np.asarray(out, dtype=np.float64)

    def close(self) -> None:
        pass


def build_evaluator(cfg, model: torch.nn.Module, space: MaskSpace) -> Evaluator:
    """The evaluator ``cfg.engine`` asks for: ``local`` (this process) or ``ray`` (actors holding replicas).

    Raises:
        UserError: ``engine.kind=ray`` but Ray is not installed.
    """
    if cfg.engine.kind == "ray":
        try:
            from .ray_backend import RayEvaluator
        except ImportError as e:
            from .errors import UserError

            raise UserError(
                f"engine.kind=ray needs Ray: pip install 'probprune[ray]' ({e}); or set engine.kind=local"
            ) from None
        return RayEvaluator(cfg.model, space, cfg.engine)
    return LocalEvaluator(model, space, fast_path=cfg.engine.fast_path, threads=cfg.engine.threads)
