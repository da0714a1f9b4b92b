"""Score masks on Ray actors that each hold one model replica: the cluster evaluator.

The K masks of a step are independent forwards, so they are split into contiguous shares over the live actors; each
actor scores its share with a :class:`~probprune.evaluators.LocalEvaluator` around its own replica (the batched masked
forward and the fast path are reused, not rewritten) and the driver only puts the masks and the batch into the
object store once and gathers ``K`` floats back::

    driver: ray.put(masks [K, N]), ray.put(batch [B, T])
       ├─ actor 0: losses(masks[0:k0])   -> [k0]
       ├─ actor 1: losses(masks[k0:k1])  -> [k1 - k0]
       └─ ...                            -> concatenated in mask order: [K]

Failures: when an actor dies mid-step (process killed, OOM, node lost), its share is sent again to a live actor and a
fresh replica replaces the dead one in the background (it joins once it has loaded its model), at most
``engine.max_retries`` times per share. The driver manages this itself (``max_restarts=0``) rather than letting Ray
restart the actor and re-run the task there: a restart reloads the model (minutes for a 70B replica) while another
replica can score the share in one forward. The masks are fixed before they are scored, so a retried step returns
exactly the losses an undisturbed one would.

This is the only module of probprune that imports Ray.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.exceptions
import torch

from .config import EngineConfig, ModelConfig
from .errors import UserError
from .masks import MaskSpace

log = logging.getLogger(__name__)

__all__ = ["RayEvaluator", "CostEstimate", "connect", "split_shares", "split_work", "ACTOR_ENV"]

# Environment of the driver before it starts or joins Ray (Ray 2.60).
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# Environment of every actor: a CPU actor must get CUDA_VISIBLE_DEVICES="" instead of inheriting the node's GPUs.
ACTOR_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1", "TOKENIZERS_PARALLELISM": "false"}
# Passed on to actors when set in the driver, so replicas find the same caches and offline settings.
FORWARDED_ENV = ("PROBPRUNE_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# Failures of the actor or its node (retried elsewhere). An exception raised by the scoring code itself (a
# RayTaskError: bad shapes, CUDA OOM inside the forward) is deterministic and is raised to the caller instead.
RETRYABLE = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.OutOfMemoryError,  # the node's memory monitor killed the worker
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,  # the result lived on a node that died
    ray.exceptions.LocalRayletDiedError,
)


def _actor_env() -> dict[str, str]:
    env = dict(ACTOR_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return env


def connect(address: str | None = None, **init_kwargs: Any) -> bool:
    """Start or join Ray unless this process is connected already; return True if this call connected.

    Args:
        address: ``None`` (join ``RAY_ADDRESS`` if set, else start a new local instance), ``"local"`` (a new local
            instance), ``"auto"`` (the cluster started with ``ray start`` on this machine) or ``"host:port"``.
        init_kwargs: more ``ray.init`` arguments (``num_cpus``, ``object_store_memory``, ...).
    """
    if ray.is_initialized():
        return False
    for k, v in DRIVER_ENV.items():
        os.environ.setdefault(k, v)
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": _actor_env()}, "logging_level": logging.WARNING}
    if address == "local":
        kwargs["include_dashboard"] = False
    kwargs.update(init_kwargs)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(address=address, **kwargs)
    if callable(previous):  # ray.init makes SIGTERM sys.exit(15); keep the application's own handler (the CLI's)
        signal.signal(signal.SIGTERM, previous)
    return True


def _is_local_instance(address: str | None) -> bool:
    return address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))


def split_shares(k: int, n: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` shares of ``k`` masks over ``n`` actors, the first ``k % n`` one larger; no empty share.

    Examples:
        >>> split_shares(3, 2)
        [(0, 2), (2, 3)]
        >>> split_shares(1, 4)
        [(0, 1)]
    """
    if n < 1:
        raise ValueError(f"need at least one actor, got {n}")
    base, extra = divmod(k, n)
    shares, lo = [], 0
    for i in range(n):
        hi = lo + base + (1 if i < extra else 0)
        if hi > lo:
            shares.append((lo, hi))
        lo = hi
    return shares


