"""The jobs, as recipes of named steps.

``probprune prune``:  prepare -> warm start -> search -> choose -> compact and save -> evaluate -> summary.
``probprune baseline``: prepare -> baseline mask -> compact and save -> evaluate -> summary.

Every step takes what it needs and returns what it made. Where the weights live (this process, or Ray actors with a
driver that holds only the model's shapes) is the engine's business (:mod:`probprune.engine`): no step asks. Every
user-facing check (config, output folder, model path, architecture, data, context length) runs before the output
folder is created (:mod:`probprune.run_folder`), so bad input never leaves a half-written output behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import projection
from .config import Config, apply_overrides, config_to_dict
from .data import load_corpus, resolve_bos, test_stream
from .engine import Engine
from .engine.tasks import baseline_mask, criterion_scores, flap_compensation, input_stats, warm_start_candidates
from .errors import UserError
from .mask_space import MaskSpace
from .perplexity import protocol
from .policy import Policy, random_probs, scores_to_probs, uniform_probs
from .run_folder import RunFolder, masks_record
from .runlock import holds_output_lock
from .session import Session, build_space, measure, prepare

__all__ = [
    "Session",
    "build_space",
    "prepare",
    "measure",
    "prune",
    "run_baseline",
    "evaluate_folder",
    "initial_probs",
    "final_mask",
    "build_policy",
    "fingerprint",
    "warm_start",
    "choose",
    "finish",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ search steps
def initial_probs(s: Session) -> np.ndarray:
    """Keep probabilities of ``search.init`` (``best`` starts from the Wanda-sp ones), projected onto the budget."""
    sc = s.cfg.search
    keep = 1.0 - sc.sparsity
    if sc.init in ("wanda-sp", "best"):
        probs = scores_to_probs(s.space, s.engine.run(criterion_scores, "wanda-sp", s.space, s.stats, None), keep)
    elif sc.init == "uniform":
        probs = uniform_probs(s.space, keep)
    else:
        probs = random_probs(s.space, keep, torch.Generator().manual_seed(s.cfg.seed))
    return projection.project(
        s.space, torch.as_tensor(probs, dtype=torch.float64), sc.sparsity, sc.budget, fill=True
    ).numpy()  # on the budget: with layer units ρ everywhere keeps only ≈ ρ²


def final_mask(
    cfg: Config, space: MaskSpace, probs: np.ndarray | torch.Tensor, mask: np.ndarray | None = None
) -> np.ndarray:
    """The deterministic mask under ``cfg``: with ``mask.shape=uniform`` the same count of top units in every layer
    (a stock-shaped model), else ``mask`` or the budget's top units by ``probs``, kept MLP widths rounded to
    ``mask.align``."""
    sc = cfg.search
    if cfg.mask.shape == "uniform":
        return projection.uniform_final_mask(space, probs, sc.sparsity)
    if mask is None:
        mask = projection.final_mask(space, probs, sc.sparsity, sc.budget)
    if cfg.mask.align > 1:
        from .widths import align_mask

        mask = align_mask(space, mask, probs, cfg.mask.align, sc.sparsity, sc.budget)
    return mask


@dataclass
class Start:
    """Where the search starts: a name, its mask and keep probabilities, and (``init=best``) how it was chosen."""

    name: str
    mask: np.ndarray
    probs: np.ndarray
    warm: Any = None  # probprune.warmstart.WarmStart


def warm_start(s: Session, check: torch.Tensor | None) -> Start:
    """``search.init``'s probabilities, or with ``best`` the forward-only baseline (or the init) with the lowest
    check-set loss (:mod:`probprune.warmstart`)."""
    sc = s.cfg.search
    probs = initial_probs(s)
    mask = final_mask(s.cfg, s.space, probs)
    if sc.init != "best":
        return Start(sc.init, mask, probs)
    from .warmstart import choose_start

    with s.timed("warm_start"):
        candidates = s.engine.run(
            warm_start_candidates, s.space, s.init_blocks(), s.stats, sc.sparsity, sc.budget, mask
        )
        warm = choose_start(s.engine, candidates, check, sc.batch_size, s.space, sc.init_mix, sc.sparsity, sc.budget)
    return Start(f"best: {warm.name}", warm.mask, warm.probs, warm)


def build_policy(cfg: Config, space: MaskSpace, init_probs: np.ndarray, engine: Engine, stats: dict | None):
    """The search policy of ``cfg.search`` (unit :class:`Policy` or :class:`AllocationPolicy`), from ``init_probs``.
    The allocation policy ranks units inside each group by Wanda-sp (computed by ``engine`` from ``stats``, which
    it requires: :func:`prepare` collects them)."""
    sc = cfg.search
    common = dict(
        lr=sc.lr,
        total_steps=sc.steps,
        sparsity=sc.sparsity,
        lr_schedule=sc.lr_schedule,
        baseline=sc.baseline,
        ema_window=sc.ema_window,
        score_scaling=sc.score_scaling,
        budget=sc.budget,
        seed=cfg.seed,
    )
    if sc.method == "allocation":
        from .allocation import AllocationPolicy

        scores = engine.run(criterion_scores, "wanda-sp", space, stats, None)
        return AllocationPolicy(space, scores, probs=init_probs, **common)
    return Policy(space, init_probs, sampling=sc.sampling, **common)


def fingerprint(cfg: Config, space: MaskSpace) -> str:
    """Identifies a search: its config without evaluation and engine settings (a search may resume on another
    engine), and its mask space."""
    d = config_to_dict(cfg)
    d.pop("eval", None)
    d.pop("engine", None)
    d["num_units"] = space.num_units
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose(s: Session, policy, result, start: Start, check: torch.Tensor | None):
    """The final mask and its reconstruction (or None): the search's mask (re-derived under
    ``mask.shape``/``mask.align``) or its start, whichever has the lower check-set loss; with ``reconstruct.enabled``
    (and ``reconstruct.choose``) each is compared as it is and reconstructed, so reconstruction is kept only where
    it helps there. Returns ``(mask, reconstruction, unit probabilities, check record)``."""
    cfg = s.cfg
    probs = policy.unit_probs() if cfg.search.method == "allocation" else policy.probs  # [N] either way
    final = final_mask(cfg, s.space, probs, mask=result.final_mask)
    rec = record = None
    if check is not None:
        with s.timed("check"):
            if cfg.reconstruct.enabled and cfg.reconstruct.choose:
                from .reconstruct import choose_final

                final, rec, record = choose_final(s, final, start.mask, check)
            else:
                from .warmstart import choose_final

                final, record = choose_final(s.engine, final, start.mask, check, cfg.search.batch_size)
        record = {"blocks": int(check.shape[0]), "tokens": int(check.numel()), **record}
    if cfg.reconstruct.enabled and not (check is not None and cfg.reconstruct.choose):  # not decided above
        rec = reconstruct(s, final)
    return final, rec, probs, record


def reconstruct(s: Session, mask: np.ndarray):
    """The reconstruction of ``mask`` under ``s.cfg.reconstruct`` (:mod:`probprune.reconstruct`), timed."""
    from .reconstruct import for_session

    with s.timed("reconstruct"):
        return for_session(s, mask)


# --------------------------------------------------------------------------------------------------- the jobs
@holds_output_lock("output")
def prune(
    cfg: Config,
    output: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    dense_ppl: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``probprune prune``: search a mask, compact, save, evaluate; return the summary (also ``summary.json``).

    ``dense_ppl`` (from an earlier run on the same model, data and eval settings) skips the dense evaluation;
    ``stop_after`` stops the search after that many steps (an interruption, for tests and sweeps' schedulers).
    """
    from .search import run_search

    t_start = time.perf_counter()
    run = RunFolder(output, resume)
    s = prepare(cfg, progress=progress)
    sc = cfg.search
    with _closing(s):
        run.check_fingerprint(fingerprint(cfg, s.space))
        search_data, check = s.calib.hold_out(sc.check_blocks) if sc.check_blocks else (s.calib, None)
        run.open(cfg)
        with s.timed("eval_dense"):
            dense_ppl = dense_ppl or measure(s, None, "dense")
        start = warm_start(s, check)
        with s.timed("eval_init"):
            init_ppl = measure(s, start.mask, f"init-only ({start.name})")
        policy = build_policy(cfg, s.space, start.probs, s.engine, s.stats)
        if hasattr(s.engine, "estimate") and sc.steps > 20:  # a cluster run: say what it will cost before it starts
            log.info(
                "%s",
                s.engine.estimate(search_data.batch(0, sc.batch_size), steps=sc.steps, num_samples=sc.masks_per_step),
            )
        result = run_search(
            policy,
            s.engine,
            search_data,
            steps=sc.steps,
            num_samples=sc.masks_per_step,
            batch_size=sc.batch_size,
            checkpoint_dir=run.path,
            checkpoint_every=sc.checkpoint_every,
            log_every=sc.log_every,
            resume=run.resuming,
            fingerprint=fingerprint(cfg, s.space),
            progress=progress,
            on_step=on_step,
            stop_after=stop_after,
        )
        s.timings["search"] = result.wall_seconds
        if stop_after is not None and policy.step_count < sc.steps:
            return {"interrupted_at_step": policy.step_count}
        final, rec, probs, check_record = choose(s, policy, result, start, check)
        summary = finish(s, run, final, t_start, dense_ppl, probs=probs, start=start, init_ppl=init_ppl, rec=rec)
    if start.warm is not None:
        summary["warm_start"] = {"chosen": start.warm.name, "mix": sc.init_mix, "check_losses": start.warm.check_losses}
    if check_record is not None:
        summary["check"] = check_record
    losses = [h["loss_mean"] for h in result.history if np.isfinite(h["loss_mean"])]
    summary["search"] = {
        "steps": sc.steps,
        "num_samples": sc.masks_per_step,
        "batch_size": sc.batch_size,
        "lr": sc.lr,
        "baseline": sc.baseline,
        "budget": sc.budget,
        "method": sc.method,
        "objective": sc.objective,
        "forwards": policy.step_count * sc.masks_per_step,
        "dropped_samples": result.dropped_samples,
        "resumed_from_step": result.resumed_from_step,
        "first_loss": float(np.mean(losses[:10])) if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "engine": cfg.engine.kind,
        "scoring": getattr(s.engine, "scoring_record", None),  # which scoring path, and its timings when measured
    }
    summary["calibration"]["tokens_scored"] = policy.step_count * sc.masks_per_step * sc.batch_size * cfg.data.block_len
    if cfg.heal.tokens:  # optional last step: distil the saved pruned model toward the dense one (uses gradients)
        from .heal import heal_run

        del s, policy, result  # the dense model in this process: heal loads the teacher it needs itself
        summary["heal"] = heal_run(cfg, run.path, dense_ppl, progress)
    run.write_summary(summary, cfg)
    return summary


