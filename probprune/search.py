"""The search loop: sample masks, score them with an evaluator, update the policy; checkpoint and resume.

The loop never knows where losses come from (this process or a Ray cluster). Batches depend only on (seed, step)
and the policy's generator state is checkpointed, so a resumed run ends with exactly the probabilities of an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import CalibrationData
from .errors import UserError
from .evaluators import Evaluator
from .policy import Policy

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "search_checkpoint.pt"


@dataclass
class SearchResult:
    """What a search produced."""

    policy: Policy
    final_mask: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    forwards: int = 0  # masks scored (each on one batch)
    wall_seconds: float = 0.0
    eval_seconds: float = 0.0  # time inside the evaluator
    dropped_samples: int = 0
    resumed_from_step: int = 0


def save_checkpoint(path: Path, policy: Policy, extra: dict[str, Any] | None = None) -> None:
    """Write the search state atomically (temp file + rename): a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"policy": policy.state_dict(), "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, read with ``weights_only=True``: tensors, numbers, strings and containers only, so
    a checkpoint that came from elsewhere cannot run code when it is loaded (a pickle that tries is refused, its
    payload never runs).

    Raises:
        UserError: the file is unreadable, corrupt or not a probprune checkpoint.
    """
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, or a pickle with code in it
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"--resume: cannot read the search checkpoint {path} ({type(err).__name__}: {first[:200]}); it is corrupt "
            "or not a probprune checkpoint, and only tensors, numbers and strings are ever loaded from it. Delete it "
            "to start the search over, or choose another --output"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("policy"), dict):
        raise UserError(f"--resume: {path} is not a probprune search checkpoint (no policy state in it); delete it to "
                        "start the search over, or choose another --output")
    return state


def checkpoint_fingerprint(path: Path) -> str | None:
    """The fingerprint a checkpoint was written with (None if it has none), read safely (:func:`_read_checkpoint`)."""
    extra = _read_checkpoint(path).get("extra", {})
    return extra.get("fingerprint") if isinstance(extra, dict) else None


def load_checkpoint(path: Path, policy: Policy, fingerprint: str | None = None) -> dict[str, Any]:
    """Restore ``policy`` from a checkpoint; refuse one written for another search (different fingerprint).

    Raises:
        UserError: the file is unreadable, corrupt, not a probprune checkpoint (:func:`_read_checkpoint`), or from
            another search.
    """
    state = _read_checkpoint(path)
    saved = state.get("extra", {}).get("fingerprint")
    if fingerprint is not None and saved is not None and saved != fingerprint:
        raise UserError(
            f"--resume: checkpoint {path} belongs to a different search (model, data, mask space or search settings "
            "differ); use another --output or drop --resume"
        )
    policy.load_state_dict(state["policy"])
    return state.get("extra", {})


def _metric_step(line: str) -> int | None:
    """The step of one metrics line, or None for a torn or foreign line (e.g. the disk filled up mid-append)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get("step", 0) if isinstance(rec, dict) else None


def _trim_metrics(path: Path, upto_step: int) -> None:
    """Keep only metric lines of steps <= upto_step (a resumed run rewrites the steps after its checkpoint).

    A line that is not a JSON object (a write torn by a full disk or a kill) is dropped with a warning, not fatal.
    """
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    steps = [_metric_step(ln) for ln in lines]
    torn = sum(st is None for st in steps)
    if torn:
        log.warning("metrics: dropped %d unreadable line(s) of %s (a write that did not finish)", torn, path)
    keep = [ln for ln, st in zip(lines, steps) if st is not None and st <= upto_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def run_search(
    policy: Policy,
    evaluator: Evaluator,
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
        evaluator: turns ``[K, N]`` masks and a ``[B, T]`` batch into ``[K]`` losses.
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
    ckpt = ckpt_dir / CHECKPOINT_NAME if ckpt_dir else None
    metrics = ckpt_dir / "metrics.jsonl" if ckpt_dir else None
    start = 0
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt is not None and ckpt.exists():
        load_checkpoint(ckpt, policy, fingerprint)
        start = policy.step_count
        _trim_metrics(metrics, start)
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
        losses = evaluator.losses(masks.numpy(), batch)  # [K]
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
                f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in stats.items()}) + "\n")
        if ckpt is not None and (stats["step"] % checkpoint_every == 0 or stats["step"] == end):
            save_checkpoint(ckpt, policy, {"fingerprint": fingerprint, "step": stats["step"]})
        if on_step is not None:
            on_step(stats)
        finite = [x for x in stats["losses"] if math.isfinite(x)]
        spread = (max(finite) - min(finite)) if finite else float("nan")
        bar.set_postfix(  # the spread of the step's losses: how differently the sampled masks do
            loss=f"{stats['loss_mean']:.3f}", spread=f"{spread:.3f}", sparsity=f"{stats['expected_sparsity']:.3f}",
            refresh=False,
        )
        bar.update(1)
    bar.close()
    result.wall_seconds = time.perf_counter() - t_start
    result.dropped_samples = policy.total_dropped
    result.final_mask = policy.final_mask()
    return result
