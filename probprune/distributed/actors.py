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

Nothing here imports the pipeline or Tune: the sweeps are :mod:`probprune.distributed.tune`.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import ray
import ray.exceptions
import torch

from ..config import EngineConfig, ModelConfig
from ..errors import UserError
from ..masks import MaskSpace
from ..termination import sigterm_deferred

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
    with sigterm_deferred("Ray was starting"), _ray_keeps_sigterm_handler():  # handled once Ray is up
        ray.init(address=address, **kwargs)
    return True


@contextmanager
def _ray_keeps_sigterm_handler() -> Iterator[None]:
    """While an application SIGTERM handler is installed (the entry points'), keep ``ray.init`` from replacing it.

    ``ray.init`` installs ``sys.exit(15)`` as the SIGTERM handler at its start (``ray._private.utils
    .set_sigterm_handler``, Ray 2.60); a signal then ends the driver from wherever ``ray.init`` is, C++ core included.
    """
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    main_thread = threading.current_thread() is threading.main_thread()
    if not (main_thread and callable(signal.getsignal(signal.SIGTERM)) and hasattr(utils, "set_sigterm_handler")):
        yield
        return
    original = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


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
            from ..evaluators import LocalEvaluator
            from ..models.loading import load_model

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
        if e.placement == "spread" and ray.util.get_current_placement_group() is None:  # a Tune trial's bundles win
            options["scheduling_strategy"] = "SPREAD"
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
