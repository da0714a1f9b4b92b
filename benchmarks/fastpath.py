"""Throughput of mask scoring on SmolLM2-135M: dense forward vs masked (reference) vs gathered (fast path).

Every row scores masks on the same B x T batch (forward + loss) and reports tokens/s and the ratio to the dense
forward measured in the same run. Timings are interleaved round-robin (so load from other processes hits every row
alike), repeated, and the median is taken after one warm-up round (tok/s and "÷ dense" are medians of wall time).
On a shared machine two more ratios help: of the fastest round of each row ("min": the least disturbed run) and of
this process's CPU time ("CPU"; with several threads it also counts OpenMP spin-waiting, so prefer --threads 1).

Rows:
  dense            the unmasked model: ``sequence_nll`` (HF forward + loss), as the reference scores a mask
  masked 50%       ``masked_losses`` (hooks on a dense forward), one mask per forward
  gathered S%      ``gathered_losses`` at S % prunable sparsity (exactly that share of head groups and of channels)
``ideal`` is the FLOP bound: matmul parameters of the dense model (incl. lm_head) / those of the pruned model.

Also printed: the fixed cost per mask of the gathered path (a 1 x 2-token batch: weight gather, Python dispatch,
a 1-token lm_head), an upper bound on what stacking several masks into one forward could save on CPU (each mask
still needs its own gathered weights and its own matmuls), and the FLOPs such stacking would add by padding every
layer to the widest of the stacked masks.

Usage:
    python benchmarks/fastpath.py --dtype float32 bfloat16 --threads 2 --out benchmarks/results/fastpath.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import exact_mask, flop_bound, timed

from probprune.fastpath import gathered_losses
from probprune.mask_space import MaskSpace
from probprune.masked_forward import masked_losses, sequence_nll
from probprune.models import get_adapter
from probprune.models.loading import load_model


def stacking_padding(space: MaskSpace, masks: np.ndarray, head_params: int) -> float:
    """Extra matmul FLOPs if the masks were stacked into one forward, each layer padded to the widest mask."""
    exp = space.expand(masks)
    own = padded = 0.0
    for li, ls in enumerate(space.layers):
        h = (exp["heads"][:, li, : ls.num_kv_heads] > 0.5).sum(1).numpy() * ls.head_unit_cost
        c = (exp["channels"][:, li, : ls.intermediate_size] > 0.5).sum(1).numpy() * ls.channel_cost
        own += float(h.sum() + c.sum())
        padded += len(masks) * float(h.max() + c.max())
    own += len(masks) * head_params
    padded += len(masks) * head_params
    return padded / own - 1


def run(dtype: str, args: argparse.Namespace) -> list[dict]:
    model, _ = load_model(args.model, dtype=dtype)
    adapter = get_adapter(model)
    space = adapter.mask_space()
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=gen)
    masks = {s: np.stack([exact_mask(space, 1 - s, rng) for _ in range(args.masks)]) for s in (0.3, 0.5)}
    head_params = adapter.lm_head.weight.numel()
    pad_rng = np.random.default_rng(args.seed + 1)  # 8 random pairs of 50 % masks
    padding = float(
        np.mean(
            [
                stacking_padding(space, np.stack([exact_mask(space, 0.5, pad_rng) for _ in range(2)]), head_params)
                for _ in range(8)
            ]
        )
    )

    def ideal(mask: np.ndarray | None) -> float:
        return flop_bound(space, head_params, mask)

    tokens = args.masks * args.batch * args.seq_len
    rows: dict[str, tuple[Callable[[], object], int, float]] = {
        "dense": (lambda: [sequence_nll(adapter, batch) for _ in range(args.masks)], tokens, 1.0),
        "masked 50%": (
            lambda: masked_losses(adapter, space, masks[0.5], batch, max_rows=args.batch),
            tokens,
            ideal(None),
        ),
        "gathered 30%": (
            lambda: gathered_losses(adapter, space, masks[0.3], batch),
            tokens,
            float(np.mean([ideal(m) for m in masks[0.3]])),
        ),
        "gathered 50%": (
            lambda: gathered_losses(adapter, space, masks[0.5], batch),
            tokens,
            float(np.mean([ideal(m) for m in masks[0.5]])),
        ),
    }
    tiny = batch[:1, :2]
    rows["fixed cost"] = (lambda: gathered_losses(adapter, space, masks[0.5], tiny), 0, 0.0)
    times: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # round 0 is the warm-up
            for name, (fn, _, _) in rows.items():
                w, c = timed(fn)
                if rep > 0:
                    times[name].append(w)
                    cpu[name].append(c)
    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    out = []
    for name, (_, ntok, ide) in rows.items():
        if name == "fixed cost":
            out.append(
                {
                    "dtype": dtype,
                    "row": name,
                    "ms_per_mask": 1e3 * med[name] / args.masks,
                    "stacking_padding_flops": padding,
                    "share_of_gathered_50": med[name] / med["gathered 50%"],
                    "share_of_gathered_50_cpu": med_cpu[name] / med_cpu["gathered 50%"],
                    "times_s": times[name],
                    "cpu_s": cpu[name],
                }
            )
            continue
        out.append(
            {
                "dtype": dtype,
                "row": name,
                "tokens_per_s": ntok / med[name],
                "vs_dense": med["dense"] / med[name],
                "vs_dense_min": best["dense"] / best[name],
                "vs_dense_cpu": med_cpu["dense"] / med_cpu[name],
                "ideal": ide,
                "median_s": med[name],
                "median_cpu_s": med_cpu[name],
                "times_s": times[name],
                "cpu_s": cpu[name],
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per mask")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--masks", type=int, default=2, help="masks scored per timed call")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round; median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for dtype in args.dtype:
        results += run(dtype, args)
    print(
        f"SmolLM2-135M, {args.batch}x{args.seq_len} tokens per mask, {args.masks} masks per call, "
        f"{args.threads} threads, median of {args.repeats} (after warm-up)"
    )
    print(
        f"{'dtype':<9} {'row':<14} {'tok/s':>7} {'÷ dense':>8} {'÷ dense (min)':>14} {'÷ dense (CPU)':>14} {'ideal':>6}"
    )
    for r in results:
        if r["row"] == "fixed cost":
            continue
        print(
            f"{r['dtype']:<9} {r['row']:<14} {r['tokens_per_s']:>7.0f} {r['vs_dense']:>8.2f} "
            f"{r['vs_dense_min']:>14.2f} {r['vs_dense_cpu']:>14.2f} {r['ideal']:>6.2f}"
        )
    for r in results:
        if r["row"] == "fixed cost":
            print(
                f"{r['dtype']}: gathered fixed cost {r['ms_per_mask']:.0f} ms per mask "
                f"({100 * r['share_of_gathered_50']:.1f} % of a gathered 50% call wall, "
                f"{100 * r['share_of_gathered_50_cpu']:.1f} % CPU time); stacking 2 masks per forward "
                f"would pad the matmuls by {100 * r['stacking_padding_flops']:.1f} % FLOPs"
            )
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (other processes share the CPU)")
    if args.out:
        meta = {
            "model": args.model,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "masks": args.masks,
            "threads": args.threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_after": os.getloadavg(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
