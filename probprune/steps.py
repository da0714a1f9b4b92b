"""The named steps of a job: the search's start, policy, final choice and reconstruction, and the last step that
compacts, saves and evaluates the result. :mod:`probprune.pipeline` strings them into jobs.

Each step takes what it needs and returns what it made; where the weights live is the engine's business
(:mod:`probprune.engine`), so no step asks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import projection
from .config import Config, config_to_dict
from .engine import Engine
from .engine.tasks import criterion_scores, warm_start_candidates
from .mask_space import MaskSpace
from .perplexity import protocol
from .policy import Policy, random_probs, scores_to_probs, uniform_probs
from .run_folder import RunFolder, masks_record
from .session import Session, measure


# ------------------------------------------------------------------------------------------------ the search
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

    @property
    def rec(self) -> Any:
        """The start's weight changes at compaction (FLAP's bias compensation), or None."""
        return None if self.warm is None else self.warm.rec


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
        as_returned = {}
        if "flap" in candidates:  # FLAP is returned with its bias compensation (reconstruction, if on, replaces it)
            as_returned["flap"] = flap_as_returned(s, candidates["flap"], check)
        r = s.cfg.reconstruct
        refit = None
        if r.enabled and r.candidates:  # the start as it may be returned: re-fit

            def refit(mask: np.ndarray, own: Any = None) -> tuple[Any, float]:
                from .reconstruct import reconstructed_loss

                rec = reconstruct(s, mask, own)
                return rec, reconstructed_loss(s.engine, s.space, mask, rec, check, sc.batch_size)

        warm = choose_start(
            s.engine,
            candidates,
            check,
            sc.batch_size,
            s.space,
            sc.init_mix,
            sc.sparsity,
            sc.budget,
            as_returned,
            refit=refit,
            refit_top=r.candidates,
        )
    return Start(f"best: {warm.name}", warm.mask, warm.probs, warm)


def flap_as_returned(s: Session, mask: np.ndarray, check: torch.Tensor) -> tuple[float, Any]:
    """FLAP's mask as ``probprune baseline --method flap`` returns it: with the removed channels' mean contribution
    added to the output biases. Returns its check-set loss (the compacted model's) and that
    :class:`~probprune.reconstruct.Reconstruction`."""
    from .engine.tasks import flap_compensation
    from .reconstruct import Reconstruction, reconstructed_loss

    rec = Reconstruction(biases=s.engine.run(flap_compensation, s.space, mask, s.stats))
    return reconstructed_loss(s.engine, s.space, mask, rec, check, s.cfg.search.batch_size), rec


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


@dataclass
class Choice:
    """The model a run returns: its mask and weight changes at compaction (a reconstruction, a FLAP start's
    biases, or None), its unit probabilities, the check-set record, and with ``reconstruct.enabled`` the model the
    same run returns without reconstruction (``plain``: mask and weight changes)."""

    mask: np.ndarray
    rec: Any
    probs: np.ndarray
    record: dict | None
    reconstructed: bool = False
    plain: tuple[np.ndarray, Any] | None = None


def choose(s: Session, policy, result, start: Start, check: torch.Tensor | None) -> Choice:
    """The final mask and its weight changes: the search's mask (re-derived under ``mask.shape``/``mask.align``)
    or its start (as its baseline returns it), whichever has the lower check-set loss; with ``reconstruct.enabled``
    (and ``reconstruct.choose``) each is compared as it is and reconstructed, so reconstruction is kept only where
    it helps there."""
    cfg = s.cfg
    probs = policy.unit_probs() if cfg.search.method == "allocation" else policy.probs  # [N] either way
    final = final_mask(cfg, s.space, probs, mask=result.final_mask)
    rec = record = None
    start_loss = start.warm.check_losses[start.warm.name] if start.rec is not None else None
    if check is not None:
        with s.timed("check"):
            if cfg.reconstruct.enabled and cfg.reconstruct.choose:
                from .reconstruct import choose_final

                refit = None if start.warm is None else start.warm.refit  # the start's re-fit, if already done
                final, rec, record, plain = choose_final(s, final, start.mask, check, start.rec, start_loss, refit)
                record = {"blocks": int(check.shape[0]), "tokens": int(check.numel()), **record}
                return Choice(final, rec, probs, record, record["reconstructed"], plain)
            else:
                from .warmstart import choose_final

                final, record = choose_final(s.engine, final, start.mask, check, cfg.search.batch_size, start_loss)
                if record["returned"] == "start":
                    rec = start.rec
        record = {"blocks": int(check.shape[0]), "tokens": int(check.numel()), **record}
    if cfg.reconstruct.enabled:  # no check-set choice of reconstruction: always reconstructed
        return Choice(final, reconstruct(s, final, rec), probs, record, True, (final, rec))
    return Choice(final, rec, probs, record)


def reconstruct(s: Session, mask: np.ndarray, own: Any = None):
    """The reconstruction of ``mask`` under ``s.cfg.reconstruct`` (:mod:`probprune.reconstruct`), timed; ``own``:
    the weight changes the model is returned with without it (FLAP's biases), kept where nothing is re-fit."""
    from .reconstruct import for_session

    with s.timed("reconstruct"):
        return for_session(s, mask, own)


# ------------------------------------------------------------------------------------------------ the last step
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
    reconstructed: bool = False,
    plain: tuple[np.ndarray, Any] | None = None,
) -> dict[str, Any]:
    """Compact and save the final mask (with ``rec``'s weight changes), evaluate it, write ``masks.pt``; return the
    summary (written by the caller once complete).

    ``reconstructed``: ``rec`` is a reconstruction (recorded as ``reconstruct``), not a baseline's own weight
    changes. ``plain``: the model the same run returns without reconstruction, ``(mask, weight changes)``; its
    held-out perplexity is recorded as ``without_reconstruction`` (one more evaluation unless it is the same model).
    """
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
    if reconstructed:
        from .reconstruct import summary_record

        summary["reconstruct"] = summary_record(s, rec)
    if plain is not None:
        mask, changes = plain
        same = not reconstructed and np.array_equal(mask, final)
        if not same:
            with s.timed("eval_without_reconstruction"):
                plain_ppl = measure(
                    s, mask, label.removesuffix(" + reconstruction") + " without reconstruction", changes
                )
        kept_plain = _mask_record(space, mask, dense_total)
        summary["without_reconstruction"] = {
            "pruned_ppl": pruned_ppl if same else plain_ppl,
            "sparsity": kept_plain["sparsity"],
            "pruned_total": kept_plain["pruned_total"],
            "same_model": same,
        }
        summary["timings"] = {k: round(v, 2) for k, v in s.timings.items()}
    return summary


def _mask_record(space: MaskSpace, mask: np.ndarray, dense_total: int) -> dict[str, Any]:
    kept = space.kept_params(mask)
    return {
        "sparsity": {k: round(v, 6) for k, v in space.sparsity(mask).items()},
        "kept_prunable": kept,
        "pruned_total": dense_total - (space.prunable_params - kept),
    }
