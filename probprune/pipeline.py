"""The jobs, as recipes of named steps.

``probprune prune``:  prepare -> warm start -> search -> choose -> compact and save -> evaluate -> summary.
``probprune baseline``: prepare -> baseline mask -> compact and save -> evaluate -> summary.

Every step takes what it needs and returns what it made. Where the weights live (this process, or Ray actors with a
driver that holds only the model's shapes) is the engine's business (:mod:`probprune.engine`): no step asks. Every
user-facing check (config, output folder, model path, architecture, data, context length) runs before the output
folder is created (:mod:`probprune.run_folder`), so bad input never leaves a half-written output behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, apply_overrides
from .data import load_corpus, resolve_bos, test_stream
from .engine.tasks import baseline_mask, flap_compensation, input_stats
from .errors import UserError
from .perplexity import protocol
from .run_folder import RunFolder
from .runlock import holds_output_lock
from .session import Session, build_space, measure, prepare
from .steps import build_policy, choose, final_mask, fingerprint, finish, initial_probs, reconstruct, warm_start

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
    run = RunFolder(output, resume, cfg=cfg)
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
            init_ppl = measure(s, start.mask, f"init-only ({start.name})", start.rec)
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
        c = choose(s, policy, result, start, check)
        summary = finish(
            s,
            run,
            c.mask,
            t_start,
            dense_ppl,
            probs=c.probs,
            start=start,
            init_ppl=init_ppl,
            rec=c.rec,
            label="probprune search" + (" + reconstruction" if c.reconstructed else ""),
            reconstructed=c.reconstructed,
            plain=c.plain,
        )
    if start.warm is not None:
        summary["warm_start"] = {"chosen": start.warm.name, "mix": sc.init_mix, "check_losses": start.warm.check_losses}
    if c.record is not None:
        summary["check"] = c.record
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
        own, label = None, method + (" (uses gradients)" if method in USES_GRADIENTS else "")
        if method == "flap":  # FLAP adds the removed columns' mean contribution to the output biases
            from .reconstruct import Reconstruction

            own = Reconstruction(biases=s.engine.run(flap_compensation, s.space, mask, stats))
        rec = check_record = None
        if cfg.reconstruct.enabled:  # replaces FLAP's compensation (both would count the removed columns twice)
            rec = reconstruct(s, mask, own)  # FLAP: a sublayer it empties keeps its bias (nothing to re-fit)
            if rec.changes_nothing and own is None:  # e.g. layers removed, not folded in: the model as it is
                log.info("reconstruction: nothing to re-fit (no thinned sublayer, no removed layer folded in)")
                rec = None
            elif cfg.reconstruct.choose and cfg.search.check_blocks:  # kept only where it lowers the check-set loss
                check_record = check_reconstruction(s, mask, own, rec)
        refit = rec is not None and (check_record is None or check_record["reconstructed"])
        summary = finish(
            s,
            run,
            mask,
            t_start,
            dense_ppl,
            label=label + (" + reconstruction" if refit else ""),
            rec=rec if refit else own,
            reconstructed=refit,
            plain=(mask, own) if cfg.reconstruct.enabled else None,
        )
        if check_record is not None:
            summary["check"] = check_record
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


# ------------------------------------------------------------------------------------------------ helpers
def check_reconstruction(s: Session, mask: np.ndarray, own: Any, rec: Any) -> dict[str, Any]:
    """A baseline's model as it is (with its own weight changes ``own``, e.g. FLAP's biases) and reconstructed
    (``rec``), scored on the check set (the last ``search.check_blocks`` calibration blocks, which reconstruction
    never sees); the reconstruction is kept only if it lowers the loss there (ties: kept)."""
    from .reconstruct import reconstructed_loss

    _, check = s.calib.hold_out(s.cfg.search.check_blocks)
    bs = s.cfg.search.batch_size
    with s.timed("check"):
        plain = reconstructed_loss(s.engine, s.space, mask, own, check, bs)
        fitted = reconstructed_loss(s.engine, s.space, mask, rec, check, bs)
    log.info("check set: as it is %.4f, reconstructed %.4f", plain, fitted)
    return {
        "blocks": int(check.shape[0]),
        "tokens": int(check.numel()),
        "loss": float(plain),
        "loss_reconstructed": float(fitted),
        "reconstructed": bool(fitted <= plain),
    }


@contextmanager
def _closing(s: Session) -> Iterator[Session]:
    try:
        yield s
    finally:
        s.engine.close()