def split_work(k: int, b: int, n: int) -> list[tuple[int, int, int, int]]:
    """Shares ``(lo, hi, r0, r1)`` of one step's work — masks ``[lo, hi)`` on batch rows ``[r0, r1)`` — over ``n``
    actors, so that every actor has work whenever there is enough of it.

    With ``k >= n`` masks the masks are split (:func:`split_shares`) and every share takes the whole batch. With fewer
    masks than actors each mask gets ``n // k`` actors (the first ``n % k`` masks one more) and its ``b`` rows are split
    among them: the paper's K = 2 on 8 GPUs keeps all 8 busy instead of 2. A mask's loss is then the row-weighted mean
    of its shares' losses, which is its loss on the whole batch (every loss here is a mean over sequences).

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


# ----------------------------------------------------------------------------------------------------- the actor
class Replica:
    """One model replica and a :class:`LocalEvaluator` around it (runs inside a Ray actor).

    Construction never raises: a load error is kept and raised by :meth:`ready` / :meth:`losses`, so the driver sees
    the original exception (a :class:`UserError` stays one) instead of Ray's "actor died in its creation task".
    """

    def __init__(self, model_cfg: ModelConfig, space: MaskSpace, fast_path: bool, threads: int, device: str,
                 objective: str = "ce"):
        t0 = time.perf_counter()
        self.error: BaseException | None = None
        self.evaluator = None
        try:
            torch.set_num_threads(threads)
            space = copy.deepcopy(space)  # writable arrays: actor arguments arrive read-only (zero-copy numpy)
            from .evaluators import LocalEvaluator
            from .models.loading import load_model

            model, _ = load_model(
                model_cfg.name_or_path, model_cfg.dtype, device, model_cfg.device_map, model_cfg.trust_remote_code
            )
            self.evaluator = LocalEvaluator(model, space, fast_path=fast_path, threads=threads, objective=objective)
        except Exception as e:  # noqa: BLE001 - handed to the driver by ready()
            self.error = e
        self.load_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        """Where this replica runs: pid, device(s), threads, visible GPUs, load time. Raises the load error if any."""
        if self.error is not None:
            raise self.error
        model = self.evaluator.model
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

    def losses(self, masks: np.ndarray, batch: np.ndarray, lo: int, hi: int,
               objective: str | None = None, r0: int = 0, r1: int | None = None) -> tuple[np.ndarray, float]:
        """Losses of ``masks[lo:hi]`` on rows ``[r0, r1)`` of ``batch`` (the replica's objective unless ``objective``
        is given), and the seconds spent computing them. With the ``kl`` objective the dense log-probabilities of those
        rows are computed once on this actor and reused for its later shares of the same rows."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        share = np.array(masks[lo:hi], dtype=np.float32)  # [k, N]; a copy: object-store arrays are read-only
        ids = torch.from_numpy(np.array(batch[r0:r1], dtype=np.int64))  # [b, T]
        out = self.evaluator.losses(share, ids, objective=objective)  # [k]
        return out, time.perf_counter() - t0

    def set_space(self, space: MaskSpace) -> None:
        """Score later masks in ``space`` (the driver's final mask space, once metric-ordered blocks are formed)."""
        if self.error is not None:
            raise self.error
        self.evaluator.space = copy.deepcopy(space)

    def call(self, task: Any, args: tuple) -> Any:
        """``task(model, adapter, *args)`` on this replica (:mod:`probprune.replica_tasks`)."""
        if self.error is not None:
            raise self.error
        return task(self.evaluator.model, self.evaluator.adapter, *args)


_RemoteReplica = ray.remote(Replica)


# ---------------------------------------------------------------------------------------------------- the driver
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
        return (f"estimated search time: {self.steps} steps x {self.step_seconds:.3g} s/step = "
                f"{_hms(self.search_seconds)} ({self.forwards_per_step} forwards/step x "
                f"{self.seconds_per_forward:.3g} s/forward / {self.actors} actors "
                f"+ {self.overhead_seconds:.3g} s driver overhead)")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class _Share:
    lo: int
    hi: int
    r0: int  # batch rows [r0, r1)
    r1: int
    slot: int
    actor: Any  # the handle the share was sent to (the slot may have been refilled since)
    attempts: int = 0


