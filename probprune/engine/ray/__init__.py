"""Ray: the only part of probprune that imports it.

- :mod:`~probprune.engine.ray.cluster` — starting or joining a cluster, the actors' environment, resource checks;
- :mod:`~probprune.engine.ray.replica` — the actor that holds one model replica;
- :mod:`~probprune.engine.ray.pool` — the actors and the one loop that submits, retries and replaces;
- :mod:`~probprune.engine.ray.engine` — :class:`RayEngine`, the engine the pipeline sees;
- :mod:`~probprune.engine.ray.tune` — Ray Tune sweeps over learning rates and sparsity targets (one trial = one search).
"""

from __future__ import annotations

from .cluster import connect
from .engine import CostEstimate, RayEngine, split_work

__all__ = ["CostEstimate", "RayEngine", "connect", "split_work", "run_sweep", "trial_resources"]


def __getattr__(name: str):
    if name in ("run_sweep", "trial_resources"):  # Tune imports the pipeline: loaded when asked for, not with the actors
        from . import tune

        return getattr(tune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
