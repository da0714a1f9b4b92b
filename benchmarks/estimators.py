"""How many forwards does each gradient estimator need to reach the paper preset's final calibration loss?

SmolLM2-135M at 50 % sparsity (``configs/smollm2/135m_paper.yaml``), every estimator from the same Wanda-sp init, on
the same calibration batches (step t uses ``data.batch(t, 8)``), with the same budget of forwards (masks scored, each
on its step's 8 x 128-token batch). The lr schedule (cosine) of every run spans its own budget: budget / K steps.

Calibration loss = mean next-token loss of the policy's deterministic final mask (top units by probability, budget
met exactly) on FIXED held-out calibration blocks (``--eval-blocks`` blocks of the calibration split that no search
batch ever draws), measured at forwards 0, M, 2M, ..., budget (M = ``--every``) for every estimator: the curves are
comparable and free of the noise of sample losses.

forwards-to-target = the first checkpoint at which an estimator's loss ≤ the paper preset's loss at the end of its
budget (the paper's own value can be below the budget if its curve got there earlier); ratio = ours ÷ paper (target
≤ 0.33). With several seeds, every row and the target are per seed and the table shows their mean.

Estimators (``--estimators``; lr = the paper's lr times the factor that keeps the EXPECTED update per forward equal
to the paper's: E[g] is K/(K-1)·∇ for ``ema`` and ∇ for ``loo``, one step costs K forwards, so ``loo`` gets K·lr and
``ema`` (K-1)·lr; ``...-lr1x`` keeps the paper's lr per step):
  ours                 our default: ``configs/smollm2/135m_quickstart.yaml``'s mask space (channel blocks), method,
                       K, baseline, sampling and lr, on the same 8 x 128-token forwards as every other row
  paper                K=2, EMA baseline (window 5), independent sampling, lr as configured (2e-3)
  loo-k4               K=4, leave-one-out baseline, lr x4
  loo-k8               K=8, leave-one-out baseline, lr x8
  loo-k4-antithetic    K=4, leave-one-out, antithetic pairs (u, 1-u), lr x4
  loo-k4-lr1x          K=4, leave-one-out, the paper's lr per step
  paper-antithetic     K=2, EMA, antithetic pairs, lr as configured
  ema-k8               K=8, EMA baseline, lr x7

Resumable: each run checkpoints under ``--work`` (``run_search``'s own checkpoints) at every evaluation point and
the CSV gets a row right after; rerunning the same command skips what is done and continues the rest.

Usage (≈ 20 CPU-minutes at the defaults, one thread; 3 seeds of paper, ours and loo-k8 at --every 16 took 31 min):
    python benchmarks/estimators.py --out benchmarks/results
Writes ``OUT/estimators.csv`` (one row per estimator, seed and checkpoint) and ``OUT/estimators.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "configs/smollm2/135m_paper.yaml"
OURS_CONFIG = ROOT / "configs/smollm2/135m_quickstart.yaml"
OURS = "ours"
TARGET_RATIO = 0.33

# name -> (K, baseline, sampling, lr factor); factor "match" = same expected update per forward as the paper
ESTIMATORS: dict[str, tuple[int, str, str, float | str]] = {
    "paper": (2, "ema", "independent", 1.0),
    "loo-k4": (4, "loo", "independent", "match"),
    "loo-k8": (8, "loo", "independent", "match"),
    "loo-k4-antithetic": (4, "loo", "antithetic", "match"),
    "loo-k4-lr1x": (4, "loo", "independent", 1.0),
    "paper-antithetic": (2, "ema", "antithetic", 1.0),
    "ema-k8": (8, "ema", "independent", "match"),
}
DEFAULT = ["paper", OURS, "loo-k4", "loo-k8", "loo-k4-antithetic"]
FIELDS = [
    "estimator",
    "seed",
    "forwards",
    "steps",
    "eval_loss",
    "sample_loss_mean",
    "heads_changed",
    "channels_changed",
    "k",
    "baseline",
    "sampling",
    "lr",
    "wall_s",
]


def estimator_lr(name: str, paper_lr: float, paper_k: int = 2) -> float:
    """The estimator's lr: the paper's times its factor (``match``: equal expected update per forward)."""
    k, baseline, _, factor = ESTIMATORS[name]
    if factor != "match":
        return paper_lr * float(factor)
    per_forward = paper_lr * (paper_k / (paper_k - 1)) / paper_k  # paper: E[g] = K/(K-1)·∇ per K forwards
    gain = k / (k - 1) if baseline == "ema" else 1.0
    return per_forward * k / gain


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [
            {k: (v if k in ("estimator", "baseline", "sampling") else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


# ------------------------------------------------------------------------------------------------------- runs
class Arm:
    """A mask space and the policy to search it with: the paper's space (every ESTIMATORS row) or our default's."""

    def __init__(self, bench: Bench, path: Path, overrides: list[str]):
        from dataclasses import replace

        from probprune import projection
        from probprune.config import load_config
        from probprune.pipeline import build_space, initial_probs

        self.path, self.overrides = path, overrides
        self.cfg = cfg = load_config(path, overrides)
        self.space = space = build_space(cfg, bench.session.adapter, bench.session.stats)
        self.init_probs = initial_probs(replace(bench.session, cfg=cfg, space=space))
        self.init_mask = projection.final_mask(
            space, torch.as_tensor(self.init_probs), cfg.search.sparsity, cfg.search.budget
        )


class Bench:
    """Model, data, eval blocks, Wanda-sp statistics and the two mask spaces, loaded once."""

    def __init__(self, args: argparse.Namespace):
        from probprune.config import load_config
        from probprune.data import CalibrationData
        from probprune.importance import collect_input_stats
        from probprune.pipeline import prepare

        base = load_config(PAPER_CONFIG)
        n_search = base.data.calib_blocks
        self.cfg = load_config(PAPER_CONFIG, [f"data.calib_blocks={n_search + args.eval_blocks}"])
        s = prepare(self.cfg, need_stats=False)
        s.progress = False
        gen = torch.Generator().manual_seed(12345)  # which blocks are held out: fixed, independent of --seeds
        perm = torch.randperm(len(s.calib), generator=gen)
        self.eval_blocks = s.calib.blocks[perm[: args.eval_blocks].sort().values]  # [E, T]
        self.data = CalibrationData(s.calib.blocks[perm[args.eval_blocks :].sort().values], seed=self.cfg.seed)
        s.calib = self.data
        s.stats = collect_input_stats(s.adapter, self.data.first(self.cfg.search.init_blocks))
        self.session = s
        blocks = f"data.calib_blocks={self.cfg.data.calib_blocks}"
        self.paper = Arm(self, PAPER_CONFIG, [blocks])
        # our default, on the paper's tokens per forward (batch) and sparsity: only the search itself differs
        self.ours = Arm(
            self,
            OURS_CONFIG,
            [blocks, f"search.batch_size={self.cfg.search.batch_size}", f"search.sparsity={self.cfg.search.sparsity}"],
        )

    def eval_loss(self, space, mask: np.ndarray) -> float:
        from probprune.fastpath import gathered_losses

        return float(gathered_losses(self.session.adapter, space, mask[None], self.eval_blocks)[0])

    @staticmethod
    def changed(arm: Arm, mask: np.ndarray) -> tuple[int, int]:
        """Units kept now but not in the init mask, per type (= units swapped in; the budget is exact)."""
        t = arm.space.unit_type
        swapped = (mask > 0.5) & (arm.init_mask < 0.5)
        return int(swapped[t == 0].sum()), int(swapped[t == 1].sum())


def run_estimator(bench: Bench, name: str, seed: int, args: argparse.Namespace, out_csv: Path) -> None:
    from probprune.config import load_config
    from probprune.engine.local import LocalEngine
    from probprune.engine.tasks import input_stats
    from probprune.pipeline import build_policy
    from probprune.search import run_search

    sc = bench.cfg.search
    if name == OURS:
        arm = bench.ours
        oc = arm.cfg.search
        k, baseline, sampling, lr = oc.masks_per_step, oc.baseline, oc.sampling, oc.lr
    else:
        arm = bench.paper
        k, baseline, sampling, _ = ESTIMATORS[name]
        lr = estimator_lr(name, sc.lr, sc.masks_per_step)
    if args.every % k or args.budget % args.every:
        raise SystemExit(
            f"--every ({args.every}) must be a multiple of K={k} ({name}) and divide --budget ({args.budget})"
        )
    steps, chunk = args.budget // k, args.every // k
    done = {int(r["forwards"]) for r in read_rows(out_csv) if r["estimator"] == name and int(r["seed"]) == seed}
    if all(c * k in done for c in range(0, steps + 1, chunk)):
        print(f"{name} seed {seed}: done")
        return
    space = arm.space
    meta = {"estimator": name, "seed": seed, "k": k, "baseline": baseline, "sampling": sampling, "lr": lr}
    if 0 not in done:
        append_row(
            out_csv,
            {
                **meta,
                "forwards": 0,
                "steps": 0,
                "eval_loss": bench.eval_loss(space, arm.init_mask),
                "sample_loss_mean": math.nan,
                "heads_changed": 0,
                "channels_changed": 0,
                "wall_s": 0.0,
            },
        )
    cfg = load_config(
        arm.path,
        [
            *arm.overrides,
            f"search.steps={steps}",
            f"search.masks_per_step={k}",
            f"search.baseline={baseline}",
            f"search.sampling={sampling}",
            f"search.lr={lr}",
            f"seed={seed}",
        ],
    )
    evaluator = LocalEngine(bench.session.model, space, fast_path=True)
    stats = bench.session.stats or evaluator.run(input_stats, bench.session.init_blocks())
    policy = build_policy(cfg, space, arm.init_probs, evaluator, stats)
    work = args.work / f"{name}_seed{seed}"
    fingerprint = json.dumps(
        {
            **meta,
            "budget": args.budget,
            "eval_blocks": args.eval_blocks,
            "mask": vars(arm.cfg.mask),
            "method": arm.cfg.search.method,
        }
    )
    for stop in range(chunk, steps + 1, chunk):
        if stop * k in done:
            continue
        losses: list[float] = []
        t0 = time.perf_counter()
        res = run_search(
            policy,
            evaluator,
            bench.data,
            steps=steps,
            num_samples=k,
            batch_size=sc.batch_size,
            checkpoint_dir=work,
            checkpoint_every=steps,
            resume=True,
            fingerprint=fingerprint,
            progress=False,
            stop_after=stop,
            on_step=lambda st, losses=losses: losses.append(st["loss_mean"]),
        )
        if policy.step_count != stop:
            raise SystemExit(
                f"{work} holds a checkpoint at step {policy.step_count}, past step {stop} that "
                f"{out_csv} lacks: delete that folder (or restore the CSV) and run again"
            )
        mask = res.final_mask
        heads, chans = bench.changed(arm, mask)
        row = {
            **meta,
            "forwards": stop * k,
            "steps": stop,
            "eval_loss": bench.eval_loss(space, mask),
            "sample_loss_mean": float(np.nanmean(losses)) if losses else math.nan,
            "heads_changed": heads,
            "channels_changed": chans,
            "wall_s": time.perf_counter() - t0,
        }
        append_row(out_csv, row)
        print(
            f"{name} seed {seed}: {row['forwards']:>4} forwards  eval loss {row['eval_loss']:.4f}  "
            f"samples {row['sample_loss_mean']:.3f}  swapped heads {heads} channels {chans}  "
            f"({row['wall_s']:.0f} s)",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------------ report
def summarise(rows: list[dict], names: list[str], budget: int) -> dict:
    """Per estimator: mean curve over seeds, final loss, forwards-to-target and ratio ÷ paper (per seed, then mean)."""
    seeds = sorted({int(r["seed"]) for r in rows if r["estimator"] == "paper"})
    curve = {(r["estimator"], int(r["seed"])): {} for r in rows}
    for r in rows:
        curve[(r["estimator"], int(r["seed"]))][int(r["forwards"])] = r["eval_loss"]
    out: dict[str, dict] = {}
    for name in names:
        per_seed = []
        for seed in seeds:
            paper, mine = curve.get(("paper", seed), {}), curve.get((name, seed), {})
            if budget not in paper or budget not in mine:
                continue
            target = paper[budget]

            def reach(c: dict, target: float = target) -> float:
                hit = [f for f in sorted(c) if c[f] <= target + 1e-12]
                return float(hit[0]) if hit else math.inf

            per_seed.append(
                {"seed": seed, "target": target, "final": mine[budget], "ftt": reach(mine), "paper_ftt": reach(paper)}
            )
        if not per_seed:
            continue
        pts = sorted({f for (n, _), c in curve.items() if n == name for f in c})
        mean_curve = {f: float(np.mean([curve[(name, s["seed"])][f] for s in per_seed])) for f in pts}
        ratios = [s["ftt"] / s["paper_ftt"] if s["paper_ftt"] > 0 else math.nan for s in per_seed]
        r0 = next(r for r in rows if r["estimator"] == name)
        out[name] = {
            "k": int(r0["k"]),
            "baseline": r0["baseline"],
            "sampling": r0["sampling"],
            "lr": r0["lr"],
            "curve": mean_curve,
            "final": float(np.mean([s["final"] for s in per_seed])),
            "ftt": float(np.mean([s["ftt"] for s in per_seed])),
            "ratio": float(np.mean(ratios)),
            "seeds": len(per_seed),
            "target": float(np.mean([s["target"] for s in per_seed])),
        }
    return out


def markdown(summary: dict, args: argparse.Namespace, dense_loss: float | None, info: str) -> str:
    pts = sorted({f for s in summary.values() for f in s["curve"]})
    head = (
        "| estimator | K | baseline | sampling | lr | "
        + " | ".join(f"@{f}" for f in pts)
        + " | forwards to target | ÷ paper | ≤ 0.33 |"
    )
    lines = [info, "", head, "|" + "---|" * 5 + "---:|" * len(pts) + "---:|---:|---|"]
    for name, s in summary.items():
        cells = [name, str(s["k"]), s["baseline"], s["sampling"], f"{s['lr']:.3g}"]
        cells += [f"{s['curve'][f]:.4f}" if f in s["curve"] else "" for f in pts]
        ftt = "not reached" if math.isinf(s["ftt"]) else f"{s['ftt']:.0f}"
        if name == "paper":
            ratio = met = ""
        elif math.isnan(s["ratio"]):  # the paper preset ended no better than the init: nothing to reach
            ratio, met = "n/a", ""
        else:
            ratio = "inf" if math.isinf(s["ratio"]) else f"{s['ratio']:.2f}"
            met = "yes" if s["ratio"] <= TARGET_RATIO else "no"
        lines.append("| " + " | ".join(cells + [ftt, ratio, met]) + " |")
    target = summary.get("paper", {}).get("target")
    lines += [
        "",
        f"Columns @F: held-out calibration loss (nats/token) of the policy's final mask after F forwards "
        f"(mean over {max((s['seeds'] for s in summary.values()), default=0)} seed(s)). Target = the paper "
        f"preset's loss at {args.budget} forwards"
        + (f" = {target:.4f}" if target is not None else "")
        + (f"; dense model: {dense_loss:.4f}" if dense_loss is not None else "")
        + ".",
    ]
    ranked = sorted((s["ftt"], s["final"], n) for n, s in summary.items() if n != "paper")
    if ranked:
        lines.append(f"Fewest forwards to the target (ties: lower final loss): **{ranked[0][2]}**.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimators", nargs="+", default=DEFAULT, choices=[OURS, *ESTIMATORS])
    ap.add_argument("--budget", type=int, default=160, help="forwards (masks scored) per run")
    ap.add_argument("--every", type=int, default=32, help="evaluate every this many forwards (a multiple of each K)")
    ap.add_argument("--eval-blocks", type=int, default=8, help="held-out calibration blocks for the eval loss")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="policy seeds (mask draws)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench_estimators", help="checkpoints (resume)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the markdown from the CSV")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    out_csv = args.out / "estimators.csv"
    names = ["paper"] + [n for n in args.estimators if n != "paper"]
    extra_path = args.work / "dense_loss.json"
    t0 = time.perf_counter()
    if not args.report_only:
        bench = Bench(args)
        if not extra_path.exists():
            dense = float(bench.eval_loss(bench.paper.space, np.ones(bench.paper.space.num_units, dtype=np.float32)))
            extra_path.write_text(json.dumps({"dense_eval_loss": dense}))
        for seed in args.seeds:
            for name in names:
                run_estimator(bench, name, seed, args, out_csv)
    dense_loss = json.loads(extra_path.read_text())["dense_eval_loss"] if extra_path.exists() else None
    summary = summarise(read_rows(out_csv), names, args.budget)
    info = (
        f"Estimators on SmolLM2-135M (bf16, {args.threads} thread), 50 % of head groups and of channels "
        f"(paper preset: per-type budget, Wanda-sp init, batch 8 x 128, cosine lr over each run's "
        f"{args.budget} forwards), seeds {args.seeds}; eval on {args.eval_blocks} fixed held-out calibration "
        f"blocks every {args.every} forwards."
    )
    if OURS in names:
        from probprune.config import load_config

        oc = load_config(OURS_CONFIG)
        info += (
            f" **ours** = {OURS_CONFIG.relative_to(ROOT)}: {oc.search.method} search over head groups and "
            f"{oc.mask.channel_block}-channel blocks ({oc.mask.block_order} order), K={oc.search.masks_per_step}, "
            f"{oc.search.baseline} baseline, lr {oc.search.lr:g}."
        )
    md = markdown(summary, args, dense_loss, info)
    (args.out / "estimators.md").write_text(md)
    print(md)
    print(f"wrote {out_csv} and {args.out / 'estimators.md'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
