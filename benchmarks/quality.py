"""Quality benchmark: every built-in baseline vs probprune's searches, same model, data, budget and evaluation.

    python benchmarks/quality.py --out benchmarks/results/quality            # SmolLM2-135M, Brown, 20/30/50 %
    python benchmarks/quality.py --model gemma3-270m --out benchmarks/results/quality_gemma3   # Gemma 3 270M
    python benchmarks/quality.py --out /tmp/q --quick                        # a few minutes, for a smoke check

``--model`` picks the model's quickstart config (:data:`MODELS`): its model, data (BOS included: ``data.bos: auto``)
and eval settings are every job's, its search settings the default's.

Each (method, sparsity, seed) is one job in its own process (1 torch thread; ``--workers`` jobs at once), written to
``OUT/runs/<job>/`` exactly as ``probprune prune`` / ``probprune baseline`` write it; finished jobs are skipped, so an
interrupted benchmark continues where it stopped. The dense perplexity is measured once and shared. Writes
``OUT/quality.csv`` (one row per job), ``OUT/quality.md`` (table) and ``OUT/quality.png`` (perplexity vs sparsity),
and prints, for each sparsity, ours ÷ best baseline.

``--with-reconstruction`` runs every job with ``reconstruct.enabled=true`` (row ``METHOD+rec``) and takes the row
``METHOD`` from the same run: the model that run returns without reconstruction, evaluated on the same held-out
tokens (``summary.json``'s ``without_reconstruction``). That is the model a run with ``reconstruct.enabled=false``
returns whenever the search started where such a run starts (a baseline; a warm start won by a candidate's own
loss, not by its re-fit): only then is the row taken, so the two rows of a seed share one search (or baseline
mask) and differ by the reconstruction alone, at half the cost of separate runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["magnitude", "wanda-sp", "flap", "random", "shortgpt", "sleb", "taylor"]
MODELS = {  # --model -> (quickstart config: model, data and eval settings of every job; label of the plot)
    "smollm2-135m": ("configs/smollm2/135m_quickstart.yaml", "SmolLM2-135M"),
    "gemma3-270m": ("configs/gemma3/270m_quickstart.yaml", "Gemma 3 270M"),
}
SINGLE_CHANNELS = ["mask.channel_block=1", "mask.block_order=index"]  # the baselines' mask space, pinned
QUICKSTART = None  # in PRESETS: the --model's quickstart config
PRESETS = {  # search presets: label -> (config file, overrides)
    # the default exactly as a user runs it (the quickstart config at each sparsity, its own step count)
    "probprune-ours": (QUICKSTART, []),
    # the default, its kept weights re-fit only at the final choice (its warm start scores no re-fit candidate)
    "probprune-ours-refit-end": (QUICKSTART, ["reconstruct.candidates=0"]),
    # the default with cross-entropy instead of the KL objective
    "probprune-ours-ce": (QUICKSTART, ["search.objective=ce"]),
    # thin only: the same allocation search from the Wanda-sp init, no warm start and no check set
    "probprune-thin-only": (QUICKSTART, ["search.init=wanda-sp", "search.check_blocks=0"]),
    "probprune-paper": ("configs/smollm2/135m_paper.yaml", []),  # SmolLM2 only
    # stock shapes: every layer keeps the same heads and MLP width (unit search, its lr; Wanda-sp start)
    "probprune-uniform": (
        QUICKSTART,
        ["mask.shape=uniform", "search.method=units", "search.init=wanda-sp", "search.lr=0.02"],
    ),
}
MODEL_ONLY = {"probprune-paper": "smollm2-135m"}  # presets whose config is one model's
OURS = ("probprune-ours", "probprune-ours-refit-end")  # the default (and its variant) in the ratio table
REC = "+rec"  # method-name suffix of the runs with reconstruction
PINNED_STEPS = {"probprune-paper"}  # presets that take --steps; the others keep their config's step count
# Equal calibration budget: the paper preset scores 2 masks x 8 x 128 tokens per step, ours 4 masks x 4 x 128, so
# --steps 150 (the default) gives the paper preset the scored tokens of ours (150 steps).


def uses_gradients(method: str) -> bool:
    """Whether a method (with or without the re-fit suffix) takes a backward pass: Taylor, the one baseline that does."""
    return method.removesuffix(REC) == "taylor"


def job_name(method: str, sparsity: float, seed: int) -> str:
    return f"{method}_s{int(round(sparsity * 100)):02d}_seed{seed}"


def run_job(spec: dict) -> None:
    """Runs inside the worker process: one pipeline call.

    ``spec``: ``out``, ``threads``, ``overrides``, ``dense_ppl``, ``config`` and, for a baseline, ``baseline`` (a
    method name for ``probprune baseline``); without it the job is a search preset, run with ``probprune prune``'s
    resume.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    from probprune.config import load_config
    from probprune.pipeline import prune, run_baseline

    out = Path(spec["out"])
    if spec.get("baseline") is None:
        cfg = load_config(ROOT / spec["config"], spec["overrides"])
        prune(cfg, out, resume=True, progress=False, dense_ppl=spec.get("dense_ppl"))  # continues a killed search
    else:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # an unfinished baseline (no summary.json) simply runs again
        cfg = load_config(ROOT / spec["config"], spec["overrides"])
        run_baseline(cfg, spec["baseline"], out, progress=False, dense_ppl=spec.get("dense_ppl"))