@holds_output_lock("output")
def run_baseline(
    cfg: Config, method: str, output: str | Path, progress: bool = True, dense_ppl: dict[str, float] | None = None
) -> dict[str, Any]:
    """``probprune baseline``: a built-in baseline's mask through the same compaction, saving and evaluation."""
    from .baselines import BASELINES, USES_GRADIENTS

    if method not in BASELINES:
        raise UserError(f"--method must be one of {', '.join(BASELINES)}, got '{method}'")
    t_start = time.perf_counter()
    run = RunFolder(output)
    if method in ("shortgpt", "sleb") and not cfg.mask.layers:  # they remove whole layers
        cfg = apply_overrides(cfg, ["mask.layers=true", "search.budget=params"])
    # metric-ordered channel blocks are formed from the Wanda-sp statistics, exactly as for the search
    s = prepare(cfg, need_stats=cfg.mask.block_order == "metric", progress=progress)
    with _closing(s):
        run.open(cfg)
        with s.timed("eval_dense"):
            dense_ppl = dense_ppl or measure(s, None, "dense")
        with s.timed("baseline"):
            blocks, stats = s.init_blocks(), s.stats
            if method == "flap" and stats is None:
                stats = s.engine.run(input_stats, blocks)
            mask = s.engine.run(
                baseline_mask, method, s.space, blocks, cfg.search.sparsity, cfg.seed, cfg.search.budget, stats
            )
        rec, label = None, method + (" (uses gradients)" if method in USES_GRADIENTS else "")
        if cfg.reconstruct.enabled:  # replaces FLAP's compensation (both would count the removed columns twice)
            rec, label = reconstruct(s, mask), label + " + reconstruction"
        elif method == "flap":  # FLAP adds the removed columns' mean contribution to the output biases
            from .reconstruct import Reconstruction

            rec = Reconstruction(biases=s.engine.run(flap_compensation, s.space, mask, stats))
        summary = finish(s, run, mask, t_start, dense_ppl, label=label, rec=rec)
    summary["method"] = method
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    run.write_summary(summary, cfg)
    return summary


