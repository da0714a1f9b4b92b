"""The replica actor: one model replica and a :class:`~probprune.engine.local.LocalEngine` around it.

The actor reuses the local engine (the batched masked forward, the fast path, the weight tasks) rather than
rewriting them; the driver only sends it masks, batch rows and tasks.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import numpy as np
import ray
import torch

from ...config import ModelConfig
from ...mask_space import MaskSpace


class Replica:
    """One model replica (runs inside a Ray actor).

    Construction never raises: a load error is kept and raised by :meth:`ready` / every later call, so the driver
    sees the original exception (a :class:`~probprune.errors.UserError` stays one) instead of Ray's "actor died in
    its creation task".
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        space: MaskSpace,
        fast_path: bool,
        threads: int,
        device: str,
        objective: str = "ce",
        scoring: str | None = None,
    ):
        t0 = time.perf_counter()
        self.error: BaseException | None = None
        self.engine = None
        try:
            torch.set_num_threads(threads)
            space = copy.deepcopy(space)  # writable arrays: actor arguments arrive read-only (zero-copy numpy)
            from ...models.loading import load_model
            from ..local import LocalEngine

            model, _ = load_model(
                model_cfg.name_or_path, model_cfg.dtype, device, model_cfg.device_map, model_cfg.trust_remote_code
            )
            self.engine = LocalEngine(
                model, space, fast_path=fast_path, threads=threads, objective=objective, scoring=scoring
            )
        except Exception as e:
            self.error = e
        self.load_seconds = time.perf_counter() - t0

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def ready(self) -> dict[str, Any]:
        """Where this replica runs: pid, device(s), threads, visible GPUs, load time. Raises the load error if any."""
        self._check()
        model = self.engine.model
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "device": str(next(model.parameters()).device),
            "device_map": getattr(model, "hf_device_map", None),
            "threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "gpu_ids": ray.get_gpu_ids(),
            "load_seconds": self.load_seconds,
        }

    def losses(
        self,
        masks: np.ndarray,
        batch: np.ndarray,
        lo: int,
        hi: int,
        objective: str | None = None,
        r0: int = 0,
        r1: int | None = None,
    ) -> tuple[np.ndarray, float]:
        """Losses of ``masks[lo:hi]`` on rows ``[r0, r1)`` of ``batch`` (the replica's objective unless ``objective``
        is given), and the seconds spent computing them. With the ``kl`` objective the dense log-probabilities of those
        rows are computed once on this actor and reused for its later shares of the same rows."""
        self._check()
        t0 = time.perf_counter()
        share = np.array(masks[lo:hi], dtype=np.float32)  # [k, N]; a copy: object-store arrays are read-only
        ids = torch.from_numpy(np.array(batch[r0:r1], dtype=np.int64))  # [b, T]
        out = self.engine.losses(share, ids, objective=objective)  # [k]
        return out, time.perf_counter() - t0

    def set_space(self, space: MaskSpace) -> None:
        """Score later masks in ``space`` (the driver's final mask space, once metric-ordered blocks are formed)."""
        self._check()
        self.engine.set_space(copy.deepcopy(space))

    def call(self, task: Any, args: tuple) -> Any:
        """``task(model, adapter, *args)`` on this replica (:mod:`probprune.engine.tasks`)."""
        self._check()
        return self.engine.run(task, *args)


RemoteReplica = ray.remote(Replica)
