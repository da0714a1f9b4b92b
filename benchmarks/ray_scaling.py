"""Does scoring masks on Ray actors scale? SmolLM2-135M, the same work on the local evaluator and on Ray actors.

Every row scores the same K masks (sampled from a uniform 50 % policy, as a search step would) on the same B x T
batch, for several repeats with a fresh batch and fresh masks each; rows are interleaved round-robin so that load from
other processes hits all of them alike, and the median after one warm-up round is reported.

Rows:
  local 1 thread      LocalEngine in this process, torch.set_num_threads(1)
  local 2 threads     the same with 2 threads
  ray 1x1             RayEngine, 1 actor x 1 thread (what Ray costs over local 1 thread)
  ray 2x1             RayEngine, 2 actors x 1 thread (K/2 masks each)

Then a short search (``run_search``) on the 2-actor evaluator measures the driver's overhead per step: sampling and
the policy update (``driver_seconds``) plus putting masks and batch into the object store (broadcast) plus the wait
beyond the slowest actor's compute (dispatch + gather), as a share of the step time.

Usage:
    python benchmarks/ray_scaling.py --dtype float32 --out benchmarks/results/ray_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from probprune.config import EngineConfig, ModelConfig
from probprune.data import CalibrationData
from probprune.engine.local import LocalEngine
from probprune.models import get_adapter
from probprune.models.loading import load_model
from probprune.policy import Policy, uniform_probs
from probprune.search import run_search


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--masks", type=int, default=8, help="K masks per step")
    p.add_argument("--batch", type=int, default=4, help="B sequences per mask")
    p.add_argument("--seq-len", type=int, default=128, help="T tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--keep", type=float, default=0.5, help="keep probability of the sampled masks")
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false", help="masked dense forward instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from probprune.engine import ray as distributed

    load_before = os.getloadavg()
    torch.set_num_threads(2)
    model, _ = load_model(args.model, dtype=args.dtype)
    space = get_adapter(model).mask_space()
    tokens = args.masks * args.batch * args.seq_len
    gen = torch.Generator().manual_seed(args.seed)
    blocks = torch.randint(0, model.config.vocab_size, (64, args.seq_len), generator=gen)  # [n, T]
    data = CalibrationData(blocks, seed=args.seed)
    policy = Policy(
        space, uniform_probs(space, args.keep), lr=0.0, total_steps=1, sparsity=1 - args.keep, seed=args.seed
    )
    work = [(policy.sample(args.masks).numpy(), data.batch(r, args.batch)) for r in range(args.repeats + 1)]

    distributed.connect("local", num_cpus=3, object_store_memory=200 * 1024**2)  # 3 logical CPUs: 1 + 2 actors
    model_cfg = ModelConfig(name_or_path=args.model, dtype=args.dtype)

    def ray_engine(n: int) -> EngineConfig:
        return EngineConfig(kind="ray", num_actors=n, cpus_per_actor=1, threads=1, fast_path=args.fast_path)

    local = LocalEngine(model, space, fast_path=args.fast_path)
    ray1 = distributed.RayEngine(model_cfg, space, ray_engine(1))
    ray2 = distributed.RayEngine(model_cfg, space, ray_engine(2))

    def local_threads(n: int):
        def run(masks, batch):
            torch.set_num_threads(n)
            return local.losses(masks, batch)

        return run

    rows = {
        "local 1 thread": local_threads(1),
        "local 2 threads": local_threads(2),
        "ray 1x1": ray1.losses,
        "ray 2x1": ray2.losses,
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    losses: dict[str, list[np.ndarray]] = {name: [] for name in rows}
    for r, (masks, batch) in enumerate(work):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            out = fn(masks, batch)
            if r > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
                losses[name].append(out)
    torch.set_num_threads(2)
    max_diff = max(
        float(np.abs(np.concatenate(losses[n]) - np.concatenate(losses["local 1 thread"])).max()) for n in rows
    )
    median = {n: statistics.median(t) for n, t in times.items()}
    table = [
        {"row": n, "median_seconds": median[n], "tokens_per_second": tokens / median[n], "seconds": times[n]}
        for n in rows
    ]

    # driver overhead of a search step on the 2-actor evaluator
    ray1.close()
    steps: list[dict] = []

    def on_step(stats: dict) -> None:
        steps.append(
            {
                **stats,
                "broadcast_seconds": ray2.last_broadcast_seconds,
                "gather_seconds": ray2.last_gather_seconds,
                "busy_seconds": max(ray2.last_busy_seconds),
            }
        )

    search_policy = Policy(
        space,
        uniform_probs(space, args.keep),
        lr=0.02,
        total_steps=args.repeats + 1,
        sparsity=1 - args.keep,
        seed=args.seed,
    )
    run_search(
        search_policy,
        ray2,
        data,
        steps=args.repeats + 1,
        num_samples=args.masks,
        batch_size=args.batch,
        progress=False,
        on_step=on_step,
    )
    ray2.close()
    __import__("ray").shutdown()
    timed = steps[1:]  # step 1 is a warm-up

    def med(key: str) -> float:
        return statistics.median(s[key] for s in timed)

    overhead = {
        "step_seconds": med("step_seconds"),
        "policy_seconds": med("driver_seconds"),  # sample + update, outside the evaluator
        "broadcast_seconds": med("broadcast_seconds"),
        "gather_seconds": med("gather_seconds"),  # dispatch + result return beyond the slowest actor's compute
        "slowest_actor_compute_seconds": med("busy_seconds"),
    }
    overhead["driver_overhead_seconds"] = (
        overhead["policy_seconds"] + overhead["broadcast_seconds"] + overhead["gather_seconds"]
    )
    overhead["driver_overhead_percent"] = 100 * overhead["driver_overhead_seconds"] / overhead["step_seconds"]

    speedups = {
        "ray 2x1 / local 1 thread": median["local 1 thread"] / median["ray 2x1"],
        "ray 2x1 / local 2 threads": median["local 2 threads"] / median["ray 2x1"],
        "ray 1x1 / local 1 thread": median["local 1 thread"] / median["ray 1x1"],
        "local 2 threads / local 1 thread": median["local 1 thread"] / median["local 2 threads"],
    }
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "fast_path": args.fast_path,
        "masks": args.masks,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_call": tokens,
        "repeats": args.repeats,
        "keep": args.keep,
        "units": space.num_units,
        "rows": table,
        "speedups": speedups,
        "driver_overhead": overhead,
        "max_loss_diff_vs_local": max_diff,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": __import__("ray").__version__,
        },
    }
    print(
        f"{args.model} {args.dtype}, fast_path={args.fast_path}: {args.masks} masks x {args.batch} x "
        f"{args.seq_len} tokens = {tokens} tokens per call, median of {args.repeats} after a warm-up"
    )
    print(f"{'row':<18}{'seconds':>10}{'tokens/s':>12}")
    for row in table:
        print(f"{row['row']:<18}{row['median_seconds']:>10.3f}{row['tokens_per_second']:>12.0f}")
    for k, v in speedups.items():
        print(f"speed-up {k}: {v:.2f}x")
    o = overhead
    print(
        f"driver overhead per step (2 actors): {o['driver_overhead_seconds'] * 1e3:.1f} ms of "
        f"{o['step_seconds']:.3f} s = {o['driver_overhead_percent']:.2f} % (policy {o['policy_seconds'] * 1e3:.1f} ms, "
        f"broadcast {o['broadcast_seconds'] * 1e3:.1f} ms, dispatch+gather {o['gather_seconds'] * 1e3:.1f} ms)"
    )
    print(
        f"max |loss difference| to local 1 thread: {max_diff:.2e}; load average before/after: "
        f"{load_before[0]:.1f}/{result['machine']['loadavg_after'][0]:.1f} on {os.cpu_count()} CPUs"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
