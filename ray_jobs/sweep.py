"""Sweep lr x sparsity (x any config key) with Ray Tune: one search per trial, held-out perplexity per trial, the
Pareto front of sparsity vs perplexity, and the best config per sparsity target.

On one machine (a local Ray instance is started and stopped):

    python ray_jobs/sweep.py --config configs/smollm2/135m_sweep.yaml --output benchmarks/results/sweep_smollm2

On a cluster started with ``ray start`` (set ``sweep.storage_path`` to storage every node sees, e.g. NFS or s3://):

    python ray_jobs/sweep.py --config configs/smollm2/135m_sweep.yaml --output runs/sweep --address auto

Override any config field with key=value (``sweep.lr=[0.01,0.03] search.steps=100``); ``--resume`` continues an
interrupted sweep of the same ``--output``. A quick check on this machine (tiny random model, 2 lrs x 2 sparsities,
well under two minutes on 2 CPUs):

    python ray_jobs/sweep.py --smoke-test

Writes ``results.csv`` (every trial), ``pareto.md`` (Pareto table and all trials), ``pareto.png`` and
``best/sparsity_<target>.yaml`` (runs as is with ``probprune prune --config ... --output ...``) and
``sweep_config.yaml`` (the config as given; ``--resume`` must match it) under ``--output``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

from probprune import termination
from probprune.config import load_config
from probprune.config_files import resolve_config
from probprune.errors import UserError

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "smoke_sweep.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ray_jobs/sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML run config with a sweep section (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sweep.lr=[0.01,0.03]")
    p.add_argument("--output", help="results folder (--smoke-test: a temporary folder if not given)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of --output")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"run {SMOKE_CONFIG.relative_to(SMOKE_CONFIG.parents[2])}: 2 lrs x 2 sparsities, tiny model",
    )
    args = p.parse_args(argv)
    if args.smoke_test:
        args.config = args.config or str(SMOKE_CONFIG)
        if not args.output:
            args.output = tempfile.mkdtemp(prefix="probprune-sweep-smoke-") + "/sweep"
            args.overrides = [f"sweep.storage_path={Path(args.output).parent / 'tune'}", *args.overrides]
    if not args.config or not args.output:
        p.error("--config and --output are required (or pass --smoke-test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    termination.install()  # SIGTERM (a scheduler's preemption) stops the sweep like Ctrl-C, Ray starting included
    t0 = time.perf_counter()
    try:
        cfg = load_config(resolve_config(args.config), args.overrides)
        from probprune.engine.ray.tune import run_sweep
        from probprune.sweep import format_report, num_trials, search_space

        if cfg.sweep is not None:
            print(
                f"sweep {cfg.name}: {num_trials(cfg.sweep)} trials over {', '.join(search_space(cfg.sweep))}",
                flush=True,
            )
        df = run_sweep(cfg, args.output, address=args.address, smoke=args.smoke_test, resume=args.resume)
    except UserError as e:
        print(f"probprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        cmd = ["python", "ray_jobs/sweep.py", "--config", args.config, *args.overrides, "--output", args.output]
        cmd += ["--address", args.address] if args.address else []
        return termination.report_interrupt(
            "ray_jobs/sweep.py",
            f"finished trials are kept and the sweep continues with: {shlex.join([*cmd, '--resume'])}",
        )
    print(format_report(df, cfg.sweep, Path(args.output), time.perf_counter() - t0))
    return 0 if (df["status"] == "finished").any() else 1


if __name__ == "__main__":
    sys.exit(main())
