"""The local engine: the model in this process, on one device (cpu or cuda, or one replica split by a device map).

It is the single-GPU fallback and the reference the Ray engine is tested against: the same losses, the same task
results, the same perplexities.
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..losses import OBJECTIVES
from ..mask_space import MaskSpace
from ..models.registry import get_adapter
from .base import Task

if TYPE_CHECKING:
    from ..reconstruct import Reconstruction


class LocalEngine:
    """Scores masks, runs weight tasks, evaluates and saves with the model in this process.

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
            from ..fastpath import gathered_losses

            teacher = self.teacher(batch) if objective == "kl" else None
            out = gathered_losses(self.adapter, self.space, masks, batch, teacher=teacher)
        else:
            from ..masked_forward import masked_losses

            out = masked_losses(self.adapter, self.space, masks, batch, max_rows=self.max_rows)
        self.busy_seconds += time.perf_counter() - t0
        return np.asarray(out, dtype=np.float64)

    def teacher(self, batch: torch.Tensor) -> torch.Tensor:
        """The dense model's next-token log-probabilities on ``batch`` ([B·(T−1), V]); the last batch's are cached."""
        from ..fastpath import dense_teacher

        digest = hashlib.sha1(np.ascontiguousarray(batch.cpu().numpy()).tobytes()).digest() + bytes(batch.shape)
        if self._teacher is None or self._teacher[0] != digest:
            self._teacher = None  # free the previous batch's before computing the next
            self._teacher = (digest, dense_teacher(self.adapter, self.space, batch))
        return self._teacher[1]

    # ------------------------------------------------------------------------------ work that reads the weights
    holds_weights = True
    num_replicas = 1

    def run(self, task: Task, *args: Any) -> Any:
        """``task(model, adapter, *args)`` on this process's model."""
        return task(self.model, self.adapter, *args)

    def map(self, task: Task, shares: Sequence[tuple]) -> list[Any]:
        """``task(model, adapter, *share)`` for every share, in order."""
        return [task(self.model, self.adapter, *args) for args in shares]

    def set_space(self, space: MaskSpace) -> None:
        self.space = space

    def pruned_model(self, mask: np.ndarray, rec: Reconstruction | None = None) -> torch.nn.Module:
        """The model compacted to ``mask`` with ``rec``'s weights (a new module; the dense model is untouched)."""
        from ..compaction import compact

        return compact(self.model, self.space, mask, override=None if rec is None else rec.override())

    def perplexity(self, mask: np.ndarray | None, tokens: torch.Tensor, seq_lens: Sequence[int],
                   max_tokens: int | None, batch_size: int, progress: bool = True,
                   rec: Reconstruction | None = None, bos_id: int | None = None) -> dict[str, float]:
        """Held-out perplexity of the model that would be saved: the dense model (``mask`` None), else the compacted
        one (:func:`probprune.perplexity.evaluate_ppl`)."""
        from ..perplexity import evaluate_ppl

        model = self.model if mask is None else self.pruned_model(mask, rec)
        try:
            res = evaluate_ppl(model, tokens, list(seq_lens), max_tokens=max_tokens, batch_size=batch_size,
                               progress=progress, bos_id=bos_id)
        finally:
            del model
            gc.collect()
        return {str(k): float(v) for k, v in res.items()}

    def save_pruned(self, mask: np.ndarray, folder: Path, tokenizer: Any, rec: Reconstruction | None = None) -> int:
        """Compact (with ``rec``), save (:func:`probprune.compaction.save_pruned`); return the saved parameters."""
        from ..compaction import count_params, save_pruned

        pruned = self.pruned_model(mask, rec)
        try:
            save_pruned(pruned, folder, tokenizer)
            return count_params(pruned)
        finally:
            del pruned
            gc.collect()

    def close(self) -> None:
        self._teacher = None


def _check_objective(objective: str, fast_path: bool) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
    if objective == "kl" and not fast_path:
        raise ValueError("the kl objective is computed on the fast path: set engine.fast_path=true")
