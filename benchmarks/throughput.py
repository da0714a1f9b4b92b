"""Throughput and memory of mask scoring on SmolLM2-135M, each as a ratio next to its target, from one run.

Three measurements per dtype, all on the same device:

1. Scoring speed (this process, ``--threads`` torch threads). Every row scores ``--masks`` masks on one
   ``--batch x --seq-len`` batch (forward + mean next-token loss per mask) and reports tokens/s and the ratio of its
   median wall time to the dense row's (also of CPU time, less disturbed by other processes on a shared machine).
   Rows are interleaved round-robin, one warm-up round, then ``--repeats`` rounds; medians.
     dense             the unmasked model: ``sequence_nll`` (HF forward + loss) once per mask
     masked 50%        ``masked_losses``: the mask multiplied into a dense forward, one mask per forward
     gathered 0%       ``gathered_losses`` with every unit kept: the fast path's own speed against the HF forward
     gathered 30%/50%  ``gathered_losses``: only kept units computed; random masks that remove exactly that share of
                       the KV head groups and of the MLP channels
   ``FLOP bound`` = matmul parameters of the dense model (lm_head included) ÷ those of the pruned one.
   Target: gathered 50% ÷ dense ≥ 1.6.
2. Evaluators (same work as one search step of K=--masks: the same exact-50% masks and batch): ``LocalEngine``
   (fast path) in this process vs ``RayEngine`` with 1 and 2 actors, each actor with ``--threads`` threads (on
   CUDA: every actor on the same GPU, so 2 actors only overlap their kernels). Ratios are ÷ local.
3. Peak memory of a search ÷ peak memory of dense inference, each measured in its own child process that loads the
   model, builds the inputs, resets the peak, does that one thing and reports:
     dense    ``model(input_ids=batch)`` under ``inference_mode``: logits for every position, no loss
     search   ``run_search`` with the local evaluator (fast path), ``--search-steps`` steps of K=2 masks on
              ``--mem-batch x --seq-len`` batches (the paper's 8 x 128), policy at 50 % keep
     idle     nothing (what the loaded model and the libraries hold)
   CPU: peak = the child's VmHWM after a reset (``/proc/self/clear_refs``) taken once the model is loaded, so it is
   the whole resident process (libraries + weights + inputs) at its highest during the work, not the transient peak
   of loading (``ru_maxrss`` of the whole child, loading included, is also recorded). CUDA: peak =
   ``torch.cuda.max_memory_allocated`` (weights + everything allocated during the work). Target: search ÷ dense
   ≤ 1.15. The ratio of the extra memory above the idle child is printed beside it.

Usage:
    python benchmarks/throughput.py --dtype bfloat16 --threads 1 --out benchmarks/results/throughput_cpu.json
    python benchmarks/throughput.py --dtype bfloat16 --device cuda --out benchmarks/results/gpu/throughput.json
Writes the JSON given by ``--out`` and a markdown table next to it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from _common import PeakMemory, exact_mask, flop_bound, machine_info, round_robin, trim_heap

TARGET_SCORING = 1.6  # gathered 50% ÷ dense, at least
TARGET_MEMORY = 1.15  # search peak ÷ dense inference peak, at most


# --------------------------------------------------------------------------------------------------- children
def child(args: argparse.Namespace) -> dict:
    """One memory measurement (``--child idle|dense|search``) in this fresh process; returns MiB figures."""
    import resource

    from probprune.data import CalibrationData
    from probprune.engine.local import LocalEngine
    from probprune.models import get_adapter
    from probprune.models.loading import load_model
    from probprune.policy import Policy, uniform_probs
    from probprune.search import run_search

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    blocks = torch.randint(0, model.config.vocab_size, (64, args.seq_len), generator=gen)  # [n, T]
    batch = blocks[: args.mem_batch].to(device)  # [B, T]
    space = get_adapter(model).mask_space() if args.child == "search" else None
    trim_heap()
    pm = PeakMemory(device)
    base = pm.reset()
    if args.child == "dense":
        with torch.inference_mode():
            model(input_ids=batch, use_cache=False)
    elif args.child == "search":
        policy = Policy(
            space, uniform_probs(space, 0.5), lr=2e-3, total_steps=args.search_steps, sparsity=0.5, seed=args.seed
        )
        evaluator = LocalEngine(model, space, fast_path=True)
        run_search(
            policy,
            evaluator,
            CalibrationData(blocks, seed=args.seed),
            steps=args.search_steps,
            num_samples=2,
            batch_size=args.mem_batch,
            progress=False,
        )
    peak = pm.peak()
    from probprune.losses import LOGIT_ELEMENTS

    return {
        "kind": args.child,
        "method": pm.method,
        "base_mib": base,
        "peak_mib": peak,
        "extra_mib": peak - base,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "logit_elements": LOGIT_ELEMENTS,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def run_child(kind: str, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--dtype",
        dtype,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--model",
        args.model,
        "--seq-len",
        str(args.seq_len),
        "--mem-batch",
        str(args.mem_batch),
        "--search-steps",
        str(args.search_steps),
        "--seed",
        str(args.seed),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {kind!r} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- sections
def scoring(model, adapter, space, batch, masks, args, device) -> list[dict]:
    from probprune.fastpath import gathered_losses
    from probprune.masked_forward import masked_losses, sequence_nll

    head = adapter.lm_head.weight.numel()
    full = np.ones((1, space.num_units), dtype=np.float32)  # [1, N]
    rows = {
        "dense": lambda: [sequence_nll(adapter, batch) for _ in range(args.masks)],
        "masked 50%": lambda: masked_losses(adapter, space, masks[0.5], batch, max_rows=args.batch),
        # all units kept, one call per mask (identical masks in one call are scored once): the fast path's own speed
        "gathered 0%": lambda: [gathered_losses(adapter, space, full, batch) for _ in range(args.masks)],
        "gathered 30%": lambda: gathered_losses(adapter, space, masks[0.3], batch),
        "gathered 50%": lambda: gathered_losses(adapter, space, masks[0.5], batch),
    }
    bound = {
        "dense": 1.0,
        "masked 50%": 1.0,
        "gathered 0%": 1.0,
        "gathered 30%": float(np.mean([flop_bound(space, head, m) for m in masks[0.3]])),
        "gathered 50%": float(np.mean([flop_bound(space, head, m) for m in masks[0.5]])),
    }
    with torch.no_grad():
        wall, cpu = round_robin(rows, args.repeats, warmup=1, device=device)
    tokens = args.masks * args.batch * args.seq_len
    med = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    return [
        {
            "row": n,
            "tokens_per_s": tokens / med[n],
            "vs_dense": med["dense"] / med[n],
            "vs_dense_cpu": med_cpu["dense"] / med_cpu[n],
            "flop_bound": bound[n],
            "median_s": med[n],
            "times_s": wall[n],
            "cpu_s": cpu[n],
        }
        for n in rows
    ]


def evaluators(model, space, batch, masks, dtype, args, device) -> dict:
    from probprune.config import EngineConfig, ModelConfig
    from probprune.engine import ray as distributed
    from probprune.engine.local import LocalEngine

    cuda = device.type == "cuda"
    # 3 actors live at once (1 + 2); on CUDA the GPU shares are scheduling labels: every actor sees the whole GPU
    distributed.connect("local", num_cpus=3 * args.threads, object_store_memory=200 * 1024**2)
    model_cfg = ModelConfig(name_or_path=args.model, dtype=dtype, device="cuda" if cuda else "cpu")

    def engine(n: int) -> EngineConfig:
        return EngineConfig(
            kind="ray",
            num_actors=n,
            cpus_per_actor=args.threads,
            threads=args.threads,
            gpus_per_actor=(0.5 / n if cuda else 0.0),
            fast_path=True,
        )

    local = LocalEngine(model, space, fast_path=True)
    rays = {n: distributed.RayEngine(model_cfg, space, engine(n)) for n in (1, 2)}
    rows = {
        "local": lambda: local.losses(masks, batch.cpu()),
        "ray 1 actor": lambda: rays[1].losses(masks, batch.cpu()),
        "ray 2 actors": lambda: rays[2].losses(masks, batch.cpu()),
    }
    results = {n: fn() for n, fn in rows.items()}  # also a warm-up, and the losses to compare
    wall, _ = round_robin(rows, args.repeats, warmup=0, device=device)
    for ev in rays.values():
        ev.close()
    __import__("ray").shutdown()
    tokens = args.masks * args.batch * args.seq_len
    med = {n: statistics.median(v) for n, v in wall.items()}
    diff = max(float(np.abs(results[n] - results["local"]).max()) for n in rows)
    return {
        "rows": [
            {
                "row": n,
                "tokens_per_s": tokens / med[n],
                "vs_local": med["local"] / med[n],
                "median_s": med[n],
                "times_s": wall[n],
            }
            for n in rows
        ],
        "max_loss_diff_vs_local": diff,
        "actors": (
            "all actors on the same GPU" if cuda else f"{args.threads} CPU / {args.threads} thread(s) per actor"
        ),
    }


def memory(dtype: str, args: argparse.Namespace) -> dict:
    res = {kind: run_child(kind, dtype, args) for kind in ("idle", "dense", "search")}
    idle, dense, search = res["idle"], res["dense"], res["search"]
    return {
        "children": res,
        "method": dense["method"],
        "search_over_dense": search["peak_mib"] / dense["peak_mib"],
        "search_over_dense_extra": (
            (search["peak_mib"] - idle["peak_mib"]) / max(dense["peak_mib"] - idle["peak_mib"], 1e-9)
        ),
    }


def run(dtype: str, args: argparse.Namespace) -> dict:
    from probprune.models import get_adapter
    from probprune.models.loading import load_model

    device = torch.device(args.device)
    model, _ = load_model(args.model, dtype=dtype, device=args.device)
    model.eval()
    adapter = get_adapter(model)
    space = adapter.mask_space()
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=gen).to(device)
    masks = {s: np.stack([exact_mask(space, 1 - s, rng) for _ in range(args.masks)]) for s in (0.3, 0.5)}
    out = {"dtype": dtype, "scoring": scoring(model, adapter, space, batch, masks, args, device)}
    if not args.no_ray:
        out["evaluators"] = evaluators(model, space, batch, masks[0.5], dtype, args, device)
    del model, adapter
    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_memory:
        out["memory"] = memory(dtype, args)
    return out


# --------------------------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    a = res["settings"]
    lines = [
        f"Throughput on {a['model']}, device {a['device']}"
        + (f" ({res['machine']['cuda_device']})" if res["machine"]["cuda_device"] else "")
        + f", {a['threads']} torch thread(s); scoring: {a['masks']} masks x {a['batch']} x {a['seq_len']} tokens "
        f"per call, median of {a['repeats']} interleaved rounds after a warm-up; memory: search of "
        f"{a['search_steps']} steps x 2 masks x {a['mem_batch']} x {a['seq_len']} vs dense inference on one "
        f"{a['mem_batch']} x {a['seq_len']} batch, each in its own process. Load average before/after: "
        f"{res['loadavg_before'][0]:.1f}/{res['machine']['loadavg'][0]:.1f} on {res['machine']['cpus']} CPUs.",
        "",
        "| dtype | measurement | tokens/s (or MiB) | ratio | ratio (CPU time) | bound | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for d in res["results"]:
        dt = d["dtype"]
        for r in d["scoring"]:
            target, met = "", ""
            if r["row"] == "gathered 50%":
                target, met = f"≥ {TARGET_SCORING}", "yes" if r["vs_dense"] >= TARGET_SCORING else "no"
            name = "dense forward" if r["row"] == "dense" else f"{r['row']} scoring ÷ dense"
            lines.append(
                f"| {dt} | {name} | {r['tokens_per_s']:,.0f} | {r['vs_dense']:.2f} | "
                f"{r['vs_dense_cpu']:.2f} | {r['flop_bound']:.2f} | {target} | {met} |"
            )
        if "evaluators" in d:
            for r in d["evaluators"]["rows"]:
                name = "local evaluator" if r["row"] == "local" else f"{r['row']} ÷ local"
                bound = {"local": 1.0, "ray 1 actor": 1.0, "ray 2 actors": 2.0}[r["row"]]
                lines.append(f"| {dt} | {name} | {r['tokens_per_s']:,.0f} | {r['vs_local']:.2f} | | {bound:.2f} | | |")
        if "memory" in d:
            m, c = d["memory"], d["memory"]["children"]
            met = "yes" if m["search_over_dense"] <= TARGET_MEMORY else "no"
            lines.append(
                f"| {dt} | peak memory: search ÷ dense inference | {c['search']['peak_mib']:,.0f} / "
                f"{c['dense']['peak_mib']:,.0f} | {m['search_over_dense']:.3f} | | | ≤ {TARGET_MEMORY} | "
                f"{met} |"
            )
            lines.append(
                f"| {dt} | extra above the loaded model: search ÷ dense | {c['search']['extra_mib']:,.0f} / "
                f"{c['dense']['extra_mib']:,.0f} | {m['search_over_dense_extra']:.2f} | | | | |"
            )
    for d in res["results"]:
        rows = {r["row"]: r for r in d["scoring"]}
        if "gathered 0%" in rows:
            g0 = rows["gathered 0%"]["median_s"]
            lines.append("")
            lines.append(
                f"{d['dtype']}: speed-up from sparsity alone (gathered ÷ gathered 0%): "
                + ", ".join(
                    f"{p} {g0 / rows[f'gathered {p}']['median_s']:.2f}"
                    for p in ("30%", "50%")
                    if f"gathered {p}" in rows
                )
                + "."
            )
    lines += [
        "",
        "ratio: median wall time of dense (or local) ÷ that row's; bound: the FLOP bound for scoring rows "
        "(dense matmul params incl. lm_head ÷ kept), the actor count for Ray rows. Memory: "
        + (res["results"][0]["memory"]["method"] if "memory" in res["results"][0] else "not measured")
        + "; a child's peak includes the resident model and libraries; 'extra' subtracts what that child held "
        "when the peak was reset (model loaded, inputs built).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch threads here, in each Ray actor and in children")
    p.add_argument("--batch", type=int, default=4, help="sequences per mask in the speed rows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--masks", type=int, default=8, help="masks per timed call")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--mem-batch", type=int, default=8, help="sequences per batch in the memory measurement")
    p.add_argument("--search-steps", type=int, default=10, help="search steps in the memory measurement")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray evaluator rows")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write JSON here and markdown next to it (.md)")
    p.add_argument("--child", choices=["idle", "dense", "search"], help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        args.dtype = args.dtype[0]
        print(json.dumps(child(args)))
        return
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    results = [run(dtype, args) for dtype in args.dtype]
    res = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "targets": {"gathered_50_vs_dense_min": TARGET_SCORING, "search_vs_dense_peak_max": TARGET_MEMORY},
        "loadavg_before": load_before,
        "machine": machine_info(args.device),
        "results": results,
    }
    md = markdown(res)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(md)
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
