"""A job's session: the model (weights or shapes, as the engine needs), data, engine and mask space, loaded and
checked; and the held-out measurement every job makes.

Every bad input (model path, architecture, data, context length, mask settings) raises
:class:`~probprune.errors.UserError` in :func:`prepare`, before any output is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import Config
from .data import CalibrationData, load_corpus, resolve_bos, test_stream
from .engine import Engine, build_engine, load_for_engine
from .engine.tasks import channel_ranking, input_stats, merge_stats, split_shares
from .errors import UserError
from .mask_space import MaskSpace
from .models.base import FamilyAdapter
from .models.registry import get_adapter
from .perplexity import max_context

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything a job needs, loaded and checked. ``model`` holds the weights when the engine keeps them in this
    process, else only the shapes (``meta`` device)."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any
    adapter: FamilyAdapter
    calib: CalibrationData
    test_tokens: torch.Tensor
    space: MaskSpace
    stats: dict | None  # activation statistics of the init blocks (None if not needed)
    engine: Engine
    bos_id: int | None = None  # every calibration block and evaluation window starts with it (data.bos)
    progress: bool = True  # progress bars on long loops
    timings: dict[str, float] = field(default_factory=dict)

    def init_blocks(self) -> torch.Tensor:
        return self.calib.first(min(self.cfg.search.init_blocks, len(self.calib)))

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t  # summed over calls


def prepare(cfg: Config, need_stats: bool = True, progress: bool = True) -> Session:
    """Check that the configuration fits its device (:mod:`probprune.plan`), then load the model (weights or shapes,
    as the engine needs), the data, the engine and the mask space; every bad input raises :class:`UserError` here.
    The calibration statistics are collected by the engine, one share of the blocks per replica."""
    t0 = time.perf_counter()
    from .plan import check_fits, make_plan

    try:
        plan = make_plan(cfg, calibrate_rate=False)  # memory only, from the shapes: before any weight is read
    except UserError:
        plan = None  # a model that cannot be planned cannot be loaded either: loading names the problem below
    if plan is not None:
        check_fits(plan)
    model, tok = load_for_engine(cfg)
    adapter = get_adapter(model)
    bos_id = resolve_bos(cfg.data.bos, tok, adapter.wants_bos)
    corpus = load_corpus(cfg.data, seed=cfg.data.split_seed)
    calib = CalibrationData.from_corpus(
        tok,
        corpus,
        cfg.data.block_len,
        cfg.data.calib_blocks,
        seed=cfg.seed,
        max_context=max_context(model),
        bos_id=bos_id,
    )
    test_tokens = test_stream(tok, corpus)
    engine = build_engine(cfg, model, build_space(cfg, adapter, None))  # the final space once stats are in
    try:
        wants = cfg.search.init in ("wanda-sp", "best") or cfg.mask.block_order == "metric"
        stats = None
        if need_stats and (wants or cfg.search.method == "allocation"):
            blocks = calib.first(min(cfg.search.init_blocks, len(calib)))
            stats = merge_stats(
                engine.map(
                    input_stats, [(blocks[lo:hi],) for lo, hi in split_shares(blocks.shape[0], engine.num_replicas)]
                )
            )
        space = build_space(cfg, adapter, stats, engine)
        engine.set_space(space)
    except BaseException:
        engine.close()
        raise
    log.info("prepared model, data and mask space in %.1f s", time.perf_counter() - t0)
    return Session(cfg, model, tok, adapter, calib, test_tokens, space, stats, engine, bos_id, progress)


def build_space(cfg: Config, adapter: FamilyAdapter, stats: dict | None, engine: Engine | None = None) -> MaskSpace:
    """The mask space of ``cfg.mask``; metric-ordered channel blocks are formed from ``stats`` (the Wanda-sp ranking,
    computed by ``engine``)."""
    perm = None
    if cfg.mask.block_order == "metric" and cfg.mask.channel_block > 1 and stats is not None and engine is not None:
        perm = engine.run(channel_ranking, stats)
    try:
        return adapter.mask_space(
            heads=cfg.mask.heads,
            channels=cfg.mask.channels,
            layers=cfg.mask.layers,
            channel_block=cfg.mask.channel_block,
            channel_perm=perm,
            query_heads=cfg.mask.head_unit == "query",
        )
    except ValueError as e:
        raise UserError(f"mask.head_unit={cfg.mask.head_unit!r}: {e}") from None


def measure(s: Session, mask: np.ndarray | None, label: str, rec: Any = None) -> dict[str, float]:
    """Held-out perplexity of the model under ``mask`` (None: dense) with ``rec``'s re-fitted weights
    (:class:`~probprune.reconstruct.Reconstruction`), by the evaluation protocol."""
    e = s.cfg.eval
    ppl = s.engine.perplexity(
        mask, s.test_tokens, e.seq_lens, e.max_tokens, e.batch_size, s.progress, rec, bos_id=s.bos_id
    )
    log.info("%s perplexity: %s", label, ppl)
    return ppl