def evaluate_folder(cfg: Config, tasks: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """``probprune eval``: held-out perplexity of any model (and lm-eval tasks when asked), in this process."""
    from .compaction import count_params
    from .models.loading import load_model
    from .models.registry import get_adapter
    from .perplexity import evaluate_ppl

    m = cfg.model
    model, tok = load_model(m.name_or_path, m.dtype, m.device, m.device_map, m.trust_remote_code)
    bos_id = resolve_bos(cfg.data.bos, tok, get_adapter(model).wants_bos)
    tokens = test_stream(tok, load_corpus(cfg.data, seed=cfg.data.split_seed))
    e = cfg.eval
    ppl = evaluate_ppl(model, tokens, e.seq_lens, max_tokens=e.max_tokens, batch_size=e.batch_size, bos_id=bos_id)
    out: dict[str, Any] = {
        "model": m.name_or_path,
        "params": count_params(model),
        "data": cfg.data.source,
        "ppl": {str(k): float(v) for k, v in ppl.items()},
        "max_tokens": e.max_tokens,
        "protocol": protocol(bos_id),
    }
    if tasks:
        from .lm_eval_hook import run_lm_eval

        out["lm_eval"] = run_lm_eval(model, tok, tasks.split(","), limit=limit)
    return out


# ------------------------------------------------------------------------------------------------ the last steps
@contextmanager
def _closing(s: Session) -> Iterator[Session]:
    try:
        yield s
    finally:
        s.engine.close()


def finish(
    s: Session,
    run: RunFolder,
    final: np.ndarray,
    t_start: float,
    dense_ppl: dict[str, float],
    probs: Any = None,
    start: Start | None = None,
    init_ppl: dict[str, float] | None = None,
    label: str = "probprune search",
    rec: Any = None,
) -> dict[str, Any]:
    """Compact and save the final mask (with ``rec``'s re-fitted weights), evaluate it, write ``masks.pt``; return
    the summary (written by the caller once complete)."""
    from .compaction import count_params

    cfg, space = s.cfg, s.space
    with s.timed("save"):
        pruned_total = s.engine.save_pruned(final, run.model_dir, s.tokenizer, rec)
    with s.timed("eval_pruned"):
        pruned_ppl = measure(s, final, label, rec)
    run.write_masks(masks_record(space, final, probs, *((start.mask, start.probs) if start else ())))
    dense_total = count_params(s.model)
    summary: dict[str, Any] = {
        "model": cfg.model.name_or_path,
        "dtype": cfg.model.dtype,
        "data": cfg.data.source,
        "seed": cfg.seed,
        "method_label": label,
        "dense_ppl": dense_ppl,
    }
    if start is not None:
        init = _mask_record(space, start.mask, dense_total)
        summary.update(
            init=start.name, init_ppl=init_ppl, init_sparsity=init["sparsity"], init_total=init["pruned_total"]
        )
    kept = _mask_record(space, final, dense_total)
    summary.update(
        {
            "pruned_ppl": pruned_ppl,
            "sparsity": kept["sparsity"],
            "params": {
                "dense_total": dense_total,
                "pruned_total": pruned_total,
                "dense_prunable": space.prunable_params,
                "pruned_prunable": kept["kept_prunable"],
            },
            "units": {
                **space.type_counts(),
                "kept": {
                    k: int(final[space.type_slice(t)].sum()) for k, t in (("head", 0), ("channel", 1), ("layer", 2))
                },
            },
            "calibration": {"blocks": len(s.calib), "block_len": cfg.data.block_len, "bos_id": s.bos_id},
            "eval": {
                "seq_lens": list(dense_ppl),
                "max_tokens": cfg.eval.max_tokens,
                "held_out_tokens": int(s.test_tokens.numel()),
                "protocol": protocol(s.bos_id),
            },
            "timings": {k: round(v, 2) for k, v in s.timings.items()},
            "wall_seconds": round(time.perf_counter() - t_start, 2),
        }
    )
    if rec is not None and cfg.reconstruct.enabled:
        from .reconstruct import summary_record

        summary["reconstruct"] = summary_record(s, rec)
    return summary


def _mask_record(space: MaskSpace, mask: np.ndarray, dense_total: int) -> dict[str, Any]:
    kept = space.kept_params(mask)
    return {
        "sparsity": {k: round(v, 6) for k, v in space.sparsity(mask).items()},
        "kept_prunable": kept,
        "pruned_total": dense_total - (space.prunable_params - kept),
    }