def parse_or_run_job(ap: argparse.ArgumentParser) -> argparse.Namespace | None:
    """The benchmark's arguments; in a job process (``--job SPEC``, started by :func:`run_jobs`) run that one job
    and return None. Otherwise ``OUT/runs`` is created and ``args.out`` made absolute."""
    args = ap.parse_args()
    if args.job:
        run_job(json.loads(args.job))
        return None
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    return args


def run_jobs(script: str, out: Path, jobs: list[tuple[str, dict]], workers: int, threads: int) -> dict[str, str]:
    """Run each (name, spec) job as ``python SCRIPT --out OUT --job SPEC`` in its own process, ``workers`` at a time.

    Jobs whose folder holds a ``summary.json`` are skipped ("cached"); each job's log is ``OUT/runs/<name>.log``.
    Returns name -> "ok" | "cached" | "FAILED ...".
    """

    def launch(item):
        name, spec = item
        if (Path(spec["out"]) / "summary.json").exists():
            return name, "cached"
        log = out / "runs" / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        t = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.call(
                [sys.executable, script, "--out", str(out), "--job", json.dumps(spec)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        status = "ok" if rc == 0 else f"FAILED (rc {rc}, see {log})"
        print(f"  {name}: {status} in {time.perf_counter() - t:.0f} s", flush=True)
        return name, status

    print(f"{len(jobs)} jobs, {workers} at a time", flush=True)
    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(launch, jobs))


def dense_reference(out: Path, config: str, common: list[str], threads: int) -> dict[str, float]:
    path = out / "dense.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    torch.set_num_threads(threads)
    from probprune.config import load_config
    from probprune.pipeline import evaluate_folder

    cfg = load_config(ROOT / config, common)
    res = evaluate_folder(cfg)
    path.write_text(json.dumps(res["ppl"]))
    return res["ppl"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--model",
        choices=list(MODELS),
        default="smollm2-135m",
        help="which model's quickstart config every job starts from",
    )
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the searches (and random)")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="baselines and search presets (default: every baseline and every preset that has a config for --model)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens per window length")
    ap.add_argument(
        "--steps", type=int, default=150, help="search steps of the paper preset (150 = the scored tokens of ours)"
    )
    ap.add_argument(
        "--with-reconstruction",
        action="store_true",
        help="run every method with the kept weights reconstructed (rows 'METHOD+rec') and report the same runs' "
        "models without reconstruction as rows 'METHOD'; without it every job pins reconstruct.enabled=false",
    )
    ap.add_argument("--quick", action="store_true", help="20 search steps, 2048 eval tokens, 0.5 only, one seed")
    ap.add_argument("--report-only", action="store_true", help="rebuild csv/md/png from the finished jobs; run nothing")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every job")
    args = parse_or_run_job(ap)
    if args is None:
        return 0
    if args.quick:
        args.sparsities, args.seeds, args.max_tokens = [0.5], [0], 2048
        args.steps = 20
    base_config, label = MODELS[args.model]
    if args.methods is None:
        args.methods = BASELINES + [m for m in PRESETS if MODEL_ONLY.get(m, args.model) == args.model]
    for m in args.methods:
        if m not in BASELINES and m not in PRESETS:
            ap.error(
                f"--methods: unknown method {m!r} (baselines: {', '.join(BASELINES)}; presets: {', '.join(PRESETS)})"
            )
        if MODEL_ONLY.get(m, args.model) != args.model:
            ap.error(f"--methods: {m} has a config for --model {MODEL_ONLY[m]} only")
    out = args.out
    common = [f"eval.max_tokens={args.max_tokens}", *args.overrides]
    search_common = [f"search.steps={args.steps}"]
    t0 = time.perf_counter()
    dense = dense_reference(out, base_config, common, max(args.threads, 2))
    print(f"dense perplexity: {dense}", flush=True)

    jobs = []
    methods = [m.removesuffix(REC) + (REC if args.with_reconstruction else "") for m in args.methods]
    for sp in args.sparsities:
        for method in methods:
            m = method.removesuffix(REC)  # "METHOD+rec": the same method, its kept weights reconstructed
            rec = [f"reconstruct.enabled={str(method.endswith(REC)).lower()}"]
            seeds = args.seeds if (m in PRESETS or m == "random") else [args.seeds[0]]
            for seed in seeds:
                name = job_name(method, sp, seed)
                extra = search_common if m in PINNED_STEPS or args.quick and m in PRESETS else []
                spec = {
                    "method": method,
                    "out": str(out / "runs" / name),
                    "threads": args.threads,
                    "dense_ppl": dense,
                    "overrides": [
                        *common,
                        *extra,
                        *PRESETS.get(m, (None, SINGLE_CHANNELS))[1],
                        *rec,
                        f"search.sparsity={sp}",
                        f"seed={seed}",
                    ],
                    "config": PRESETS[m][0] or base_config if m in PRESETS else base_config,
                    **({} if m in PRESETS else {"baseline": m}),
                }
                jobs.append((name, spec))

    if args.report_only:
        statuses = {name: "cached" for name, _ in jobs}
    else:
        statuses = run_jobs(__file__, out, jobs, args.workers, args.threads)
    write_results(out, jobs, statuses, time.perf_counter() - t0, label)
    return 0 if all(s in ("ok", "cached") for s in statuses.values()) else 1


def finished(jobs: list[tuple[str, dict]]):
    """``(spec, summary)`` of every job whose folder holds a ``summary.json`` (a finished run), in job order."""
    for _, spec in jobs:
        p = Path(spec["out"]) / "summary.json"
        if p.exists():
            yield spec, json.loads(p.read_text())


def plain_search(summary: dict) -> bool:
    """Whether a run with reconstruction searched from where the same run without it starts: no warm start, or one
    won by a candidate's own check-set loss (not by a ``+rec`` entry, a candidate scored re-fit)."""
    ws = summary.get("warm_start")
    if ws is None:
        return True
    from probprune.warmstart import REFIT

    own = {k: v for k, v in ws["check_losses"].items() if not k.endswith(REFIT)}
    return min(own, key=own.get) == ws["chosen"]


def write_results(out: Path, jobs, statuses, wall: float, label: str) -> None:
    import pandas as pd

    rows = []
    for spec, s in finished(jobs):
        lens = sorted(s["pruned_ppl"], key=int)
        row = {
            "method": spec["method"],
            "target_sparsity": float(
                next(o for o in spec["overrides"] if o.startswith("search.sparsity=")).split("=")[1]
            ),
            "seed": s["seed"],
            **{f"ppl_{n}": s["pruned_ppl"][n] for n in lens},
            **({f"init_ppl_{n}": s["init_ppl"][n] for n in lens} if s.get("init_ppl") else {}),
            "prunable_sparsity": s["sparsity"]["prunable"],
            "total_sparsity": s["sparsity"]["total"],
            "params_total": s["params"]["pruned_total"],
            "model": s["model"],
            "uses_gradients": uses_gradients(spec["method"]),
            "wall_seconds": s["wall_seconds"],
            "reconstructed": "reconstruct" in s,
        }
        rows.append(row)
        plain = s.get("without_reconstruction")
        if spec["method"].endswith(REC) and plain and plain_search(s):  # the same run without reconstruction
            rows.append(
                {
                    **row,
                    "method": spec["method"].removesuffix(REC),
                    **{f"ppl_{n}": plain["pruned_ppl"][n] for n in lens},
                    "prunable_sparsity": plain["sparsity"]["prunable"],
                    "total_sparsity": plain["sparsity"]["total"],
                    "params_total": plain["pruned_total"],
                    "reconstructed": False,
                }
            )
    if not rows:
        print(f"no finished jobs under {out / 'runs'}: nothing to report")
        return
    df = pd.DataFrame(rows)
    df.to_csv(out / "quality.csv", index=False)
    short = [c for c in df.columns if c.startswith("ppl_")]
    short = sorted(short, key=lambda c: int(c.split("_")[1]))
    key = short[0]
    dense = json.loads((out / "dense.json").read_text())
    agg = (
        df.groupby(["target_sparsity", "method"])
        .agg(
            **{f"{c}_mean": (c, "mean") for c in short},
            **{f"{c}_min": (c, "min") for c in short},
            **{f"{c}_max": (c, "max") for c in short},
            seeds=("seed", "count"),
            prunable=("prunable_sparsity", "mean"),
            total=("total_sparsity", "mean"),
            wall=("wall_seconds", "mean"),
        )
        .reset_index()
    )
    lines = [
        f"{label}. Dense: " + ", ".join(f"PPL@{n} {v:.2f}" for n, v in sorted(dense.items(), key=lambda x: int(x[0]))),
        "",
    ]
    hdr = "| sparsity (prunable / total) | method | " + " | ".join(f"PPL@{c.split('_')[1]}" for c in short)
    lines += [hdr + " | seeds | wall s |", "|---|---|" + "---|" * len(short) + "---|---|"]
    ratios = []
    for sp, grp in agg.groupby("target_sparsity"):
        for _, r in grp.sort_values(f"{key}_mean").iterrows():
            cells = []
            for c in short:
                if r["seeds"] > 1:
                    cells.append(f"{r[c + '_mean']:.1f} ({r[c + '_min']:.1f}–{r[c + '_max']:.1f})")
                else:
                    cells.append(f"{r[c + '_mean']:.1f}")
            label = r["method"] + (" †" if uses_gradients(r["method"]) else "")
            lines.append(
                f"| {r['prunable']:.1%} / {r['total']:.1%} | {label} | "
                + " | ".join(cells)
                + f" | {int(r['seeds'])} | {r['wall']:.0f} |"
            )
        base = grp[~grp["method"].str.removesuffix(REC).isin(PRESETS)]
        for _, o in grp[grp["method"].str.removesuffix(REC).isin(OURS)].iterrows():
            if not len(base):
                break
            forward_only = base[~base["method"].map(uses_gradients)]
            for c in short:
                best = base.loc[base[f"{c}_mean"].idxmin()]
                against = [(best, best["method"])]
                if uses_gradients(best["method"]) and len(forward_only):  # also the fair match
                    fwd = forward_only.loc[forward_only[f"{c}_mean"].idxmin()]
                    against.append((fwd, f"{fwd['method']} (best forward-only)"))
                for b, name in against:
                    ratios.append(
                        (
                            sp,
                            o["method"],
                            c.replace("ppl_", "PPL@"),
                            name,
                            o[f"{c}_mean"] / b[f"{c}_mean"],
                            o[f"{c}_max"] / b[f"{c}_mean"],
                            o[f"{c}_max"] / o[f"{c}_min"],
                            int(o["seeds"]),
                            o[f"{c}_mean"] / float(dense[c.split("_")[1]]),
                        )
                    )
    lines += ["", "† uses one backward pass (gradients); every other method is forward-only.", ""]
    if ratios:
        lines += [
            "probprune-ours (the default) against the best baseline of each column (where that is Taylor †, also "
            "against the best forward-only one):",
            "",
            "| sparsity | ours | window | best baseline | mean ÷ best | worst seed ÷ best | max ÷ min over seeds "
            "| seeds | mean ÷ dense |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for sp, ours, col, best, mean_r, worst_r, spread, n, vs_dense in ratios:
        lines.append(
            f"| {sp:.0%} | {ours} | {col} | {best} | {mean_r:.3f} | {worst_r:.3f} | {spread:.3f} | {n} "
            f"| {vs_dense:.2f} |"
        )
    lines.append(
        f"\nwall time of the runs (each in its own process): {df['wall_seconds'].sum() / 60:.1f} min in all; "
        f"this invocation: {wall / 60:.1f} min"
    )
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from _common import log_plot

    series = [
        (
            m,
            grp.sort_values("prunable")["prunable"] * 100,
            grp.sort_values("prunable")[f"{key}_mean"],
            "-o" if m.removesuffix(REC) in PRESETS else "--.",
        )
        for m, grp in agg.groupby("method")
    ]
    log_plot(
        out / "quality.png",
        series,
        float(dense[key.split("_")[1]]),
        "prunable-parameter sparsity (%)",
        f"held-out perplexity ({key.replace('ppl_', 'PPL@')}, log)",
        f"{label}, Brown held-out split",
    )


if __name__ == "__main__":
    sys.exit(main())
