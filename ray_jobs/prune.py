"""Prune on a Ray cluster: the masks of each search step are scored in parallel by actors holding model replicas.

Start Ray first (``ray start --head``, and ``ray start --address=<head>:6379`` on the other nodes), then run:

    python ray_jobs/prune.py --config configs/llama2/13b_ray_8gpu.yaml --output runs/l2-13b --num-actors 8 --address auto

Override any config field with key=value (``search.steps=2000 engine.gpus_per_actor=1``). A quick check on this
machine (tiny random model, 2 CPU actors, a local Ray instance, well under a minute):

    python ray_jobs/prune.py --smoke-test
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from probprune import termination
from probprune.config import load_config, validate_config
from probprune.config_files import resolve_config
from probprune.errors import UserError
from probprune.pipeline import prune
from probprune.run_folder import format_summary

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "smoke.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ray_jobs/prune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. search.steps=100")
    p.add_argument("--output", help="output folder (--smoke-test: a temporary folder if not given)")
    p.add_argument("--num-actors", type=int, help="Ray actors, one model replica each (default: engine.num_actors)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: engine.address, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the search checkpointed in --output")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"run {SMOKE_CONFIG.relative_to(SMOKE_CONFIG.parents[2])} on 2 CPU actors",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.config = args.config or str(SMOKE_CONFIG)
        args.num_actors = args.num_actors or 2
        args.output = args.output or tempfile.mkdtemp(prefix="probprune-ray-smoke-")
    if not args.config or not args.output:
        p.error("--config and --output are required (or pass --smoke-test)")
    if args.num_actors is not None and args.num_actors < 1:
        p.error(f"--num-actors must be >= 1, got {args.num_actors}")
    return args


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run (its checkpoint in ``--output``)."""
    parts = ["python", "ray_jobs/prune.py", "--config", args.config, *args.overrides, "--output", args.output]
    if args.num_actors is not None:
        parts += ["--num-actors", str(args.num_actors)]
    if args.address is not None:
        parts += ["--address", args.address]
    return shlex.join([*parts, "--resume"])


class CostReport:
    """``on_step`` hook: prints the search-time estimate after the first step, and again from steps 2-5."""

    def __init__(self, steps: int, num_samples: int, num_actors: int):
        self.steps, self.k, self.actors = steps, num_samples, min(num_actors, num_samples)
        self.seen: list[dict] = []

    def __call__(self, stats: dict) -> None:
        self.seen.append(stats)
        n = len(self.seen)
        if n == 1:
            self._print(stats["step"], [stats], "first step, includes warm-up")
        elif n == 5 and self.steps - stats["step"] > 0:
            self._print(stats["step"], self.seen[1:], "median of steps 2-5")

    def _print(self, done: int, window: list[dict], how: str) -> None:
        step_s = statistics.median(s["step_seconds"] for s in window)
        eval_s = statistics.median(s["eval_seconds"] for s in window)
        per_forward = eval_s * self.actors / self.k
        remaining = self.steps - done
        print(
            f"estimated search time: {remaining} more steps x {step_s:.3g} s/step = {remaining * step_s:.0f} s "
            f"({self.k} forwards/step x {per_forward:.3g} s/forward / {self.actors} actors + "
            f"{step_s - eval_s:.3g} s driver; {how})",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    termination.install()  # SIGTERM (a scheduler's preemption) stops the run like Ctrl-C, Ray starting included
    try:
        cfg = load_config(resolve_config(args.config), args.overrides)
        cfg.engine.kind = "ray"
        if args.num_actors is not None:
            cfg.engine.num_actors = args.num_actors
        if args.address is not None:
            cfg.engine.address = args.address
        validate_config(cfg)
        report = CostReport(cfg.search.steps, cfg.search.masks_per_step, cfg.engine.num_actors)
        summary = prune(cfg, args.output, resume=args.resume, progress=not args.no_progress, on_step=report)
    except UserError as e:
        print(f"probprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return termination.report_interrupt(
            "ray_jobs/prune.py", f"the search resumes from its last checkpoint: {resume_command(args)}"
        )
    print(format_summary(summary))
    print(f"\noutput: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
