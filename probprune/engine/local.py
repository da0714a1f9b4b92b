"""The local engine: the model in this process, on one device (cpu or cuda, or one replica split by a device map).

It is the single-GPU fallback and the reference the Ray engine is tested against: the same losses, the same task
results, the same perplexities.
"""

from __future__ import annotations

import gc
import hashlib
import logging
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

log = logging.getLogger(__name__)

SCORING = ("auto", "gathered", "batched")  # how masks are scored: see LocalEngine


class LocalEngine:
    """Scores masks, runs weight tasks, evaluates and saves with the model in this process.

    Args:
        model: the dense model (never modified).
        space: the mask space the masks live in.
        fast_path: the scoring path when ``scoring`` is None: True = ``"gathered"``, False = ``"batched"``.
        max_rows: batched path only: at most this many (mask x sequence) rows per forward (None = all K·B).
        threads: ``torch.set_num_threads`` for this process (None = leave as is).
        objective: ``"ce"`` (cross-entropy against the tokens) or ``"kl"`` (KL divergence from the dense model's
            next-token distribution). The dense log-probabilities of a batch are computed once and reused for every
            mask scored on it.
        scoring: how masks are scored (:data:`SCORING`); the losses agree up to floating-point summation order.
            ``"gathered"`` (:func:`probprune.fastpath.gathered_losses`): each mask at its pruned width, one forward
            per mask, costing what the pruned model costs plus per-mask index building and weight gathers;
            ``"batched"`` (:func:`probprune.masked_forward.masked_losses`): all K masks as per-row masks in one dense forward
            of K·B rows, no per-mask host work; ``"auto"``: on the first call, time one warm-up and one timed call of
            each path on that call's masks and batch and keep the faster (:attr:`scoring_record` says which and why).

    Raises:
        ValueError: unknown objective or scoring path.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        space: MaskSpace,
        fast_path: bool = True,
        max_rows: int | None = None,
        threads: int | None = None,
        objective: str = "ce",
        scoring: str | None = None,
    ):
        _check_objective(objective)
        scoring = scoring or ("gathered" if fast_path else "batched")
        if scoring not in SCORING:
            raise ValueError(f"scoring must be one of {', '.join(map(repr, SCORING))}, got {scoring!r}")
        self.scoring = scoring  # "auto" until the first call has measured both paths
        self.scoring_record: dict[str, Any] = {"path": scoring, "chosen_by": "config"}
        self.objective = objective
        self._teacher: tuple[bytes, torch.Tensor] | None = None  # (batch digest, [B(T-1), V] dense log-probs)
        self.model = model.eval()
        self.adapter = get_adapter(model)
        self.space = space
        self.max_rows = max_rows
        if threads:
            torch.set_num_threads(threads)
        self.busy_seconds = 0.0

    @torch.no_grad()
    def losses(self, masks: np.ndarray, batch: torch.Tensor, objective: str | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        objective = objective or self.objective
        _check_objective(objective)
        masks = np.asarray(masks, dtype=np.float32)  # [K, N]
        if self.scoring == "auto":
            out = self._choose_path(masks, batch, objective)
        else:
            out = self._losses(self.scoring, masks, batch, objective)
        self.busy_seconds += time.perf_counter() - t0
        return np.asarray(out, dtype=np.float64)

    @property
    def fast_path(self) -> bool:
        """True while masks are scored on the gathered path."""
        return self.scoring == "gathered"

    def _losses(self, path: str, masks: np.ndarray, batch: torch.Tensor, objective: str) -> np.ndarray:
        teacher = self.teacher(batch, path) if objective == "kl" else None
        if path == "gathered":
            from ..fastpath import gathered_losses

            return gathered_losses(self.adapter, self.space, masks, batch, teacher=teacher)
        from ..masked_forward import masked_losses

        return masked_losses(self.adapter, self.space, masks, batch, max_rows=self.max_rows, teacher=teacher)

    def _choose_path(self, masks: np.ndarray, batch: torch.Tensor, objective: str) -> np.ndarray:
        """Time both paths on this call (one warm-up and one timed call each), keep the faster; its losses."""
        seconds, out = {}, {}
        for path in ("gathered", "batched"):
            self._losses(path, masks, batch, objective)  # warm-up: allocator, kernels, teacher
            _sync(self.model)
            t = time.perf_counter()
            out[path] = self._losses(path, masks, batch, objective)
            _sync(self.model)
            seconds[path] = (time.perf_counter() - t) / max(1, masks.shape[0])
        self.scoring = min(seconds, key=seconds.get)
        self.scoring_record = {
            "path": self.scoring,
            "chosen_by": "measured on the first call",
            "seconds_per_mask": {k: round(v, 6) for k, v in seconds.items()},
            "masks": int(masks.shape[0]),
            "batch": list(batch.shape),
        }
        log.info(
            "scoring path: %s (seconds per mask: gathered %.4g, batched %.4g; %d masks of %s tokens)",
            self.scoring,
            seconds["gathered"],
            seconds["batched"],
            masks.shape[0],
            "x".join(map(str, batch.shape)),
        )
        return out[self.scoring]

    def teacher(self, batch: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """The dense model's next-token log-probabilities on ``batch`` ([B·(T−1), V]), computed by ``path``'s own
        dense forward (the current scoring path's by default) so the all-keep mask's KL is exactly 0 on that path;
        the last batch's are cached."""
        path = path or ("batched" if self.scoring == "batched" else "gathered")
        digest = hashlib.sha1(np.ascontiguousarray(batch.cpu().numpy()).tobytes()).digest() + bytes(batch.shape)
        key = digest + path.encode()
        if self._teacher is None or self._teacher[0] != key:
            self._teacher = None  # free the previous batch's before computing the next
            if path == "gathered":
                from ..fastpath import dense_teacher

                self._teacher = (key, dense_teacher(self.adapter, self.space, batch))
            else:
                from ..masked_forward import dense_teacher as batched_teacher

                self._teacher = (key, batched_teacher(self.adapter, batch))
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

    def perplexity(
        self,
        mask: np.ndarray | None,
        tokens: torch.Tensor,
        seq_lens: Sequence[int],
        max_tokens: int | None,
        batch_size: int,
        progress: bool = True,
        rec: Reconstruction | None = None,
        bos_id: int | None = None,
    ) -> dict[str, float]:
        """Held-out perplexity of the model that would be saved: the dense model (``mask`` None), else the compacted
        one (:func:`probprune.perplexity.evaluate_ppl`)."""
        from ..perplexity import evaluate_ppl

        model = self.model if mask is None else self.pruned_model(mask, rec)
        try:
            res = evaluate_ppl(
                model,
                tokens,
                list(seq_lens),
                max_tokens=max_tokens,
                batch_size=batch_size,
                progress=progress,
                bos_id=bos_id,
            )
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


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")


def _sync(model: torch.nn.Module) -> None:
    """Wait for the model's devices to finish (CUDA runs asynchronously; a timing needs the work done)."""
    for dev in {p.device for p in model.parameters()}:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
