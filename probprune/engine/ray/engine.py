"""The Ray engine: masks scored, weight tasks run and perplexity measured on actors that each hold one replica.

The K masks of a step are independent forwards, so they are split into contiguous shares over the live actors; each
actor scores its share with the local engine around its own replica and the driver only puts the masks and the batch
into the object store once and gathers ``K`` floats back::

    driver: ray.put(masks [K, N]), ray.put(batch [B, T])
       ├─ actor 0: losses(masks[0:k0])   -> [k0]
       ├─ actor 1: losses(masks[k0:k1])  -> [k1 - k0]
       └─ ...                            -> concatenated in mask order: [K]

The driver holds no weights: the pruned model is written by streaming the source checkpoint one layer at a time
(:func:`probprune.compaction.compact_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from ...config import EngineConfig, ModelConfig
from ...mask_space import MaskSpace
from ..base import Task
from ..tasks import split_shares, window_nll
from .cluster import actor_device, check_fits, connect, is_local_instance
from .pool import Call, ReplicaPool

if TYPE_CHECKING:
    from ...reconstruct import Reconstruction

log = logging.getLogger(__name__)


def split_work(k: int, b: int, n: int) -> list[tuple[int, int, int, int]]:
    """Shares ``(lo, hi, r0, r1)`` of one step's work — masks ``[lo, hi)`` on batch rows ``[r0, r1)`` — over ``n``
    actors, so that every actor has work whenever there is enough of it.

    With ``k >= n`` masks the masks are split (:func:`~probprune.engine.tasks.split_shares`) and every share takes the
    whole batch. With fewer masks than actors each mask gets ``n // k`` actors (the first ``n % k`` masks one more)
    and its ``b`` rows are split among them: the paper's K = 2 on 8 GPUs keeps all 8 busy instead of 2. A mask's loss
    is then the row-weighted mean of its shares' losses, which is its loss on the whole batch (every loss here is a
    mean over sequences).

    Examples:
        >>> split_work(3, 4, 2)
        [(0, 2, 0, 4), (2, 3, 0, 4)]
        >>> split_work(2, 4, 4)
        [(0, 1, 0, 2), (0, 1, 2, 4), (1, 2, 0, 2), (1, 2, 2, 4)]
    """
    if k >= n or b < 2:
        return [(lo, hi, 0, b) for lo, hi in split_shares(k, n)]
    base, extra = divmod(n, k)
    return [(j, j + 1, r0, r1) for j in range(k) for r0, r1 in split_shares(b, base + (1 if j < extra else 0))]


@dataclass
class CostEstimate:
    """What a search will cost, from a timed call of one step's work (after a warm-up call)."""

    steps: int
    forwards_per_step: int  # K masks, each one forward over the batch
    actors: int  # actors sharing a step's masks
    seconds_per_forward: float  # compute time of one mask on one actor
    step_seconds: float  # wall time of one step's losses() call, driver overhead included
    overhead_seconds: float  # of step_seconds: broadcast + dispatch + gather

    @property
    def search_seconds(self) -> float:
        return self.steps * self.step_seconds

    def __str__(self) -> str:
        return (
            f"estimated search time: {self.steps} steps x {self.step_seconds:.3g} s/step = "
            f"{_hms(self.search_seconds)} ({self.forwards_per_step} forwards/step x "
            f"{self.seconds_per_forward:.3g} s/forward / {self.actors} actors "
            f"+ {self.overhead_seconds:.3g} s driver overhead)"
        )


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class RayEngine:
    """Everything that reads weights, on ``engine.num_actors`` Ray actors holding one model replica each.

    Args:
        model_cfg: which model each actor loads (from its path or cache on that node; never sent through the object
            store). With ``engine.gpus_per_actor`` > 0 the replica is put on ``cuda`` (the actor sees only its GPUs,
            Ray sets ``CUDA_VISIBLE_DEVICES``), or spread over them with ``model.device_map`` (e.g. ``auto``).
        space: the mask space (small; sent to every actor).
        engine_cfg: ``num_actors``, ``cpus_per_actor``, ``gpus_per_actor``, ``threads`` (torch threads per actor,
            default ``max(1, int(cpus_per_actor))``), ``address`` (joined if Ray is not initialised yet; None:
            ``RAY_ADDRESS``, else a new local instance), ``fast_path``, ``max_retries`` (per call), ``placement``.
        objective: each actor's loss, ``"ce"`` or ``"kl"`` (see :class:`probprune.engine.local.LocalEngine`).
        skeleton: the model on the ``meta`` device, if the caller has it (else built when needed).

    Attributes (timings of the last :meth:`losses` call, for measuring the driver's overhead):
        last_wall_seconds: the whole call.
        last_broadcast_seconds: putting masks and batch into the object store.
        last_busy_seconds: per share, the compute time inside the actor.
        last_gather_seconds: the wait beyond the slowest share's compute: task dispatch, argument fetch, returning
            the losses (and any retries).
        last_shares: the ``(lo, hi, r0, r1)`` shares of the last call (:func:`split_work`).
        busy_seconds: total compute time of all actors (all calls).
        retries / replacements: calls sent again / actors replaced since construction.

    Raises:
        UserError: the actors cannot fit on any node of the cluster, a CPU actor was asked for a CUDA model, or a
            replica could not load its model (the loader's own message).

    Example:
        >>> engine = RayEngine(cfg.model, space, cfg.engine)
        >>> engine.losses(masks, batch)   # masks [K, N] float32, batch [B, T] -> [K] float64
        >>> engine.close()
    """

    holds_weights = False

    def __init__(
        self,
        model_cfg: ModelConfig,
        space: MaskSpace,
        engine_cfg: EngineConfig,
        startup_timeout: float = 1800.0,
        objective: str = "ce",
        skeleton: torch.nn.Module | None = None,
    ):
        self.objective = objective
        self.skeleton = skeleton
        self.model_cfg = model_cfg
        self.space = space
        self.engine = engine_cfg
        self.threads = engine_cfg.threads or max(1, int(engine_cfg.cpus_per_actor))
        device = actor_device(model_cfg, engine_cfg)
        local = is_local_instance(engine_cfg.address)
        self._owns_ray = connect(engine_cfg.address)
        self._pool: ReplicaPool | None = None
        try:
            check_fits(engine_cfg, started_local=self._owns_ray and local)  # a local instance cannot grow
            self._pool = ReplicaPool(model_cfg, space, engine_cfg, device, self.threads, objective, startup_timeout)
        except BaseException:
            self.close()
            raise
        self.busy_seconds = 0.0
        self.last_wall_seconds = self.last_broadcast_seconds = self.last_gather_seconds = 0.0
        self.last_busy_seconds: list[float] = []
        self.last_shares: list[tuple[int, int, int, int]] = []

    # ---------------------------------------------------------------------------------------------- replicas
    @property
    def num_actors(self) -> int:
        return self._pool.num_actors if self._pool else 0

    @property
    def num_replicas(self) -> int:
        """Replicas that have loaded the model (what :meth:`map` spreads its shares over)."""
        return len(self._pool.live_slots())

    @property
    def retries(self) -> int:
        return self._pool.retries

    @property
    def max_retries(self) -> int:
        """Times a call is sent again after its actor died (``engine.max_retries``)."""
        return self._pool.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self._pool.max_retries = value

    @property
    def replacements(self) -> int:
        return self._pool.replacements

    def actor_info(self) -> list[dict[str, Any]]:
        """Per actor: pid, node, device, device map, torch threads, ``CUDA_VISIBLE_DEVICES``, GPU ids, load time."""
        return self._pool.actor_info()

    def set_space(self, space: MaskSpace) -> None:
        """Make ``space`` the mask space of every replica (and of replacements started later)."""
        self.space = space
        self._pool.set_space(space)

    # ------------------------------------------------------------------------------ work that reads the weights
    def run(self, task: Task, *args: Any) -> Any:
        """``task(model, adapter, *args)`` on one replica; see :meth:`map`."""
        return self.map(task, [args])[0]

    def map(self, task: Task, shares: Sequence[tuple]) -> list[Any]:
        """``task(model, adapter, *share)`` for every share, spread round-robin over the live replicas; the results in
        share order. A share whose actor dies is retried on another (the dead one is replaced), up to
        ``engine.max_retries`` times; an error the task raises is re-raised as its own type."""
        name = getattr(task, "__name__", str(task))
        return self._pool.call(
            [Call("call", (task, tuple(args)), f"{name} share {i}") for i, args in enumerate(shares)]
        )

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
        """Held-out perplexity under ``mask`` (with ``rec``'s weights) on the actors, on the gathered path (the
        pruned width only), the windows split among them."""
        from ...perplexity import effective_len, held_out_windows, max_context
        from ...reconstruct import reconstructed_nll

        out: dict[str, float] = {}
        for seq_len in seq_lens:
            eff = effective_len(seq_len, max_context(self._skeleton()))
            if str(eff) in out:
                continue
            windows = held_out_windows(tokens, eff, max_tokens, bos_id)  # [W, T]
            shares = [windows[lo:hi] for lo, hi in split_shares(windows.shape[0], self.num_replicas)]
            if rec is None:
                parts = self.map(window_nll, [(self.space, mask, w, batch_size) for w in shares])
            else:
                parts = self.map(reconstructed_nll, [(self.space, mask, rec, w, batch_size) for w in shares])
            out[str(eff)] = math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))
        log.info("perplexity on the actors: %s", out)
        return out

    def save_pruned(self, mask: np.ndarray, folder: Path, tokenizer: Any, rec: Reconstruction | None = None) -> int:
        """Stream the source checkpoint into ``folder`` one layer at a time, ``rec``'s weights applied as each layer
        is sliced (the driver never holds the model); return the saved parameters."""
        from ...compaction import compact, compact_checkpoint, count_params
        from ...models.loading import model_folder

        override = None if rec is None else rec.override()
        compact_checkpoint(
            model_folder(self.model_cfg.name_or_path), self.space, mask, folder, tokenizer, override=override
        )
        return count_params(compact(self._skeleton(), self.space, mask, override=override))

    def _skeleton(self) -> torch.nn.Module:
        """The model's shapes on the ``meta`` device (no weights)."""
        if self.skeleton is None:
            from ...models.loading import load_skeleton

            self.skeleton, _ = load_skeleton(
                self.model_cfg.name_or_path, self.model_cfg.dtype, self.model_cfg.trust_remote_code
            )
        return self.skeleton

    # ---------------------------------------------------------------------------------------------- scoring
    def losses(self, masks: np.ndarray, batch: torch.Tensor, objective: str | None = None) -> np.ndarray:
        """Loss of each mask on ``batch``: the engine's objective, or ``objective`` for this call.

        Args:
            masks: ``[K, N]`` 0/1 masks (float32).
            batch: ``[B, T]`` token ids.
            objective: ``"ce"`` or ``"kl"``; None = the engine's.

        Returns:
            ``[K]`` float64, in mask order.

        Raises:
            RuntimeError: a share failed on ``engine.max_retries + 1`` actors.
            Any exception the scoring code raises inside an actor (re-raised as its own type).
        """
        t0 = time.perf_counter()
        masks = np.ascontiguousarray(masks, dtype=np.float32)  # [K, N]
        if masks.ndim != 2:
            raise ValueError(f"masks must be [K, N], got shape {masks.shape}")
        k = masks.shape[0]
        batch_np = torch.as_tensor(batch).cpu().numpy()  # [B, T] int64
        b = batch_np.shape[0]
        masks_ref, batch_ref = ray.put(masks), ray.put(batch_np)
        t1 = time.perf_counter()
        shares = split_work(k, b, len(self._pool.live_slots()))
        results = self._pool.call(
            [
                Call("losses", (masks_ref, batch_ref, lo, hi, objective, r0, r1), f"masks {lo}..{hi - 1}")
                for lo, hi, r0, r1 in shares
            ]
        )
        out = np.zeros(k, dtype=np.float64)
        for (lo, hi, r0, r1), (values, _) in zip(shares, results):
            out[lo:hi] += np.asarray(values) * ((r1 - r0) / b)  # row-weighted mean
        busy = [seconds for _, seconds in results]
        t2 = time.perf_counter()
        self.last_shares = shares
        self.last_busy_seconds = busy
        self.busy_seconds += sum(busy)
        self.last_broadcast_seconds = t1 - t0
        self.last_gather_seconds = max(0.0, (t2 - t1) - max(busy, default=0.0))
        self.last_wall_seconds = t2 - t0
        return out

    def estimate(
        self, batch: torch.Tensor, steps: int, num_samples: int, masks: np.ndarray | None = None, repeats: int = 1
    ) -> CostEstimate:
        """Time one step's work (after one untimed warm-up call) and extrapolate to ``steps`` steps.

        Args:
            batch: a ``[B, T]`` batch of the search's shape.
            steps: steps still to run.
            num_samples: K masks per step.
            masks: ``[K, N]`` masks to time (default: all ones, the dense cost; an upper bound with the fast path).
            repeats: timed calls; the median is used.
        """
        if masks is None:
            masks = np.ones((num_samples, self.space.num_units), dtype=np.float32)
        self.losses(masks, batch)  # warm-up: first forward on each actor
        walls, per_forward, overhead = [], [], []
        for _ in range(max(1, repeats)):
            self.losses(masks, batch)
            walls.append(self.last_wall_seconds)
            per_forward.append(sum(self.last_busy_seconds) / len(masks))
            overhead.append(self.last_broadcast_seconds + self.last_gather_seconds)
        return CostEstimate(
            steps=steps,
            forwards_per_step=len(masks),
            actors=len(self.last_shares),
            seconds_per_forward=float(np.median(per_forward)),
            step_seconds=float(np.median(walls)),
            overhead_seconds=float(np.median(overhead)),
        )

    # ---------------------------------------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Kill the actors; shut Ray down only if this engine started it. Safe to call twice."""
        if self._pool is not None:
            self._pool.close()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
