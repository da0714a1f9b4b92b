"""Ray: the only part of probprune that imports it.

- :mod:`probprune.distributed.actors` — the cluster evaluator: actors that each hold one model replica score the
  sampled masks of a step (and run the work that reads weights for a driver that holds no model), with fault handling.
- :mod:`probprune.distributed.tune` — Ray Tune sweeps over learning rates and sparsity targets (one trial = one search).
- :mod:`probprune.distributed.train` — data-parallel healing with Ray Train (one ``TorchTrainer`` worker per GPU).
"""

from __future__ import annotations

from .actors import CostEstimate, RayEvaluator, connect, split_shares, split_work

__all__ = ["CostEstimate", "RayEvaluator", "connect", "split_shares", "split_work", "run_sweep", "trial_resources"]


def __getattr__(name: str):
    if name in ("run_sweep", "trial_resources"):  # Tune imports the pipeline: loaded when asked for, not with the actors
        from . import tune

        return getattr(tune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
