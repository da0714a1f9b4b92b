"""The search loop: sample masks, score them with an engine, update the policy; checkpoint and resume.

The loop never knows where losses come from (this process or a Ray cluster). Batches depend only on (seed, step)
and the policy's generator state is checkpointed, so a resumed run ends with exactly the probabilities of an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .data import CalibrationData
from .engine.base import Engine
from .policy import Policy
from .run_folder import CHECKPOINT, METRICS, load_checkpoint, save_checkpoint, trim_metrics

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search produced."""

    policy: Policy
    final_mask: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    forwards: int = 0  # masks scored (each on one batch)
    wall_seconds: float = 0.0
    eval_seconds: float = 0.0  # time inside the engine
    dropped_samples: int = 0
    resumed_from_step: int = 0


def run_search(
    policy: Policy,
    engine: Engine,
    data: CalibrationData,
    *,
    steps: int,
    num_samples: int,
    batch_size: int,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    log_every: int = 1,
    resume: bool = False,
    fingerprint: str | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> SearchResult:
    """Run (or resume) a policy-gradient search.

    Args:
        policy: the policy (its ``total_steps`` sets the lr schedule; normally equal to ``steps``).
        engine: turns ``[K, N]`` masks and a ``[B, T]`` batch into ``[K]`` losses.
        data: calibration blocks; step t uses ``data.batch(t, batch_size)`` (same batch for all K masks).
        steps: total steps of the search.
        num_samples: K masks per step.
        batch_size: sequences per mask per step.
        checkpoint_dir: where ``search_checkpoint.pt`` and ``metrics.jsonl`` go (None = no checkpoints, no files).
        checkpoint_every: checkpoint every this many steps (and at the end).
        log_every: write a metrics line every this many steps.
        resume: continue from ``checkpoint_dir``'s checkpoint if there is one.
        fingerprint: identifies the search; a checkpoint with another fingerprint is refused on resume.
        on_step: called with each step's stats (e.g. to report to Ray Tune).
        stop_after: stop (after checkpointing) once this many steps are done — to simulate an interruption.

    Returns:
        :class:`SearchResult` with the final deterministic mask.
    """
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt = ckpt_dir / CHECKPOINT if ckpt_dir else None
    metrics = ckpt_dir / METRICS if ckpt_dir else None
    start = 0
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt is not None and ckpt.exists():
        load_checkpoint(ckpt, policy, fingerprint)
        start = policy.step_count
        trim_metrics(metrics, start)
        log.info("resumed search from step %d", start)
    elif metrics is not None and metrics.exists():
        metrics.unlink()
    result = SearchResult(policy=policy, final_mask=np.zeros(0), resumed_from_step=start)
    t_start = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc="search", unit="step", disable=not progress, dynamic_ncols=True)
    end = steps if stop_after is None else min(steps, stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        masks = policy.sample(num_samples)  # [K, N]
        batch = data.batch(step, batch_size)  # [B, T]
        t1 = time.perf_counter()
        losses = engine.losses(masks.numpy(), batch)  # [K]
        t2 = time.perf_counter()
        stats = policy.step(masks, losses)
        t3 = time.perf_counter()
        stats.update(
            step_seconds=t3 - t0,
            eval_seconds=t2 - t1,
            driver_seconds=(t1 - t0) + (t3 - t2),
            losses=[float(x) for x in np.asarray(losses)],
        )
        result.history.append(stats)
        result.forwards += num_samples
        result.eval_seconds += t2 - t1
        if metrics is not None and (stats["step"] % log_every == 0 or stats["step"] == steps):
            with metrics.open("a") as f:
                f.write(
                    json.dumps(
                        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in stats.items()}
                    )
                    + "\n"
                )
        if ckpt is not None and (stats["step"] % checkpoint_every == 0 or stats["step"] == end):
            save_checkpoint(ckpt, policy, {"fingerprint": fingerprint, "step": stats["step"]})
        if on_step is not None:
            on_step(stats)
        finite = [x for x in stats["losses"] if math.isfinite(x)]
        spread = (max(finite) - min(finite)) if finite else float("nan")
        bar.set_postfix(  # the spread of the step's losses: how differently the sampled masks do
            loss=f"{stats['loss_mean']:.3f}",
            spread=f"{spread:.3f}",
            sparsity=f"{stats['expected_sparsity']:.3f}",
            refresh=False,
        )
        bar.update(1)
    bar.close()
    result.wall_seconds = time.perf_counter() - t_start
    result.dropped_samples = policy.total_dropped
    result.final_mask = policy.final_mask()
    return result
