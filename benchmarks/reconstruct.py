"""Reconstruction variants on a finished run's final mask: held-out perplexity, added wall time and peak memory.

    python benchmarks/reconstruct.py RUN_DIR --variant refit-local [--blocks 128] [--damping 0.1] [--removed-layers]

``RUN_DIR`` is a ``probprune prune`` output (its ``config.yaml`` and ``masks.pt``). The variant runs in this process
alone, so ``peak_rss_mb`` (the process's peak resident memory) compares across variants: ``none`` is the model, the
compaction and the evaluation without reconstruction. Prints one JSON line: PPL per window length (the run's eval
settings), the reconstruction's wall time, peak memory and the check-set loss of the reconstructed model.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probprune.compaction import compact
from probprune.config import load_config
from probprune.data import CalibrationData, load_corpus, test_stream
from probprune.engine.local import LocalEngine
from probprune.models.loading import load_model
from probprune.models.registry import get_adapter
from probprune.perplexity import evaluate_ppl
from probprune.reconstruct import reconstruct_local, reconstructed_loss

VARIANTS = {
    "none": None,
    "bias-local": ("local", "bias"),
    "bias-dense": ("dense", "bias"),
    "refit-local": ("local", "refit"),
    "refit-dense": ("dense", "refit"),
    "refit+bias-local": ("local", "refit+bias"),
    "refit+bias-dense": ("dense", "refit+bias"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--variant", choices=list(VARIANTS), default="refit-local")
    ap.add_argument("--blocks", type=int, default=128)
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--check-only", action="store_true", help="the check-set loss only (no held-out perplexity)")
    ap.add_argument("--removed-layers", action="store_true", help="fold removed layers in (ReplaceMe)")
    args = ap.parse_args()
    cfg = load_config(args.run / "config.yaml")
    rec_masks = torch.load(args.run / "masks.pt", weights_only=False)
    model, tok = load_model(cfg.model.name_or_path, cfg.model.dtype)
    adapter = get_adapter(model)
    space = adapter.mask_space(
        heads=cfg.mask.heads,
        channels=cfg.mask.channels,
        layers=cfg.mask.layers,
        channel_block=rec_masks["channel_block"],
        channel_perm=[p.numpy() for p in rec_masks["channel_perm"]],
        query_heads=cfg.mask.head_unit == "query",
    )
    mask = rec_masks["final_mask"].numpy().astype(np.float32)
    corpus = load_corpus(cfg.data, seed=cfg.data.split_seed)
    calib = CalibrationData.from_corpus(
        tok,
        corpus,
        cfg.data.block_len,
        cfg.data.calib_blocks,
        seed=cfg.seed,
        max_context=model.config.max_position_embeddings,
    )
    search_data, check = calib.hold_out(cfg.search.check_blocks or 32)
    blocks = search_data.first(args.blocks)
    t0 = time.perf_counter()
    rec = None
    if VARIANTS[args.variant] is not None:
        target, mode = VARIANTS[args.variant]
        rec = reconstruct_local(
            model,
            space,
            mask,
            blocks,
            target=target,
            mode=mode,
            damping=args.damping,
            progress=True,
            removed_layers=args.removed_layers,
        )
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    check_loss = reconstructed_loss(LocalEngine(model, space), space, mask, rec, check)
    check_seconds = time.perf_counter() - t1
    ppl = {}
    if not args.check_only:
        pruned = compact(model, space, mask, override=None if rec is None else rec.override())
        ppl = evaluate_ppl(
            pruned,
            test_stream(tok, corpus),
            cfg.eval.seq_lens,
            max_tokens=cfg.eval.max_tokens,
            batch_size=cfg.eval.batch_size,
        )
    print(
        json.dumps(
            {
                "variant": args.variant + ("+layers" if args.removed_layers else ""),
                "blocks": args.blocks,
                "tokens": int(blocks.numel()),
                "damping": args.damping,
                "ppl": {str(k): round(float(v), 2) for k, v in ppl.items()},
                "reconstruct_seconds": round(seconds, 1),
                "check_loss": round(check_loss, 4),
                "check_seconds": round(check_seconds, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
