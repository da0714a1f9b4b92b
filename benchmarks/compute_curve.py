"""Quality vs compute: the default and the paper preset at several search lengths, same model, data and evaluation.

    python benchmarks/compute_curve.py --out benchmarks/results/compute_curve            # 50 %, seed 0
    python benchmarks/compute_curve.py --out /tmp/cc --forwards 40 80 --max-tokens 2048  # a quick smoke check

A search's compute is counted in forwards (masks scored, each on one calibration batch of its preset: 4 x 128 tokens
for the default, 8 x 128 for the paper preset, so a paper forward scores twice the tokens); both are also given as
scored tokens. Each (preset, forwards, seed) is one job in its own process (``benchmarks/quality.py``'s runner: 1
torch thread, ``--workers`` at once, finished jobs skipped). Writes ``OUT/compute_curve.csv``, ``.md`` and ``.png``
(held-out PPL@128 vs forwards) and prints how many forwards the paper preset needs to reach the default's perplexity
at ``--reference`` forwards (or that it did not within the longest run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import BASE_CONFIG, dense_reference, finished, parse_or_run_job, run_jobs

PRESETS = {  # label -> (config, masks per step, tokens per forward)
    "probprune-ours": (BASE_CONFIG, 4, 4 * 128),
    "probprune-paper": ("configs/smollm2/135m_paper.yaml", 2, 8 * 128),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--forwards",
        type=int,
        nargs="+",
        default=[150, 600, 2400],
        help="search lengths in masks scored (steps = forwards / masks per step, rounded)",
    )
    ap.add_argument(
        "--paper-forwards", type=int, nargs="+", default=None, help="the paper preset's lengths, if not --forwards"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--reference", type=int, default=600, help="the default's length the paper preset must match")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens per window length")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = parse_or_run_job(ap)
    if args is None:
        return 0
    out = args.out
    common = [f"eval.max_tokens={args.max_tokens}", f"search.sparsity={args.sparsity}"]
    t0 = time.perf_counter()
    dense = dense_reference(out, [f"eval.max_tokens={args.max_tokens}"], max(args.threads, 2))
    jobs = []
    for label, (config, k, _) in PRESETS.items():
        lengths = args.paper_forwards if (label == "probprune-paper" and args.paper_forwards) else args.forwards
        for forwards in lengths:
            steps = max(1, round(forwards / k))
            for seed in args.seeds:
                name = f"{label}_f{forwards}_seed{seed}"
                jobs.append(
                    (
                        name,
                        {
                            "method": label,
                            "forwards": steps * k,
                            "out": str(out / "runs" / name),
                            "threads": args.threads,
                            "dense_ppl": dense,
                            "config": config,
                            "overrides": [*common, f"search.steps={steps}", f"seed={seed}"],
                        },
                    )
                )
    statuses = (
        {n: "cached" for n, _ in jobs}
        if args.report_only
        else run_jobs(__file__, out, jobs, args.workers, args.threads)
    )
    write_results(out, jobs, dense, args.reference, time.perf_counter() - t0)
    return 0 if all(s in ("ok", "cached") for s in statuses.values()) else 1


def write_results(out: Path, jobs, dense: dict, reference: int, wall: float) -> None:
    import pandas as pd

    rows = []
    for spec, s in finished(jobs):
        tokens = PRESETS[spec["method"]][2]
        rows.append(
            {
                "preset": spec["method"],
                "forwards": spec["forwards"],
                "scored_tokens": spec["forwards"] * tokens,
                "seed": s["seed"],
                **{f"ppl_{n}": v for n, v in s["pruned_ppl"].items()},
                "search_seconds": s["timings"].get("search"),
                "wall_seconds": s["wall_seconds"],
            }
        )
    if not rows:
        print(f"no finished jobs under {out / 'runs'}: nothing to report")
        return
    df = pd.DataFrame(rows).sort_values(["preset", "forwards", "seed"])
    df.to_csv(out / "compute_curve.csv", index=False)
    cols = sorted((c for c in df.columns if c.startswith("ppl_")), key=lambda c: int(c.split("_")[1]))
    agg = (
        df.groupby(["preset", "forwards"])
        .agg(
            scored_tokens=("scored_tokens", "first"),
            seeds=("seed", "count"),
            **{c: (c, "mean") for c in cols},
            search_seconds=("search_seconds", "mean"),
        )
        .reset_index()
    )
    lines = [
        "Dense: " + ", ".join(f"PPL@{n} {v:.2f}" for n, v in sorted(dense.items(), key=lambda x: int(x[0]))),
        "",
        "| preset | forwards | scored tokens | seeds | "
        + " | ".join(f"PPL@{c[4:]}" for c in cols)
        + " | search s (1 thread) |",
        "|---|---:|---:|---:|" + "---:|" * len(cols) + "---:|",
    ]
    for _, r in agg.iterrows():
        lines.append(
            f"| {r['preset']} | {r['forwards']} | {r['scored_tokens']:,} | {r['seeds']} | "
            + " | ".join(f"{r[c]:.1f}" for c in cols)
            + f" | {r['search_seconds']:.0f} |"
        )
    key = cols[0]
    ours = agg[(agg["preset"] == "probprune-ours") & (agg["forwards"] == reference)]
    paper = agg[agg["preset"] == "probprune-paper"].sort_values("forwards")
    if len(ours) and len(paper):
        target = float(ours[key].iloc[0])
        hit = paper[paper[key] <= target]
        verdict = (
            f"the paper preset first reaches it at {int(hit['forwards'].iloc[0])} forwards"
            if len(hit)
            else f"the paper preset does not reach it within {int(paper['forwards'].max())} forwards (best "
            f"{float(paper[key].min()):.1f})"
        )
        lines += ["", f"The default at {reference} forwards: {key.replace('ppl_', 'PPL@')} {target:.1f}; {verdict}."]
    lines.append(f"\nthis invocation: {wall / 60:.1f} min")
    (out / "compute_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from _common import log_plot

    series = [(p, g["forwards"], g[key], "-o") for p, g in agg.groupby("preset")]
    log_plot(
        out / "compute_curve.png",
        series,
        float(dense[key.split("_")[1]]),
        "forwards (masks scored)",
        f"held-out {key.replace('ppl_', 'PPL@')} (log)",
        "SmolLM2-135M at 50 %, quality vs search length",
        logx=True,
    )


if __name__ == "__main__":
    sys.exit(main())
