"""Ray: the only part of probprune that imports it.

- :mod:`~probprune.engine.ray.cluster` — starting or joining a cluster, the actors' environment, resource checks;
- :mod:`~probprune.engine.ray.replica` — the actor that holds one model replica;
- :mod:`~probprune.engine.ray.pool` — the actors and the one loop that submits, retries and replaces;
- :mod:`~probprune.engine.ray.engine` — :class:`RayEngine`, the engine the pipeline sees;
- :mod:`~probprune.engine.ray.tune` — Ray Tune sweeps over learning rates and sparsity targets (one trial = one search);
  it runs the pipeline, so nothing here imports it;
- :mod:`~probprune.engine.ray.train` — data-parallel healing with Ray Train (one ``TorchTrainer`` worker per GPU).
"""

from __future__ import annotations

from .cluster import connect
from .engine import CostEstimate, RayEngine, split_work

__all__ = ["CostEstimate", "RayEngine", "connect", "split_work"]
