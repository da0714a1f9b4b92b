"""End-to-end jobs: prune (init -> search -> compact -> save -> evaluate), baselines, evaluation of a folder.

Every user-facing check (config, model path, architecture, data, context length) runs before the output folder is
created, so bad input never leaves a half-written output behind. Files are written atomically.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import projection
from .compaction import compact, compact_checkpoint, count_params, save_pruned
from .config import Config, config_to_dict, save_config
from .data import CalibrationData, load_corpus, test_stream
from .errors import UserError
from .evaluation import evaluate_ppl
from .masks import MaskSpace
from .models.adapter import get_adapter
from .models.base import FamilyAdapter
from .models.loading import load_model, load_skeleton, model_folder
from .policy import Policy, random_probs, scores_to_probs, uniform_probs
from .replica_tasks import (
    LocalReplicas,
    channel_ranking,
    criterion_scores,
    input_stats,
    merge_stats,
    row_shares,
    warm_start_candidates,
    window_nll,
)

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything a job needs, loaded and checked."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any
    adapter: FamilyAdapter
    calib: CalibrationData
    test_tokens: torch.Tensor
    space: MaskSpace
    stats: dict | None  # activation statistics from the init blocks (None if not needed)
    progress: bool = True  # progress bars on long loops
    # where work that reads the weights runs: this process (LocalReplicas) or, with engine.kind=ray, the actors (the
    # RayEvaluator, then also ``evaluator``); with Ray ``model`` is a weightless skeleton on the meta device
    replicas: Any = None
    evaluator: Any = None

    @property
    def driverless(self) -> bool:
        return self.evaluator is not None


def _max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def prepare(cfg: Config, need_stats: bool = True, remote: bool = False) -> Session:
    """Load model, data and mask space; every bad input raises :class:`UserError` here.

    With ``remote`` (``probprune prune`` with ``engine.kind: ray``) the driver loads no weights: it builds the model
    on the ``meta`` device (shapes only), starts the actors (each loads its replica), and has them collect the
    calibration statistics, one share of the blocks each; everything else that reads weights also runs on them
    (:mod:`probprune.replica_tasks`).
    """
    t0 = time.perf_counter()
    driverless = remote and cfg.engine.kind == "ray"
    if driverless:
        model, tok = load_skeleton(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code)
    else:
        model, tok = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.device, cfg.model.device_map,
                                cfg.model.trust_remote_code)
    adapter = get_adapter(model)
    corpus = load_corpus(cfg.data, seed=cfg.data.split_seed)
    calib = CalibrationData.from_corpus(
        tok, corpus, cfg.data.block_len, cfg.data.calib_blocks, seed=cfg.seed, max_context=_max_context(model)
    )
    test_tokens = test_stream(tok, corpus)
    replicas, evaluator = LocalReplicas(model, adapter), None
    if driverless:
        from .evaluators import build_evaluator

        evaluator = replicas = build_evaluator(cfg, model, build_space(cfg, adapter, None))  # final space below
    try:
        space, stats = _space_and_stats(cfg, adapter, calib, replicas, need_stats, driverless)
    except BaseException:
        if evaluator is not None:
            evaluator.close()
        raise
    if evaluator is not None:
        evaluator.set_space(space)
    log.info("prepared model, data and mask space in %.1f s", time.perf_counter() - t0)
    return Session(cfg, model, tok, adapter, calib, test_tokens, space, stats, replicas=replicas, evaluator=evaluator)


def _space_and_stats(cfg: Config, adapter: FamilyAdapter, calib: CalibrationData, replicas, need_stats: bool,
                     driverless: bool) -> tuple[MaskSpace, dict | None]:
    stats = None
    wants_stats = cfg.search.init in ("wanda-sp", "best") or cfg.mask.block_order == "metric"
    if need_stats and (wants_stats or (driverless and cfg.search.method == "allocation")):
        blocks = calib.first(min(cfg.search.init_blocks, len(calib)))
        shares = [(blocks[lo:hi],) for lo, hi in row_shares(blocks.shape[0], replicas.num_replicas)]
        stats = merge_stats(replicas.map(input_stats, shares))
    return build_space(cfg, adapter, stats, replicas), stats


def build_space(cfg: Config, adapter: FamilyAdapter, stats: dict | None, replicas=None) -> MaskSpace:
    """The mask space of ``cfg.mask``; metric-ordered channel blocks are formed from ``stats`` (Wanda-sp ranking,
    computed where the weights are: ``replicas``, or ``adapter``'s model)."""
    perm = None
    if cfg.mask.block_order == "metric" and cfg.mask.channel_block > 1 and stats is not None:
        replicas = replicas or LocalReplicas(adapter.model, adapter)
        perm = replicas.run(channel_ranking, stats)
    try:
        return adapter.mask_space(
            heads=cfg.mask.heads, channels=cfg.mask.channels, layers=cfg.mask.layers,
            channel_block=cfg.mask.channel_block, channel_perm=perm, query_heads=cfg.mask.head_unit == "query",
        )
    except ValueError as e:
        raise UserError(f"mask.head_unit={cfg.mask.head_unit!r}: {e}") from None


def build_policy(cfg: Config, space: MaskSpace, init_probs: np.ndarray, adapter: FamilyAdapter,
                 stats: dict | None, calib: CalibrationData, replicas=None):
    """The search policy of ``cfg.search`` (unit :class:`Policy` or :class:`AllocationPolicy`), from ``init_probs``.

    The allocation policy ranks units inside each group by Wanda-sp (computed on ``replicas``, or ``adapter``'s
    model); ``stats`` are collected from ``calib`` if None.
    """
    sc = cfg.search
    if sc.method == "allocation":
        from .allocation import AllocationPolicy

        replicas = replicas or LocalReplicas(adapter.model, adapter)
        if stats is None:
            stats = replicas.run(input_stats, calib.first(min(sc.init_blocks, len(calib))))
        return AllocationPolicy(
            space, replicas.run(criterion_scores, "wanda-sp", space, stats, None), probs=init_probs, lr=sc.lr,
            total_steps=sc.steps, sparsity=sc.sparsity, lr_schedule=sc.lr_schedule, baseline=sc.baseline, ema_window=sc.ema_window,
            score_scaling=sc.score_scaling, budget=sc.budget, seed=cfg.seed,
        )
    return Policy(
        space, init_probs, lr=sc.lr, total_steps=sc.steps, sparsity=sc.sparsity, lr_schedule=sc.lr_schedule,
        baseline=sc.baseline, ema_window=sc.ema_window, score_scaling=sc.score_scaling, sampling=sc.sampling,
        budget=sc.budget, seed=cfg.seed,
    )


def initial_probs(s: Session) -> np.ndarray:
    """Keep probabilities of ``search.init`` (``best`` starts from the Wanda-sp ones), projected onto the budget."""
    cfg = s.cfg.search
    keep = 1.0 - cfg.sparsity
    if cfg.init in ("wanda-sp", "best"):
        probs = scores_to_probs(s.space, s.replicas.run(criterion_scores, "wanda-sp", s.space, s.stats, None), keep)
    elif cfg.init == "uniform":
        probs = uniform_probs(s.space, keep)
    else:
        probs = random_probs(s.space, keep, torch.Generator().manual_seed(s.cfg.seed))
    return projection.project(s.space, torch.as_tensor(probs, dtype=torch.float64), cfg.sparsity, cfg.budget,
                              fill=True).numpy()  # on the budget: with layer units ρ everywhere keeps only ≈ ρ²


def final_mask(cfg: Config, space: MaskSpace, probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """The deterministic mask of unit probabilities under ``cfg``: the budget's top units, or, with
    ``mask.shape=uniform``, the same count of top units in every layer (a stock-shaped model)."""
    if cfg.mask.shape == "uniform":
        return projection.uniform_final_mask(space, probs, cfg.search.sparsity)
    return projection.final_mask(space, probs, cfg.search.sparsity, cfg.search.budget)


def fingerprint(cfg: Config, space: MaskSpace) -> str:
    d = config_to_dict(cfg)
    d.pop("eval", None)
    d.pop("engine", None)  # the same search may resume on another engine
    d["num_units"] = space.num_units
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate(model, s: Session, label: str) -> dict[str, float]:
    e = s.cfg.eval
    res = evaluate_ppl(model, s.test_tokens, e.seq_lens, max_tokens=e.max_tokens, batch_size=e.batch_size,
                       progress=s.progress)
    log.info("%s perplexity: %s", label, res)
    return {str(k): float(v) for k, v in res.items()}


def evaluate_mask(s: Session, mask: np.ndarray | None, label: str) -> dict[str, float]:
    """Held-out perplexity of the model under ``mask`` (None: dense), by the protocol of
    :func:`probprune.evaluation.perplexity`: locally the compacted model is evaluated; with a driver that holds no
    model the actors evaluate the masked model on the fast path, the windows split among them."""
    if not s.driverless:
        if mask is None:
            return evaluate(s.model, s, label)
        model = compact(s.model, s.space, mask)
        try:
            return evaluate(model, s, label)
        finally:
            del model
            gc.collect()
    e, out = s.cfg.eval, {}
    limit = _max_context(s.model)
    for seq_len in e.seq_lens:
        eff = min(int(seq_len), limit) if limit else int(seq_len)
        if str(eff) in out:
            continue
        n = s.test_tokens.numel() // eff
        if e.max_tokens is not None:
            n = min(n, int(e.max_tokens) // eff)
        if n == 0:
            raise UserError(f"no full window of seq_len={eff} fits in the held-out split "
                            f"({s.test_tokens.numel()} tokens, eval.max_tokens={e.max_tokens})")
        windows = s.test_tokens.reshape(-1)[: n * eff].view(n, eff)  # [W, T]
        shares = [(s.space, mask, windows[lo:hi], e.batch_size) for lo, hi in row_shares(n, s.replicas.num_replicas)]
        parts = s.replicas.map(window_nll, shares)
        out[str(eff)] = math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))
    log.info("%s perplexity (on the actors): %s", label, out)
    return out


def _check_output(output: Path, resume: bool) -> bool:
    """Refuse an output folder that a run must not write into; return whether a search checkpoint will be resumed.

    Without ``--resume`` the folder must be missing or empty. With ``--resume`` it must hold a search checkpoint (a
    folder without one was not written by a search: nothing in it is touched); a missing or empty folder starts a
    new search, and says so.
    """
    from .search import CHECKPOINT_NAME

    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    has_files = output.exists() and any(output.iterdir())
    if not resume:
        if has_files and (output / "summary.json").exists():
            raise UserError(f"--output {output} already holds a finished run (summary.json); choose another folder")
        if has_files:
            raise UserError(f"--output {output} is not empty; pass --resume to continue a search there, or choose "
                            "another folder")
        return False
    if (output / CHECKPOINT_NAME).exists():
        return True
    if has_files:
        raise UserError(f"--resume: {output} holds no search checkpoint ({CHECKPOINT_NAME}), so there is nothing to "
                        "resume and probprune will not write into a folder it did not create; choose an empty or new "
                        "--output (without --resume)")
    log.warning("--resume: %s holds no search checkpoint: nothing to resume, starting a new search", output)
    return False


def _check_resume_fingerprint(output: Path, cfg: Config, space: MaskSpace) -> None:
    """Refuse to resume a checkpoint written for other settings, before anything is computed or written."""
    from .search import CHECKPOINT_NAME, checkpoint_fingerprint

    saved = checkpoint_fingerprint(output / CHECKPOINT_NAME)
    if saved is not None and saved != fingerprint(cfg, space):
        raise UserError(
            f"--resume: the checkpoint in {output} belongs to a different search (model, data, mask space or search "
            "settings differ from this command's); run it with the settings in its config.yaml, or choose another "
            "--output and drop --resume"
        )


def _write_json(path: Path, obj: Any) -> None:
    from .files import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _mask_record(space: MaskSpace, mask: np.ndarray, dense_total: int) -> dict[str, Any]:
    sp = space.sparsity(mask)
    kept = space.kept_params(mask)
    return {"sparsity": sp, "kept_prunable": kept,
            "pruned_total": dense_total - (space.prunable_params - kept)}


def _open_output(s: Session, output: Path, dense_ppl: dict[str, float] | None):
    """Create the output folder (only once everything is loaded and checked), save the config, measure the dense
    model. Leftovers of an interrupted model save in the folder are cleaned up first."""
    from .files import dir_mode, recover_dir

    dense_total = count_params(s.model)
    output.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    for line in recover_dir(output / "model"):
        log.warning("%s: %s", output, line)
    save_config(s.cfg, output / "config.yaml")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    dense_ppl = dense_ppl or evaluate_mask(s, None, "dense")
    timings["eval_dense"] = time.perf_counter() - t
    return dense_total, dense_ppl, timings


def prune(cfg: Config, output: str | Path, resume: bool = False, progress: bool = True,
          on_step=None, stop_after: int | None = None, dense_ppl: dict[str, float] | None = None) -> dict[str, Any]:
    """Run the whole job of ``probprune prune`` and return the summary (also written to ``output/summary.json``).

    Writes ``output/model/`` (compacted model + tokenizer), ``masks.pt``, ``metrics.jsonl``, ``config.yaml`` and
    ``summary.json`` (last, so its presence means the run finished). ``dense_ppl`` (from an earlier run on the same
    model, data and eval settings) skips the dense evaluation.
    """
    from .evaluators import build_evaluator
    from .search import run_search

    t_start = time.perf_counter()
    output = Path(output)
    resuming = _check_output(output, resume)
    s = prepare(cfg, need_stats=True, remote=True)  # engine.kind=ray: the actors start here, the driver loads no model
    s.progress = progress
    space, sc = s.space, cfg.search
    try:
        if resuming:
            _check_resume_fingerprint(output, cfg, space)
        search_data, check = (s.calib.hold_out(sc.check_blocks) if sc.check_blocks else (s.calib, None))
    except BaseException:
        if s.evaluator is not None:
            s.evaluator.close()
        raise
    evaluator = s.evaluator or build_evaluator(cfg, s.model, space)  # every resource check happens before any write
    try:
        dense_total, dense_ppl, timings = _open_output(s, output, dense_ppl)
        init_probs = initial_probs(s)
        init_mask = final_mask(cfg, space, init_probs)
        if cfg.mask.align > 1:
            from .align import align_mask

            init_mask = align_mask(space, init_mask, init_probs, cfg.mask.align, sc.sparsity, sc.budget)
        init_name, warm = sc.init, None
        if sc.init == "best":
            from .warmstart import choose_start

            t = time.perf_counter()
            blocks = s.calib.first(min(sc.init_blocks, len(s.calib)))
            candidates = s.replicas.run(warm_start_candidates, space, blocks, s.stats, sc.sparsity, sc.budget,
                                        init_mask)
            warm = choose_start(evaluator, candidates, check, sc.batch_size, space, sc.init_mix, sc.sparsity,
                                sc.budget)
            init_probs, init_mask, init_name = warm.probs, warm.mask, f"best: {warm.name}"
            timings["warm_start"] = time.perf_counter() - t
        t = time.perf_counter()
        init_ppl = evaluate_mask(s, init_mask, f"init-only ({init_name})")
        timings["eval_init"] = time.perf_counter() - t

        policy = build_policy(cfg, space, init_probs, s.adapter, s.stats, s.calib, s.replicas)
        if hasattr(evaluator, "estimate") and sc.steps > 20:  # a cluster run: say what it will cost before it starts
            log.info("%s", evaluator.estimate(search_data.batch(0, sc.batch_size), steps=sc.steps,
                                              num_samples=sc.num_samples))
        result = run_search(
            policy, evaluator, search_data, steps=sc.steps, num_samples=sc.num_samples, batch_size=sc.batch_size,
            checkpoint_dir=output, checkpoint_every=sc.checkpoint_every, log_every=sc.log_every, resume=resuming,
            fingerprint=fingerprint(cfg, space), progress=progress, on_step=on_step, stop_after=stop_after,
        )
        timings["search"] = result.wall_seconds
        if stop_after is not None and policy.step_count < sc.steps:
            return {"interrupted_at_step": policy.step_count}

        unit_probs = policy.unit_probs() if sc.method == "allocation" else policy.probs  # [N] either way
        final = final_mask(cfg, space, unit_probs) if cfg.mask.shape == "uniform" else result.final_mask
        if cfg.mask.align > 1:
            from .align import align_mask

            final = align_mask(space, final, unit_probs, cfg.mask.align, sc.sparsity, sc.budget)
        check_record = None
        if check is not None:
            from .warmstart import choose_final

            t = time.perf_counter()
            final, check_record = choose_final(evaluator, final, init_mask, check, sc.batch_size)
            timings["check"] = time.perf_counter() - t
        if not s.driverless:  # the actors also evaluate and compact the final model: they stay until then
            evaluator.close()
        summary = finish(
            s, final, output, t_start, timings, dense_ppl, dense_total,
            probs=unit_probs, init=(init_name, init_mask, init_probs, init_ppl),
        )
    finally:
        evaluator.close()
    if warm is not None:
        summary["warm_start"] = {"chosen": warm.name, "mix": sc.init_mix, "check_losses": warm.check_losses}
    if check_record is not None:
        summary["check"] = {"blocks": int(check.shape[0]), "tokens": int(check.numel()), **check_record}
    losses = [h["loss_mean"] for h in result.history if np.isfinite(h["loss_mean"])]
    summary["search"] = {
        "steps": sc.steps, "num_samples": sc.num_samples, "batch_size": sc.batch_size, "lr": sc.lr,
        "baseline": sc.baseline, "budget": sc.budget, "method": sc.method, "objective": sc.objective,
        "forwards": policy.step_count * sc.num_samples,
        "dropped_samples": result.dropped_samples, "resumed_from_step": result.resumed_from_step,
        "first_loss": float(np.mean(losses[:10])) if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "engine": cfg.engine.kind,
    }
    summary["calibration"]["tokens_scored"] = policy.step_count * sc.num_samples * sc.batch_size * cfg.data.block_len
    if cfg.heal.tokens:  # optional last step: distil the saved pruned model toward the dense one (uses gradients)
        from .heal import heal_run

        summary["heal"] = heal_run(cfg, output, dense_ppl, progress)
    _write_json(output / "summary.json", summary)
    return summary


def finish(
    s: Session,
    final: np.ndarray,
    output: Path,
    t_start: float,
    timings: dict[str, float],
    dense_ppl: dict[str, float],
    dense_total: int,
    probs: torch.Tensor | None = None,
    init: tuple | None = None,
    method_label: str = "probprune search",
    adjust: Callable[[torch.nn.Module], Any] | None = None,
) -> dict[str, Any]:
    """Compact the final mask (then ``adjust`` the compacted model in place, if given), evaluate, save model + masks,
    and build the summary (not yet written)."""
    space, cfg = s.space, s.cfg
    t = time.perf_counter()
    pruned = compact(s.model, space, final)  # with a driver that holds no model: the meta skeleton (shapes only)
    if adjust is not None:
        adjust(pruned)
    timings["compact"] = time.perf_counter() - t
    t = time.perf_counter()
    pruned_ppl = evaluate_mask(s, final, method_label) if s.driverless else evaluate(pruned, s, method_label)
    timings["eval_pruned"] = time.perf_counter() - t
    t = time.perf_counter()
    if s.driverless:  # stream the weights from the checkpoint, one layer at a time
        compact_checkpoint(model_folder(cfg.model.name_or_path), space, final, output / "model", s.tokenizer)
    else:
        save_pruned(pruned, output / "model", s.tokenizer)
    timings["save"] = time.perf_counter() - t
    record = {
        "final_mask": torch.as_tensor(final),
        "unit_type": torch.as_tensor(space.unit_type), "unit_layer": torch.as_tensor(space.unit_layer),
        "unit_index": torch.as_tensor(space.unit_index), "cost": torch.as_tensor(space.cost),
        "channel_block": space.channel_block,
        "channel_perm": [torch.from_numpy(np.array(p)) for p in space.channel_perm],
    }
    if probs is not None:
        record["probs"] = torch.as_tensor(probs).clone()
    if init is not None:
        record["init_mask"], record["init_probs"] = (torch.from_numpy(np.array(x)) for x in init[1:3])  # copies
    tmp = output / ".masks.pt.tmp"
    torch.save(record, tmp)
    os.replace(tmp, output / "masks.pt")
    rec = _mask_record(space, final, dense_total)
    summary: dict[str, Any] = {
        "model": cfg.model.name_or_path,
        "dtype": cfg.model.dtype,
        "data": cfg.data.source,
        "seed": cfg.seed,
        "method_label": method_label,
        "dense_ppl": dense_ppl,
    }
    if init is not None:
        init_rec = _mask_record(space, init[1], dense_total)
        summary.update(init=init[0], init_ppl=init[3],
                       init_sparsity={k: round(v, 6) for k, v in init_rec["sparsity"].items()},
                       init_total=init_rec["pruned_total"])
    summary.update({
        "pruned_ppl": pruned_ppl,
        "sparsity": {k: round(v, 6) for k, v in rec["sparsity"].items()},
        "params": {
            "dense_total": dense_total,
            "pruned_total": count_params(pruned),
            "dense_prunable": space.prunable_params,
            "pruned_prunable": rec["kept_prunable"],
        },
        "units": {**space.type_counts(), "kept": {k: int(final[space.type_slice(t)].sum())
                                                  for k, t in (("head", 0), ("channel", 1), ("layer", 2))}},
        "calibration": {"blocks": len(s.calib), "block_len": cfg.data.block_len},
        "eval": {"seq_lens": list(dense_ppl), "max_tokens": cfg.eval.max_tokens,
                 "held_out_tokens": int(s.test_tokens.numel()), "protocol": "non-overlapping windows"},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    })
    return summary


def run_baseline(cfg: Config, method: str, output: str | Path, progress: bool = True,
                 dense_ppl: dict[str, float] | None = None) -> dict[str, Any]:
    """``probprune baseline``: a built-in baseline's mask through the same compaction, saving and evaluation."""
    from .baselines import BASELINES, USES_GRADIENTS, baseline_mask

    if method not in BASELINES:
        raise UserError(f"--method must be one of {', '.join(BASELINES)}, got '{method}'")
    t_start = time.perf_counter()
    output = Path(output)
    _check_output(output, resume=False)
    if method == "shortgpt" and not cfg.mask.layers:
        from .config import apply_overrides

        cfg = apply_overrides(cfg, ["mask.layers=true", "search.budget=params"])
    # metric-ordered channel blocks are formed from the Wanda-sp statistics, exactly as for the search
    s = prepare(cfg, need_stats=cfg.mask.block_order == "metric")
    s.progress = progress
    dense_total, dense_ppl, timings = _open_output(s, output, dense_ppl)
    t = time.perf_counter()
    blocks = s.calib.first(min(cfg.search.init_blocks, len(s.calib)))
    stats = s.stats
    if method == "flap" and stats is None:
        from .scoring import collect_input_stats

        stats = collect_input_stats(s.adapter, blocks)
    mask = baseline_mask(method, s.adapter, s.space, blocks, cfg.search.sparsity, seed=cfg.seed,
                         budget=cfg.search.budget, stats=stats)
    adjust = None
    if method == "flap":  # FLAP adds the removed columns' mean contribution to the output biases
        from .baselines import apply_bias_compensation, flap_bias_compensation

        comp = flap_bias_compensation(s.adapter, s.space, mask, stats)
        adjust = lambda pruned: apply_bias_compensation(pruned, get_adapter(pruned), comp)  # noqa: E731
    timings["baseline"] = time.perf_counter() - t
    label = f"{method}" + (" (uses gradients)" if method in USES_GRADIENTS else "")
    summary = finish(s, mask, output, t_start, timings, dense_ppl, dense_total, method_label=label, adjust=adjust)
    summary["method"] = method
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    _write_json(output / "summary.json", summary)
    return summary


def evaluate_folder(cfg: Config, tasks: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """``probprune eval``: held-out perplexity of any model (and lm-eval tasks when asked)."""
    model, tok = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.device, cfg.model.device_map,
                            cfg.model.trust_remote_code)
    corpus = load_corpus(cfg.data, seed=cfg.data.split_seed)
    tokens = test_stream(tok, corpus)
    e = cfg.eval
    ppl = evaluate_ppl(model, tokens, e.seq_lens, max_tokens=e.max_tokens, batch_size=e.batch_size)
    out: dict[str, Any] = {
        "model": cfg.model.name_or_path, "params": count_params(model), "data": cfg.data.source,
        "ppl": {str(k): float(v) for k, v in ppl.items()}, "max_tokens": e.max_tokens,
    }
    if tasks:
        from .lm_eval_hook import run_lm_eval

        out["lm_eval"] = run_lm_eval(model, tok, tasks.split(","), limit=limit)
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The results table ``probprune prune`` prints."""
    lens = list(summary["dense_ppl"])
    head = "| model | params | prunable sparsity | total sparsity | " + " | ".join(f"PPL@{n}" for n in lens) + " |"
    sep = "|" + "---|" * (4 + len(lens))
    p = summary["params"]

    def row(name, ppl, params, sp):
        cells = [name, f"{params / 1e6:.1f}M", f"{sp['prunable']:.1%}", f"{sp['total']:.1%}"]
        cells += [f"{ppl[n]:.2f}" for n in lens]
        return "| " + " | ".join(cells) + " |"

    rows = [head, sep, row("dense", summary["dense_ppl"], p["dense_total"], {"prunable": 0.0, "total": 0.0})]
    if summary.get("init_ppl"):
        rows.append(row(f"init only ({summary['init']})", summary["init_ppl"], summary["init_total"],
                        summary["init_sparsity"]))
    rows.append(row(summary.get("method_label", "probprune search"), summary["pruned_ppl"], p["pruned_total"],
                    summary["sparsity"]))
    s = summary.get("search", {})
    foot = (f"model {summary['model']} ({summary['dtype']}), data {summary['data']} held-out split, seed "
            f"{summary['seed']}; perplexity over non-overlapping windows, at most {summary['eval']['max_tokens']} "
            f"held-out tokens per length; ")
    if s:
        foot += (f"search {s['steps']} steps x {s['num_samples']} masks x {s['batch_size']} sequences"
                 f" ({s.get('method', 'units')}, {s.get('objective', 'ce')} objective); ")
    foot += f"wall time {summary['wall_seconds']:.0f} s"
    ws, chk = summary.get("warm_start"), summary.get("check")
    if ws:
        cands = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ws["check_losses"].items(), key=lambda kv: kv[1]))
        foot += f"\nwarm start: {ws['chosen']} (check-set cross-entropy: {cands})"
    if chk:
        foot += (f"\ncheck set ({chk['tokens']:,} held-out calibration tokens): search result {chk['search_loss']:.3f}, "
                 f"start {chk['start_loss']:.3f}: returned the {chk['returned']}")
    return "\n".join(rows) + "\n\n" + foot
