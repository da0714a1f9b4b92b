"""Which granularity can a short search learn? Channel blocks and allocation search vs the paper's single channels.

SmolLM2-135M at 50 % prunable sparsity (per-type budget: half of the head groups, half of the MLP channels), every
variant from the same Wanda-sp init, with the quickstart's number of forwards (masks scored): 600. Variants
(``--variants``; each is a search config plus overrides):

  paper          configs/smollm2/135m_paper.yaml, single channels, K=2, EMA baseline, 8 x 128 tokens per forward,
                 300 steps = 600 forwards (twice the tokens of the others: the reference gets the larger budget)
  units-1        the quickstart preset with single channels (channel_block 1), K=4, leave-one-out, 4 x 128 tokens,
                 150 steps = 600 forwards
  blocks-32/64/128  the same with channel blocks of 32/64/128 channels formed by the Wanda-sp ranking in each layer
                 (``mask.block_order=metric``)
  allocation     the same forwards, ``search.method=allocation``: 60 keep fractions (heads and channels of 30 layers),
                 the metric ranks single channels (and head groups) inside each layer
  allocation-b128  the same over 128-channel blocks (kept widths multiples of 128)

Every variant pins its own mask settings, so changing the quickstart's defaults does not change what a variant means.

Held-out perplexity (Brown test split, ``--max-tokens`` tokens per window length) of each final model; the ratio
"÷ paper" is the issue's target (best of blocks / allocation ≤ 0.67). Jobs run as in ``benchmarks/quality.py``:
one process per job (``--threads`` torch threads, ``--workers`` at a time), written to ``OUT/runs/<variant>/`` as
``probprune prune`` writes it, finished jobs skipped (an interrupted run continues).

    python benchmarks/granularity.py --out benchmarks/results/granularity                 # one run each (seed 0)
    python benchmarks/granularity.py --out benchmarks/results/granularity --seeds 0 1 2   # adds seeds 1 and 2

Writes ``OUT/granularity.csv`` and ``OUT/granularity.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quality import dense_reference, parse_or_run_job, run_jobs

QUICKSTART = "configs/smollm2/135m_quickstart.yaml"
PAPER = "configs/smollm2/135m_paper.yaml"
TARGET = 0.67


def _blocks(n: int) -> list[str]:
    return [f"mask.channel_block={n}", "mask.block_order=metric"]


# name -> (config, overrides, what the mask space holds)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "paper": (PAPER, ["search.steps=300"], "heads + single channels"),
    "units-1": (QUICKSTART, ["mask.channel_block=1", "mask.block_order=index"], "heads + single channels"),
    "blocks-32": (QUICKSTART, _blocks(32), "heads + 32-channel blocks"),
    "blocks-64": (QUICKSTART, _blocks(64), "heads + 64-channel blocks"),
    "blocks-128": (QUICKSTART, _blocks(128), "heads + 128-channel blocks"),
    "allocation": (
        QUICKSTART,
        ["mask.channel_block=1", "mask.block_order=index", "search.method=allocation", "search.lr=0.1"],
        "60 per-layer keep fractions (single channels)",
    ),
    "allocation-b128": (
        QUICKSTART,
        [*_blocks(128), "search.method=allocation", "search.lr=0.1"],
        "60 per-layer keep fractions (128-channel blocks)",
    ),
}


def job_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def report(out: Path, max_tokens: int, wall: float) -> str:
    """granularity.csv (one row per finished run under ``OUT/runs``, whichever variants and seeds ran) and
    granularity.md (per variant: mean over seeds, range, mean per-seed ratio ÷ paper)."""
    import pandas as pd

    rows = []
    for name in VARIANTS:
        for p in sorted(out.glob(f"runs/{name}_seed*/summary.json")):
            seed = int(p.parent.name.rsplit("_seed", 1)[1])
            s = json.loads(p.read_text())
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "units": VARIANTS[name][2],
                    "forwards": s["search"]["forwards"],
                    "tokens_scored": s["calibration"]["tokens_scored"],
                    **{f"ppl_{n}": v for n, v in s["pruned_ppl"].items()},
                    **{f"init_ppl_{n}": v for n, v in s["init_ppl"].items()},
                    "prunable_sparsity": s["sparsity"]["prunable"],
                    "search_s": s["timings"]["search"],
                    "wall_s": s["wall_seconds"],
                }
            )
    df = pd.DataFrame(rows)
    df.to_csv(out / "granularity.csv", index=False)
    lens = sorted((c.split("_")[1] for c in df.columns if c.startswith("ppl_")), key=int)
    g = df.groupby("variant", sort=False)
    paper_seed = {int(r["seed"]): r for _, r in df[df["variant"] == "paper"].iterrows()}
    lines = [
        f"SmolLM2-135M, 50 % of head groups and of MLP channels, Wanda-sp init; held-out Brown, {max_tokens} "
        f"tokens per window length; seeds {sorted(df['seed'].unique().tolist())}. init PPL = the variant's "
        f"init-only mask (Wanda-sp ranking in its own mask space), before any search. PPL: mean over seeds "
        f"(min–max); ÷ paper: the mean of the per-seed ratios (same seed ÷ paper preset), seed 0 alone in "
        f"brackets.",
        "",
        f"| variant | mask units | forwards | tokens scored | seeds | init PPL@{lens[0]} | "
        + " | ".join(f"PPL@{n}" for n in lens)
        + " | "
        + " | ".join(f"÷ paper @{n}" for n in lens)
        + " | search s |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * (2 * len(lens)) + "---:|",
    ]
    ratio = {}
    for name, grp in g:
        cells = []
        for n in lens:
            v = grp[f"ppl_{n}"]
            cells.append(f"{v.mean():.1f}" + (f" ({v.min():.1f}–{v.max():.1f})" if len(v) > 1 else ""))
        rcells = []
        for n in lens:
            per = {
                int(r["seed"]): r[f"ppl_{n}"] / paper_seed[int(r["seed"])][f"ppl_{n}"]
                for _, r in grp.iterrows()
                if int(r["seed"]) in paper_seed
            }
            ratio[(name, n)] = (sum(per.values()) / len(per), per.get(0)) if per else (None, None)
            mean, first = ratio[(name, n)]
            rcells.append(
                ""
                if mean is None
                else f"{mean:.2f}" + (f" ({first:.2f})" if len(per) > 1 and first is not None else "")
            )
        r0 = grp.iloc[0]
        lines.append(
            f"| {name} | {r0['units']} | {r0['forwards']} | {r0['tokens_scored']:,} | {len(grp)} | "
            f"{grp[f'init_ppl_{lens[0]}'].mean():.1f} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(rcells)
            + f" | {grp['search_s'].mean():.0f} |"
        )
    cands = [
        (ratio[(n, lens[0])][0], n)
        for n in g.groups
        if n.startswith(("blocks", "allocation")) and ratio.get((n, lens[0]), (None,))[0] is not None
    ]
    if cands:
        best, name = min(cands)
        lines += [
            "",
            f"Best of blocks / allocation: **{name}**, PPL@{lens[0]} ÷ paper = **{best:.2f}** "
            f"(target ≤ {TARGET}: {'met' if best <= TARGET else 'not met'}).",
        ]
    lines.append(
        f"\nwall time of the runs (each in its own process): {df['wall_s'].sum() / 60:.1f} min in all; "
        f"this invocation: {wall / 60:.1f} min"
    )
    md = "\n".join(lines) + "\n"
    (out / "granularity.md").write_text(md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens per window length")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="search seeds (each variant runs once per seed)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every job")
    args = parse_or_run_job(ap)
    if args is None:
        return 0
    out = args.out
    common = [f"eval.max_tokens={args.max_tokens}", "search.sparsity=0.5", *args.overrides]
    t0 = time.perf_counter()
    dense = dense_reference(out, common, max(args.threads, 2))
    print(f"dense perplexity: {dense}", flush=True)
    jobs = [
        (
            job_name(name, seed),
            {
                "out": str(out / "runs" / job_name(name, seed)),
                "threads": args.threads,
                "dense_ppl": dense,
                "config": VARIANTS[name][0],
                "overrides": [*common, *VARIANTS[name][1], f"seed={seed}"],
            },
        )
        for seed in args.seeds
        for name in args.variants
    ]
    statuses = run_jobs(__file__, out, jobs, args.workers, args.threads)
    print(report(out, args.max_tokens, time.perf_counter() - t0))
    return 0 if all(s in ("ok", "cached") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
