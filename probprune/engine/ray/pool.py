"""A pool of replica actors with one loop that submits calls, retries the ones whose actor died, and replaces it.

Failures: when an actor dies mid-call (process killed, OOM, node lost), its call is sent again to the live actor with
the least work in flight and a fresh replica replaces the dead one in the background (it joins once it has loaded its
model), at most ``engine.max_retries`` times per call. The pool manages this itself (``max_restarts=0``) rather than
letting Ray restart the actor and re-run the task there: a restart reloads the model (minutes for a 70B replica)
while another replica can do the call in one forward. Calls are pure functions of their arguments (the masks are
fixed before they are scored), so a retried call returns exactly what an undisturbed one would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions

from ...config import EngineConfig, ModelConfig
from ...errors import UserError
from ...mask_space import MaskSpace
from .cluster import RETRYABLE, actor_env
from .replica import RemoteReplica

log = logging.getLogger(__name__)


@dataclass
class Call:
    """One call of a replica method: ``method(*args)``, sent to ``slot`` (filled in by the pool)."""

    method: str
    args: tuple
    label: str  # names the call in retry messages, e.g. "masks 0..1"
    slot: int = -1
    actor: Any = None  # the handle it was sent to (the slot may have been refilled since)
    attempts: int = 0


class ReplicaPool:
    """``engine.num_actors`` replica actors (see :class:`~probprune.engine.ray.replica.Replica`).

    Attributes:
        retries / replacements: calls sent again / actors replaced since construction.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        space: MaskSpace,
        engine_cfg: EngineConfig,
        device: str,
        threads: int,
        objective: str,
        startup_timeout: float,
    ):
        self.model_cfg, self.space, self.engine = model_cfg, space, engine_cfg
        self.device, self.threads, self.objective = device, threads, objective
        self.max_retries = engine_cfg.max_retries
        self.retries = self.replacements = 0
        self._actors: list[Any] = []
        self._ready: list[Any] = []  # per slot: ref of its ready() call
        self._info: list[dict | None] = []
        for _ in range(engine_cfg.num_actors):
            self._actors.append(self._start_actor())
            self._ready.append(self._actors[-1].ready.remote())
            self._info.append(None)
        self._wait_ready(startup_timeout)

    # ---------------------------------------------------------------------------------------------- actors
    def _start_actor(self):
        e = self.engine
        options = {
            "num_cpus": e.cpus_per_actor,
            "num_gpus": e.gpus_per_actor,
            "max_restarts": 0,
            "max_task_retries": 0,
            "runtime_env": {"env_vars": actor_env()},
        }
        if e.placement == "spread" and ray.util.get_current_placement_group() is None:  # a Tune trial's bundles win
            options["scheduling_strategy"] = "SPREAD"
        return RemoteReplica.options(**options).remote(
            self.model_cfg, self.space, e.fast_path, self.threads, self.device, self.objective, e.scoring
        )

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
                raise UserError(
                    f"{len(pending)} of {len(self._ready)} Ray actors did not start within {timeout:.0f} s "
                    f"(each needs {self.engine.cpus_per_actor:g} CPU, {self.engine.gpus_per_actor:g} GPU); "
                    f"cluster resources available: {ray.available_resources()}"
                )
            if pending:
                log.info("waiting for %d Ray actors to load the model (%.0f s)", len(pending), waited)
        devices = sorted({str(i["device"]) for i in self._info})
        log.info(
            "%d Ray actors ready on %s, %d torch threads each, model loaded in %.1f s (slowest)",
            len(self._actors),
            "/".join(devices),
            self.threads,
            max(i["load_seconds"] for i in self._info),
        )

    def live_slots(self) -> list[int]:
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
        except Exception:
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

    def set_space(self, space: MaskSpace) -> None:
        """Make ``space`` the mask space of every replica (and of replacements started later)."""
        self.space = space
        ray.get([self._actors[i].set_space.remote(space) for i in self.live_slots()])

    # ---------------------------------------------------------------------------------------------- the loop
    def call(self, calls: list[Call]) -> list[Any]:
        """Run every call on the live replicas (round-robin), retrying a call whose actor died on the live actor
        with the least work in flight; the results in call order.

        Raises:
            RuntimeError: a call failed on ``engine.max_retries + 1`` actors, each of which died.
            Any exception the replica method raises (re-raised as its own type; a UserError stays one).
        """
        live = self.live_slots()
        results: list[Any] = [None] * len(calls)
        in_flight: dict[Any, int] = {}
        load = {slot: 0 for slot in range(len(self._actors))}

        def submit(i: int) -> None:
            c = calls[i]
            c.actor = self._actors[c.slot]
            load[c.slot] += 1
            in_flight[getattr(c.actor, c.method).remote(*c.args)] = i

        for i, c in enumerate(calls):
            c.slot = live[i % len(live)]
            submit(i)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            i = in_flight.pop(done[0])
            c = calls[i]
            load[c.slot] -= 1
            try:
                results[i] = ray.get(done[0])
            except RETRYABLE as err:
                c.attempts += 1
                self._replace(c.slot, c.actor)
                if c.attempts > self.max_retries:
                    raise RuntimeError(
                        f"{c.label} failed {c.attempts} time(s), each on an actor that died "
                        f"(engine.max_retries={self.max_retries}); last error: {err}"
                    ) from err
                self.retries += 1
                others = [s for s in self.live_slots() if s != c.slot] or [c.slot]
                c.slot = min(others, key=lambda s: (load[s], s))
                log.warning(
                    "retrying %s on actor %d (attempt %d of %d): %s",
                    c.label,
                    c.slot,
                    c.attempts,
                    self.max_retries,
                    type(err).__name__,
                )
                submit(i)
                continue
            except ray.exceptions.RayTaskError as err:  # the replica's code raised: deterministic, not retried
                if isinstance(err.cause, UserError):
                    raise err.cause from None
                raise
        return results

    def close(self) -> None:
        """Kill the actors. Safe to call twice."""
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self._actors, self._ready, self._info = [], [], []