class RayEvaluator:
    """Scores masks on ``engine.num_actors`` Ray actors, one model replica each.

    Args:
        model_cfg: which model each actor loads (from its path or cache on that node; never sent through the object
            store). With ``engine.gpus_per_actor`` > 0 the replica is put on ``cuda`` (the actor sees only its GPUs,
            Ray sets ``CUDA_VISIBLE_DEVICES``), or spread over them with ``model.device_map`` (e.g. ``auto``).
        space: the mask space (small; sent to every actor).
        engine_cfg: ``num_actors``, ``cpus_per_actor``, ``gpus_per_actor``, ``threads`` (torch threads per actor,
            default ``max(1, int(cpus_per_actor))``), ``address`` (joined if Ray is not initialised yet; None: ``RAY_ADDRESS``, else a new local instance),
            ``fast_path``, ``max_retries`` (per share and step).
        objective: each actor's loss, ``"ce"`` or ``"kl"`` (see :class:`probprune.evaluators.LocalEvaluator`).

    Attributes (timings of the last :meth:`losses` call, for measuring the driver's overhead):
        last_wall_seconds: the whole call.
        last_broadcast_seconds: putting masks and batch into the object store.
        last_busy_seconds: per share, the compute time inside the actor.
        last_gather_seconds: the wait beyond the slowest share's compute: task dispatch, argument fetch, returning
            the losses (and any retries).
        last_shares: the ``(lo, hi, r0, r1)`` shares (masks ``[lo, hi)`` on batch rows ``[r0, r1)``) of the last call
            (:func:`split_work`: fewer masks than actors split the batch rows too).
        busy_seconds: total compute time of all actors (all calls).
        retries / replacements: shares sent again / actors replaced since construction.

    Raises:
        UserError: the actors cannot fit on any node of the cluster, a CPU actor was asked for a CUDA model, or a
            replica could not load its model (the loader's own message).

    Example:
        >>> ev = RayEvaluator(cfg.model, space, cfg.engine)
        >>> ev.losses(masks, batch)   # masks [K, N] float32, batch [B, T] -> [K] float64
        >>> ev.close()
    """

    def __init__(self, model_cfg: ModelConfig, space: MaskSpace, engine_cfg: EngineConfig,
                 startup_timeout: float = 1800.0, objective: str = "ce"):
        self.objective = objective
        self.model_cfg = model_cfg
        self.space = space
        self.engine = engine_cfg
        self.max_retries = engine_cfg.max_retries
        self.threads = engine_cfg.threads or max(1, int(engine_cfg.cpus_per_actor))
        self.device = self._actor_device(model_cfg, engine_cfg)
        local = _is_local_instance(engine_cfg.address)
        self._owns_ray = connect(engine_cfg.address)
        self._started_local = self._owns_ray and local  # a local instance cannot grow: too few CPUs is an error
        self._actors: list[Any] = []
        self._ready: list[Any] = []  # per slot: ref of its ready() call
        self._info: list[dict | None] = []
        try:
            self._check_fits()
            for _ in range(engine_cfg.num_actors):
                self._actors.append(self._start_actor())
                self._ready.append(self._actors[-1].ready.remote())
                self._info.append(None)
            self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise
        self.busy_seconds = 0.0
        self.retries = 0
        self.replacements = 0
        self.last_wall_seconds = self.last_broadcast_seconds = self.last_gather_seconds = 0.0
        self.last_busy_seconds: list[float] = []
        self.last_shares: list[tuple[int, int, int, int]] = []

    # ---------------------------------------------------------------------------------------------- actors
    @staticmethod
    def _actor_device(model_cfg: ModelConfig, e: EngineConfig) -> str:
        if e.gpus_per_actor > 0:
            if e.gpus_per_actor > 1 and model_cfg.device_map is None:
                log.warning("engine.gpus_per_actor=%s but model.device_map is unset: each replica uses one of its "
                            "GPUs; set model.device_map=auto to spread a replica over them", e.gpus_per_actor)
            return "cuda"  # the actor sees only its own GPUs, numbered from 0
        if model_cfg.device.startswith("cuda"):
            raise UserError(f"model.device={model_cfg.device!r} but engine.gpus_per_actor=0: Ray actors without GPUs "
                            "see no CUDA device; set engine.gpus_per_actor (e.g. 1) or model.device=cpu")
        return "cpu"

    def _check_fits(self) -> None:
        e = self.engine
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        need = {"CPU": e.cpus_per_actor, "GPU": e.gpus_per_actor}
        if not any(all(res.get(k, 0.0) >= v for k, v in need.items() if v > 0) for res in nodes):
            have = ", ".join(f"{res.get('CPU', 0):g} CPU / {res.get('GPU', 0):g} GPU" for res in nodes) or "none"
            raise UserError(
                f"engine.cpus_per_actor={e.cpus_per_actor:g}, engine.gpus_per_actor={e.gpus_per_actor:g}: no node of "
                f"the Ray cluster has that much (alive nodes: {have}); lower them, or start nodes that have it"
            )
        total = {k: sum(res.get(k, 0.0) for res in nodes) for k in need}
        short = [k for k, v in need.items() if v > 0 and v * e.num_actors > total[k] + 1e-9]
        if short and self._started_local:
            raise UserError(
                "; ".join(f"engine.num_actors={e.num_actors} x {need[k]:g} {k} per actor needs {need[k] * e.num_actors:g} "
                          f"{k}, the local Ray instance has {total[k]:g}" for k in short)
                + ": lower engine.num_actors or engine.cpus_per_actor / engine.gpus_per_actor"
            )
        if short:
            log.warning("engine.num_actors=%d needs %s; the cluster has %s now: some actors wait for resources",
                        e.num_actors, {k: need[k] * e.num_actors for k in short}, {k: total[k] for k in short})

    def _start_actor(self):
        e = self.engine
        options = {"num_cpus": e.cpus_per_actor, "num_gpus": e.gpus_per_actor, "max_restarts": 0,
                   "max_task_retries": 0, "runtime_env": {"env_vars": _actor_env()}}
        return _RemoteReplica.options(**options).remote(self.model_cfg, self.space, e.fast_path, self.threads,
                                                        self.device, self.objective)

    def _wait_ready(self, timeout: float) -> None:
        t0 = time.perf_counter()
        pending = {ref: i for i, ref in enumerate(self._ready)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=30.0)
            for ref in done:
                i = pending.pop(ref)
                try:
                    self._info[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the replica's load error
                    if isinstance(err.cause, UserError):  # bad path, dtype, ...: the loader's own message
                        raise err.cause from None
                    raise
            waited = time.perf_counter() - t0
            if pending and waited > timeout:
                raise UserError(f"{len(pending)} of {len(self._ready)} Ray actors did not start within {timeout:.0f} s "
                                f"(each needs {self.engine.cpus_per_actor:g} CPU, {self.engine.gpus_per_actor:g} GPU); "
                                f"cluster resources available: {ray.available_resources()}")
            if pending:
                log.info("waiting for %d Ray actors to load the model (%.0f s)", len(pending), waited)
        devices = sorted({str(i["device"]) for i in self._info})
        log.info("%d Ray actors ready on %s, %d torch threads each, model loaded in %.1f s (slowest)",
                 len(self._actors), "/".join(devices), self.threads, max(i["load_seconds"] for i in self._info))

    def _live_slots(self) -> list[int]:
        """Slots whose actor has loaded its model; waits for one if none has (e.g. all were just replaced).

        A replacement that failed to load is left out (logged); if no slot is left, its error is raised.
        """
        while True:
            done, _ = ray.wait(self._ready, num_returns=len(self._ready), timeout=0)
            done = set(done)
            live, failed = [], []
            for i, ref in enumerate(self._ready):
                if ref not in done:
                    continue
                if self._info[i] is None:  # first look at this replica since it (re)started
                    try:
                        self._info[i] = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        self._info[i] = {"error": err}
                        log.error("Ray actor %d could not load the model: %s", i, err)
                if "error" in self._info[i]:
                    failed.append(i)
                else:
                    live.append(i)
            if live:
                return live
            if len(failed) == len(self._ready):
                raise RuntimeError("no Ray actor could load the model") from self._info[failed[0]]["error"]
            ray.wait([r for r in self._ready if r not in done], num_returns=1)

    def _replace(self, slot: int, dead: Any) -> None:
        if self._actors[slot] is not dead:  # already replaced in this call
            return
        try:
            ray.kill(dead, no_restart=True)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self._actors[slot] = self._start_actor()
        self._ready[slot] = self._actors[slot].ready.remote()
        self._info[slot] = None
        self.replacements += 1
        log.warning("Ray actor %d died; started a replacement (it joins once it has loaded the model)", slot)

    def actor_info(self) -> list[dict[str, Any]]:
        """Per actor: pid, node, device, device map, torch threads, ``CUDA_VISIBLE_DEVICES``, GPU ids, load time."""
        return ray.get([a.ready.remote() for a in self._actors])

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    # ------------------------------------------------------------------------------ work that reads the weights
    @property
    def num_replicas(self) -> int:
        """Replicas that have loaded the model (what :meth:`map` spreads its shares over)."""
        return len(self._live_slots())

    def set_space(self, space: MaskSpace) -> None:
        """Make ``space`` the mask space of every replica (and of replacements started later)."""
        self.space = space
        ray.get([self._actors[i].set_space.remote(space) for i in self._live_slots()])

    def run(self, task: Any, *args: Any) -> Any:
        """``task(model, adapter, *args)`` on one replica; see :meth:`map`."""
        return self.map(task, [args])[0]

    def map(self, task: Any, shares: list[tuple]) -> list[Any]:
        """``task(model, adapter, *share)`` for every share, spread round-robin over the live replicas; the results in
        share order. A share whose actor dies is retried on another (the dead one is replaced), up to
        ``engine.max_retries`` times; an error the task raises is re-raised as its own type."""
        live = self._live_slots()
        results: list[Any] = [None] * len(shares)
        attempts = [0] * len(shares)
        in_flight: dict[Any, tuple[int, int, Any]] = {}

        def submit(i: int, slot: int) -> None:
            actor = self._actors[slot]
            in_flight[actor.call.remote(task, tuple(shares[i]))] = (i, slot, actor)

        for i in range(len(shares)):
            submit(i, live[i % len(live)])
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            i, slot, actor = in_flight.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except RETRYABLE as err:
                attempts[i] += 1
                self._replace(slot, actor)
                if attempts[i] > self.max_retries:
                    raise RuntimeError(f"{getattr(task, '__name__', task)} share {i} failed {attempts[i]} time(s), "
                                       f"each on an actor that died (engine.max_retries={self.max_retries}); "
                                       f"last error: {err}") from err
                self.retries += 1
                others = [s for s in self._live_slots() if s != slot] or [slot]
                log.warning("retrying %s share %d on actor %d: %s", getattr(task, "__name__", task), i,
                            others[0], type(err).__name__)
                submit(i, others[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, UserError):
                    raise err.cause from None
                raise
        return results

    # ---------------------------------------------------------------------------------------------- scoring
    def losses(self, masks: np.ndarray, batch: torch.Tensor, objective: str | None = None) -> np.ndarray:
        """Loss of each mask on ``batch``: the evaluator's objective, or ``objective`` for this call.

        Args:
            masks: ``[K, N]`` 0/1 masks (float32).
            batch: ``[B, T]`` token ids.
            objective: ``"ce"`` or ``"kl"``; None = the evaluator's.

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
        masks_ref = ray.put(masks)
        batch_ref = ray.put(batch_np)
        t1 = time.perf_counter()

        live = self._live_slots()
        shares = split_work(k, b, len(live))
        in_flight: dict[Any, _Share] = {}
        load = {slot: 0 for slot in range(len(self._actors))}

        def submit(share: _Share) -> None:
            share.actor = self._actors[share.slot]
            load[share.slot] += 1
            ref = share.actor.losses.remote(masks_ref, batch_ref, share.lo, share.hi, objective, share.r0, share.r1)
            in_flight[ref] = share

        for (lo, hi, r0, r1), slot in zip(shares, live):
            submit(_Share(lo, hi, r0, r1, slot, None))
        out = np.zeros(k, dtype=np.float64)
        busy: list[float] = [0.0] * len(shares)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            share = in_flight.pop(done[0])
            load[share.slot] -= 1
            try:
                values, seconds = ray.get(done[0])
            except RETRYABLE as err:
                share.attempts += 1
                self._replace(share.slot, share.actor)
                if share.attempts > self.max_retries:
                    raise RuntimeError(
                        f"masks {share.lo}..{share.hi - 1} failed {share.attempts} time(s), each on an actor that died "
                        f"(engine.max_retries={self.max_retries}); last error: {err}"
                    ) from err
                self.retries += 1
                others = [s for s in self._live_slots() if s != share.slot] or [share.slot]
                share.slot = min(others, key=lambda s: (load[s], s))
                log.warning("retrying masks %d..%d on actor %d (attempt %d of %d): %s", share.lo, share.hi - 1,
                            share.slot, share.attempts, self.max_retries, type(err).__name__)
                submit(share)
                continue
            except ray.exceptions.RayTaskError as err:  # the scoring code raised: deterministic, not retried
                if isinstance(err.cause, UserError):
                    raise err.cause from None
                raise
            out[share.lo:share.hi] += np.asarray(values) * ((share.r1 - share.r0) / b)  # row-weighted mean
            busy[shares.index((share.lo, share.hi, share.r0, share.r1))] += seconds
        t2 = time.perf_counter()
        self.last_shares = shares
        self.last_busy_seconds = busy
        self.busy_seconds += sum(busy)
        self.last_broadcast_seconds = t1 - t0
        self.last_gather_seconds = max(0.0, (t2 - t1) - max(busy, default=0.0))
        self.last_wall_seconds = t2 - t0
        return out

    def estimate(self, batch: torch.Tensor, steps: int, num_samples: int, masks: np.ndarray | None = None,
                 repeats: int = 1) -> CostEstimate:
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
        return CostEstimate(steps=steps, forwards_per_step=len(masks), actors=len(self.last_shares),
                            seconds_per_forward=float(np.median(per_forward)), step_seconds=float(np.median(walls)),
                            overhead_seconds=float(np.median(overhead)))

    # ---------------------------------------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Kill the actors; shut Ray down only if this evaluator started it. Safe to call twice."""
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors, self._ready, self._info = [], [], []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ====================================================================================================================
# Ray Tune: sweeps (one trial = one whole search; see probprune/sweep.py for the Ray-free half)
# ====================================================================================================================
#
#   run_sweep(cfg) ──> Tuner(with_resources(trial, PlacementGroupFactory), TuneConfig(metric="ppl", mode="min"), …)
#       trial(params): pipeline.prune(base + params) in the trial's own folder
#           every sweep.report_every steps: tune.report({calib_loss, ppl = exp(calib_loss), …}, checkpoint=search ckpt)
#           at the end:                    tune.report({ppl = held-out PPL, ppl_<len>, sparsities, …, final=True})
#   results ──> sweep.results_table / write_results: results.csv, pareto.md, pareto.png, best/sparsity_<t>.yaml

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from .config import Config, SweepConfig, config_from_dict, config_to_dict, load_config, save_config  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd
    from ray.tune import PlacementGroupFactory

__all__ += ["run_sweep", "trial_resources"]

# Small files of a trial's run folder that make up its Tune checkpoint (never the pruned model's weights).
_CKPT_FILES = ("search_checkpoint.pt", "metrics.jsonl", "config.yaml", "summary.json", "masks.pt")
_RUN_DIR = "run"  # the trial's pipeline.prune output, inside the trial's own folder


def trial_resources(cfg: Config, sw: SweepConfig) -> PlacementGroupFactory:
    """The placement group of one trial: ``{CPU: trial_cpus, GPU: trial_gpus}`` for the search itself, plus one
    ``{CPU: cpus_per_actor, GPU: gpus_per_actor}`` bundle per actor when the trial scores masks on Ray actors
    (``engine.kind=ray``); the actors it starts are placed in those bundles (Tune captures child tasks)."""
    from ray import tune

    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0} or {"CPU": 0.01}

    bundles = [bundle(sw.trial_cpus, sw.trial_gpus)]
    if cfg.engine.kind == "ray":
        e = cfg.engine
        bundles += [bundle(e.cpus_per_actor, e.gpus_per_actor) for _ in range(e.num_actors)]
    return tune.PlacementGroupFactory(bundles)


class _TuneReporter:
    """``on_step`` hook of a trial: every ``report_every`` steps, ``tune.report`` the mean calibration loss of the
    steps since the last report (and ``ppl`` = its exp, the metric Tune and ASHA compare mid-search), with the
    search's checkpoint attached when a newer one was written since the last attached one."""

    def __init__(self, run_dir: Path, steps: int, checkpoint_every: int, report_every: int, t0: float):
        self.run_dir, self.steps, self.ckpt_every, self.every, self.t0 = run_dir, steps, checkpoint_every, report_every, t0
        self.window: list[float] = []
        self.fresh = False
        self.stats: dict[str, Any] = {}
        self.last: dict[str, Any] = {}

    def __call__(self, stats: dict[str, Any]) -> None:
        step = int(stats["step"])
        self.stats = stats
        if math.isfinite(stats["loss_mean"]):
            self.window.append(float(stats["loss_mean"]))
        if step % self.ckpt_every == 0 or step == self.steps:  # run_search has just written its checkpoint
            self.fresh = True
        if step % self.every == 0:
            self.report(stats)

    def report(self, stats: dict[str, Any], force_checkpoint: bool = False) -> None:
        """Report the steps since the last report (the last reported loss again if there were none)."""
        loss = float(np.mean(self.window)) if self.window else self.last.get("calib_loss", float("nan"))
        self.window = []
        self.last = {
            "step": int(stats["step"]), "calib_loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "baseline": float(stats["baseline"]), "expected_sparsity": float(stats["expected_sparsity"]),
            "lr_now": float(stats["lr"]), "final": False, "wall_seconds": time.perf_counter() - self.t0,
        }
        _report(self.last, self.run_dir if self.fresh or force_checkpoint else None)
        self.fresh = False


def _remove_stale_checkpoint_dirs() -> None:
    """Delete ``$TMPDIR/probprune-ckpt-<pid>-*`` folders whose process is gone (a trial killed while reporting)."""
    for p in Path(tempfile.gettempdir()).glob("probprune-ckpt-*-*"):
        pid = p.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def _report(metrics: dict[str, Any], run_dir: Path | None) -> None:
    """``tune.report`` with, if ``run_dir`` is given, its small files as the checkpoint (Tune copies them to storage)."""
    from ray import tune

    if run_dir is None:
        tune.report(metrics)
        return
    _remove_stale_checkpoint_dirs()
    with tempfile.TemporaryDirectory(prefix=f"probprune-ckpt-{os.getpid()}-") as tmp:
        for name in _CKPT_FILES:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, Path(tmp) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _final_metrics(summary: dict[str, Any], t0: float, calib_loss: float) -> dict[str, Any]:
    by_len = {int(k): float(v) for k, v in summary["pruned_ppl"].items()}
    short = min(by_len)
    return {
        "step": int(summary["search"]["steps"]), "calib_loss": calib_loss, "ppl": by_len[short],
        **{f"ppl_{n}": v for n, v in sorted(by_len.items())},
        "prunable_sparsity": float(summary["sparsity"]["prunable"]),
        "total_sparsity": float(summary["sparsity"]["total"]),
        "dense_ppl": float(summary["dense_ppl"][str(short)]),
        "init_ppl": float(summary["init_ppl"][str(short)]) if summary.get("init_ppl") else float("nan"),
        "params_total": int(summary["params"]["pruned_total"]),
        "final": True, "wall_seconds": time.perf_counter() - t0,
    }


def _trial_work_dir() -> Path:
    """The trial's own working folder on the node it runs on (where Tune chdirs a trial to).

    Not ``tune.get_context().get_trial_dir()``: on the driver's node that folder is synced to the storage with the
    experiment state, and the pruned weights written there would be copied (and raced) for nothing; what a trial
    keeps goes through its :class:`tune.Checkpoint` instead.
    """
    try:
        from ray.train._internal.session import get_session  # Ray 2.x: no public accessor of the working dir

        return Path(get_session().storage.trial_working_directory)
    except Exception:  # noqa: BLE001 - another Ray version: a scratch folder does the same job
        return Path(tempfile.mkdtemp(prefix="probprune-trial-"))


def _make_trainable(base: dict[str, Any], sw: SweepConfig, stop_after: int | None):
    """The function trainable of a sweep: one ``pipeline.prune`` of ``base`` + the trial's parameters."""

    def probprune_trial(config: dict[str, Any]) -> None:
        from ray import tune

        from . import pipeline
        from .sweep import trial_config

        t0 = time.perf_counter()
        cfg = trial_config(config_from_dict(base), config)
        # one torch thread per CPU of the trial: more threads than cores stalls forwards on a busy node
        torch.set_num_threads(max(1, int(sw.trial_cpus)))
        run_dir = _trial_work_dir() / _RUN_DIR
        shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of a failed attempt; the checkpoint is the truth
        checkpoint = tune.get_checkpoint()
        resume = checkpoint is not None
        if resume:
            with checkpoint.as_directory() as d:
                shutil.copytree(d, run_dir)
        if resume and (run_dir / "summary.json").exists():  # finished before the interruption: report it again
            summary = json.loads((run_dir / "summary.json").read_text())
            _report(_final_metrics(summary, t0, float("nan")), None)
            return
        reporter = _TuneReporter(run_dir, cfg.search.steps, cfg.search.checkpoint_every, sw.report_every, t0)
        summary = pipeline.prune(cfg, run_dir, resume=resume, progress=False, on_step=reporter,
                                 stop_after=None if resume else stop_after)
        if "interrupted_at_step" in summary:  # simulated interruption (tests): checkpoint, then fail the trial
            step = summary["interrupted_at_step"]
            if reporter.stats:
                reporter.report(reporter.stats, force_checkpoint=True)
            raise RuntimeError(f"trial stopped after step {step} (run_sweep(stop_after={stop_after}))")
        _report(_final_metrics(summary, t0, reporter.last.get("calib_loss", float("nan"))), run_dir)
        shutil.rmtree(run_dir / "model", ignore_errors=True)  # weights: rerun the best config to keep a model

    return probprune_trial


def _tune_space(space: Mapping[str, Any], search_alg: str) -> dict[str, Any]:
    from ray import tune

    from .sweep import Grid

    out: dict[str, Any] = {}
    for key, dom in space.items():
        if isinstance(dom, Grid):
            if search_alg == "optuna":
                bad = [v for v in dom.values if not isinstance(v, (bool, int, float, str, type(None)))]
                if bad:
                    raise UserError(f"sweep.search_alg='optuna' needs scalar values, but {key} has {bad!r}; "
                                    "use sweep.search_alg=grid")
                out[key] = tune.choice(list(dom.values))
            else:
                out[key] = tune.grid_search(list(dom.values))
        else:
            out[key] = tune.loguniform(dom.low, dom.high)
    return out


def _storage(sw: SweepConfig) -> str:
    return sw.storage_path if "://" in sw.storage_path else str(Path(sw.storage_path).expanduser().resolve())


def _records(results) -> list[dict[str, Any]]:
    from .sweep import shown_path

    records = []
    for r in results:
        m = dict(r.metrics or {})
        status = "error" if r.error is not None else ("finished" if m.get("final") else "stopped")
        records.append({"trial_id": m.get("trial_id") or Path(r.path).name, "status": status,
                        "params": dict(r.config or {}), "metrics": m,
                        "checkpoint": shown_path(r.checkpoint.path) if r.checkpoint is not None else None})
    return records


def run_sweep(cfg: Config, output_dir: str | Path, address: str | None = None, smoke: bool = False,
              resume: bool = False, stop_after: int | None = None) -> pd.DataFrame:
    """Run (or resume) a Ray Tune sweep of ``cfg.sweep`` and write its results under ``output_dir``.

    Each trial is one :func:`probprune.pipeline.prune` of ``cfg`` (``sweep`` section removed) with the trial's
    parameters (:func:`probprune.sweep.search_space`: ``search.lr``, ``search.sparsity``, ``sweep.grid`` keys), run in
    the trial's own folder (``<trial dir>/run``). Every ``sweep.report_every`` steps it reports ``calib_loss`` (mean
    calibration loss since the last report), ``ppl`` = exp(calib_loss), ``step``, ``expected_sparsity``, with the
    search's checkpoint attached as a :class:`ray.tune.Checkpoint`; its final report carries the held-out ``ppl``
    (shortest window), ``ppl_<len>``, ``prunable_sparsity``, ``total_sparsity``, ``dense_ppl``, ``init_ppl`` and
    ``final=True``, with ``summary.json`` and ``masks.pt`` in its checkpoint (the pruned weights are not kept: rerun
    the best config for them).

    Tune: ``TuneConfig(metric="ppl", mode="min", num_samples, max_concurrent_trials)``; ``search_alg=grid`` runs the
    grid ``num_samples`` times, ``optuna`` lets Optuna (TPE, seeded with ``cfg.seed``) pick as many trials
    (:func:`~probprune.sweep.num_trials`); ``scheduler=asha`` stops trials early on their calibration loss (it
    compares all running trials, so sweep one sparsity at a time with it). Resources per trial:
    :func:`trial_resources`. Experiment: ``<sweep.storage_path>/<output_dir name>`` (``tune.RunConfig``).

    Args:
        cfg: a config with a ``sweep`` section.
        output_dir: where ``results.csv``, ``pareto.md``, ``pareto.png``, ``best/sparsity_<t>.yaml`` and
            ``sweep_config.yaml`` (the config as given) go; its folder name names the Tune experiment.
        address: Ray to join (``"auto"``, ``"host:port"``); None: ``RAY_ADDRESS``, else a new local instance (shut
            down at the end). An already connected process keeps its connection.
        smoke: quiet Tune output (tests, ``--smoke-test``).
        resume: continue the interrupted sweep of the same output folder (``Tuner.restore``): unfinished and
            errored trials restart from their last checkpoint, finished ones are kept.
        stop_after: make every trial that does not resume from a checkpoint fail right after checkpointing this
            many steps (simulates an interrupted sweep; tests only).

    Returns:
        The results table (:func:`probprune.sweep.results_table`): one row per trial.

    Raises:
        UserError: no ``sweep`` section; ``search_alg=optuna`` without Optuna installed; the experiment folder
            exists already (without ``resume``), holds nothing to resume or was started with another config (with
            it).
        ConfigError: a grid point makes an invalid config (checked for every point before Ray starts).
    """
    from ray import tune

    from . import sweep as sweeps

    sw = sweeps._require(cfg.sweep)
    output_dir = Path(output_dir).resolve()
    base = sweeps.absolute_paths(cfg)
    space = sweeps.search_space(sw)
    if sw.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise UserError("sweep.search_alg='optuna' needs Optuna: pip install 'probprune[optuna]' (or set "
                        "sweep.search_alg=grid)")
    if sw.scheduler == "asha" and len(sw.sparsity) > 1:
        log.warning("sweep.scheduler='asha' compares the calibration loss of all running trials: it will stop trials "
                    "with higher sparsity targets first; sweep one sparsity at a time to compare learning rates")
    for point in sweeps.expand_grid(sw):  # every grid point must make a valid config before anything starts
        sweeps.trial_config(base, {k: (v.low if isinstance(v, sweeps.LogUniform) else v) for k, v in point.items()})
    name = output_dir.name
    storage = _storage(sw)
    exp_path = f"{storage.rstrip('/')}/{name}"
    if not resume and "://" not in storage and Path(exp_path).exists() and any(Path(exp_path).iterdir()):
        raise UserError(f"sweep experiment {exp_path} exists already; pass --resume to continue it, or choose "
                        "another --output (its folder name names the experiment) or sweep.storage_path")
    if resume and not tune.Tuner.can_restore(exp_path):
        raise UserError(f"--resume: no sweep to resume at {exp_path} (sweep.storage_path / the --output folder name)")
    if not resume and (output_dir / "results.csv").exists():
        raise UserError(f"--output {output_dir} already holds sweep results (results.csv); choose another folder")
    record = output_dir / "sweep_config.yaml"  # the config the sweep started with; a resumed sweep must match it
    if resume and record.exists() and config_to_dict(load_config(record)) != config_to_dict(cfg):
        raise UserError(f"--resume: the config differs from the one this sweep started with ({record}); resume "
                        "with the same config and overrides")
    save_config(cfg, record)

    base_dict = config_to_dict(base)
    trainable = tune.with_resources(
        _make_trainable(base_dict, sw, stop_after),
        lambda params: trial_resources(sweeps.trial_config(config_from_dict(base_dict), params), sw),
    )
    # two checkpoints kept per trial force an experiment snapshot per report on a tiny model; that is intended
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    local = _is_local_instance(address)
    owns = connect(address)
    try:
        if owns and local:
            log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_tune_space(space, sw.search_alg),
                tune_config=tune.TuneConfig(
                    metric="ppl", mode="min", num_samples=_tune_samples(sw),
                    max_concurrent_trials=sw.max_concurrent or None,
                    scheduler=_scheduler(cfg, sw), search_alg=_search_alg(cfg, sw),
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage, verbose=0 if smoke else 1,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        results = tuner.fit()
    finally:
        if owns:
            ray.shutdown()
    df = sweeps.results_table(_records(results), list(space))
    sweeps.write_results(df, cfg, list(space), output_dir, experiment_path=exp_path)
    return df


def _tune_samples(sw: SweepConfig) -> int:
    from .sweep import num_trials

    # grid: Tune repeats the whole grid num_samples times; a searcher gets the same number of trials in all
    return sw.num_samples if sw.search_alg == "grid" else num_trials(sw)


def _scheduler(cfg: Config, sw: SweepConfig):
    if sw.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    reports = cfg.search.steps // sw.report_every + 1  # + the final, held-out report
    return ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=max(1, (reports - 1) // 4),
                         reduction_factor=2)


def _search_alg(cfg: Config, sw: SweepConfig):
    if sw.search_alg != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.seed)
