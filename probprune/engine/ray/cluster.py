"""Joining or starting a Ray cluster, the environment of the driver and its actors, and resource checks.

Measured facts this module encodes (Ray 2.60): ``ray.init`` replaces the process's SIGTERM handler (here it is
kept, and a SIGTERM that arrives while Ray starts is delivered to it afterwards); CPU actors inherit ``CUDA_VISIBLE_DEVICES`` unless
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``; a local instance started by this process cannot grow, so asking it for more
CPUs or GPUs than it has is an error, not a wait.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import ray.exceptions

from ...config import EngineConfig, ModelConfig
from ...errors import UserError
from ...termination import sigterm_deferred

log = logging.getLogger(__name__)

# Environment of the driver before it starts or joins Ray (Ray 2.60).
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# Environment of every actor: a CPU actor must get CUDA_VISIBLE_DEVICES="" instead of inheriting the node's GPUs.
ACTOR_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1", "TOKENIZERS_PARALLELISM": "false"}
# Passed on to actors when set in the driver, so replicas find the same caches and offline settings.
FORWARDED_ENV = ("PROBPRUNE_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# Failures of the actor or its node (retried elsewhere). An exception raised by the task itself (a RayTaskError: bad
# shapes, CUDA OOM inside the forward) is deterministic and is raised to the caller instead.
RETRYABLE = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.OutOfMemoryError,  # the node's memory monitor killed the worker
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,  # the result lived on a node that died
    ray.exceptions.LocalRayletDiedError,
)


def actor_env() -> dict[str, str]:
    """Environment variables every actor gets (:data:`ACTOR_ENV` plus the driver's :data:`FORWARDED_ENV`)."""
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
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": actor_env()}, "logging_level": logging.WARNING}
    if address == "local":
        kwargs["include_dashboard"] = False
    kwargs.update(init_kwargs)
    log.info("starting Ray (address=%s)", address)
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


def is_local_instance(address: str | None) -> bool:
    """Whether ``address`` means a new local instance (rather than an existing cluster)."""
    return address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))


def actor_device(model_cfg: ModelConfig, e: EngineConfig) -> str:
    """The device a replica is put on: ``cuda`` when actors have GPUs (they see only their own), else ``cpu``.

    Raises:
        UserError: a CUDA model asked for on actors without GPUs.
    """
    if e.gpus_per_actor > 0:
        if e.gpus_per_actor > 1 and model_cfg.device_map is None:
            log.warning(
                "engine.gpus_per_actor=%s but model.device_map is unset: each replica uses one of its "
                "GPUs; set model.device_map=auto to spread a replica over them",
                e.gpus_per_actor,
            )
        return "cuda"  # the actor sees only its own GPUs, numbered from 0
    if model_cfg.device.startswith("cuda"):
        raise UserError(
            f"model.device={model_cfg.device!r} but engine.gpus_per_actor=0: Ray actors without GPUs "
            "see no CUDA device; set engine.gpus_per_actor (e.g. 1) or model.device=cpu"
        )
    return "cpu"


def check_fits(e: EngineConfig, started_local: bool) -> None:
    """Refuse actors that no node can hold, and (on a local instance, which cannot grow) more actors than fit.

    Raises:
        UserError: naming the settings and what the cluster has.
    """
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
    if short and started_local:
        raise UserError(
            "; ".join(
                f"engine.num_actors={e.num_actors} x {need[k]:g} {k} per actor needs {need[k] * e.num_actors:g} "
                f"{k}, the local Ray instance has {total[k]:g}"
                for k in short
            )
            + ": lower engine.num_actors or engine.cpus_per_actor / engine.gpus_per_actor"
        )
    if short:
        log.warning(
            "engine.num_actors=%d needs %s; the cluster has %s now: some actors wait for resources",
            e.num_actors,
            {k: need[k] * e.num_actors for k in short},
            {k: total[k] for k in short},
        )
