"""Costs across model sizes: random-initialised LLaMA-architecture models of about 135M, 360M and 1B parameters.

    python benchmarks/scaling.py --out benchmarks/results/scaling      # ≈ 20 min on a quiet 2-core CPU, ≈ 10 GB RAM

For every size (bf16 on CPU, one thread per process; real shapes: SmolLM2-135M, SmolLM2-360M, and a 1B model with
Llama-3.2-1B's layer shapes and SmolLM2's vocabulary), each part in its own process:

- ``bench``: seconds per mask-forward on the fast path (a random mask keeping 50 % of head groups and channels,
  ``--batch`` x ``--seq-len`` tokens) and of a dense forward; peak RSS of a search step (``--masks`` masks scored)
  ÷ peak RSS of a dense forward of the same batch (both include the weights).
- ``driver``: ``probprune prune`` with ``engine.kind: ray`` (2 actors) on the model saved as a folder: the driver's
  own peak RSS (``VmHWM``: the driver process only, not its actors) and, for contrast, the peak RSS
  of the process that holds the model with the local engine (``bench``'s inference peak).
- ``ray``: a search step's wall time with 1 Ray actor ÷ with 2 (``--ray-batch`` x ``--seq-len`` tokens per mask;
  ``--masks`` masks per step: whole masks per actor; one mask: its batch rows split over the actors).

Then the cost model is fitted to the measured sizes instead of one: seconds per mask-forward
``t(P) = c0 + P x tokens / R`` (P: matmul parameters a token passes through under the mask, lm_head included; R: the
effective rate in parameter-tokens per second), by least squares, with each size's relative error. With R of a GPU
(``--gpu-tflops`` x ``--mfu`` / 2; an assumption until ``benchmarks/gpu.sh`` measures it) the same form predicts
the paper's search (15,000 steps x 2 masks x 8 x 128 tokens) for LLaMA-2 7B / 13B / 70B on 1 / 8 / 64 GPUs, with
the fast path's 50 % speed-up taken from the fit (P under the mask) and every replica busy (with fewer masks than
replicas the Ray evaluator splits each mask's batch rows over them). Writes ``OUT/scaling.json`` and ``OUT/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name -> LlamaConfig fields (vocabulary: SmolLM2's 49,152, tied embeddings)
    "135M": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    "360M": dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5
    ),
    "1B": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}
KEEP = 0.5


def build(size: str, device: str = "cpu"):
    """The random model of ``size`` (seed 0, bf16, on ``device``) and its mask space."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from probprune.models.registry import get_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        **SIZES[size],
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).to(device).eval()
    return model, get_adapter(model).mask_space()


def job_bench(size: str, args) -> dict:
    import torch
    from _common import PeakMemory, exact_mask, sync

    from probprune.engine.local import LocalEngine

    torch.set_num_threads(1)
    model, space = build(size, args.device)
    rng = np.random.default_rng(0)
    masks = np.stack([exact_mask(space, KEEP, rng) for _ in range(args.masks)])  # [K, N]
    batch = torch.randint(0, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    lm_head = model.config.vocab_size * model.config.hidden_size
    ev = LocalEngine(model, space, fast_path=True, threads=1)
    mem = PeakMemory(args.device)

    def dense():
        with torch.no_grad():
            model(batch.to(args.device))
        sync(args.device)

    def step():
        ev.losses(masks, batch)
        sync(args.device)

    dense()
    step()  # warm-up
    base = mem.reset()
    dense()
    inference_peak = mem.peak()
    mem.reset()
    step()
    search_peak = mem.peak()
    dense_s, step_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        dense()
        dense_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - t)
    kept = float(np.mean([space.kept_params(m) for m in masks]))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_dense": space.prunable_params + lm_head,
        "matmul_masked": kept + lm_head,
        "tokens": args.batch * args.seq_len,
        "device": args.device,
        "dense_forward_s": statistics.median(dense_s),
        "mask_forward_s": statistics.median(step_s) / args.masks,
        "search_steps_per_s": 1 / statistics.median(step_s),
        "rss_after_load_mib": base,
        "inference_peak_mib": inference_peak,
        "search_peak_mib": search_peak,
        "search_over_inference": search_peak / inference_peak,
        "memory_method": mem.method,
    }


def job_save(size: str, args) -> dict:
    """Saves the random model of ``size`` (with SmolLM2's tokenizer) as ``args.work / size``."""
    from probprune.models.loading import load_model

    model, _ = build(size)
    _, tok = load_model("embedded:smollm2-135m", dtype="float32")
    folder = args.work / size
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"folder": str(folder)}


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss`` it does not carry over the parent's peak
    across ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job_driver(folder: str, args) -> dict:
    import torch

    from probprune.config import load_config
    from probprune.pipeline import prune

    torch.set_num_threads(1)
    cfg = load_config(
        ROOT / "configs" / "smollm2" / "135m_quickstart.yaml",
        [
            f"model.name_or_path={folder}",
            "model.dtype=bfloat16",
            "engine.kind=ray",
            "engine.num_actors=2",
            "engine.cpus_per_actor=1",
            "engine.threads=1",
            "search.steps=2",
            f"search.masks_per_step={args.masks}",
            f"search.batch_size={args.batch}",
            "search.init=wanda-sp",
            "search.check_blocks=0",
            "search.init_blocks=4",
            "data.calib_blocks=16",
            "eval.seq_lens=[128]",
            "eval.max_tokens=512",
        ],
    )
    out = Path(tempfile.mkdtemp(prefix="probprune-scaling-")) / "run"
    t = time.perf_counter()
    summary = prune(cfg, out, progress=False)
    return {
        "driver_peak_rss_mib": peak_rss_mib(),
        "prune_wall_s": time.perf_counter() - t,
        "pruned_ppl": summary["pruned_ppl"],
        "output": str(out),
    }


def job_ray(folder: str, args) -> dict:
    import torch
    from _common import exact_mask

    from probprune.config import EngineConfig, ModelConfig
    from probprune.engine import ray as distributed
    from probprune.models.loading import load_skeleton
    from probprune.models.registry import get_adapter

    skeleton, _ = load_skeleton(folder, "bfloat16")
    space = get_adapter(skeleton).mask_space()
    rng = np.random.default_rng(0)
    masks = np.stack([exact_mask(space, KEEP, rng) for _ in range(args.masks)])
    batch = torch.randint(0, 49152, (args.ray_batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    distributed.connect("local", num_cpus=2, object_store_memory=200 * 1024**2)
    out = {}
    for n in (1, 2):
        engine = EngineConfig(kind="ray", num_actors=n, cpus_per_actor=1, threads=1)
        with distributed.RayEngine(ModelConfig(name_or_path=folder, dtype="bfloat16"), space, engine) as ev:
            for k in (args.masks, 1):
                ev.losses(masks[:k], batch)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    ev.losses(masks[:k], batch)
                    times.append(time.perf_counter() - t)
                out[f"step_s_k{k}_actors{n}"] = statistics.median(times)
    for k in (args.masks, 1):
        out[f"speedup_k{k}_2_over_1"] = out[f"step_s_k{k}_actors1"] / out[f"step_s_k{k}_actors2"]
    return out


def run_job(kind: str, target: str, args) -> dict:
    """``python scaling.py --job KIND TARGET``: one part in a fresh process (its own peak memory, its own Ray)."""
    cmd = [
        sys.executable,
        __file__,
        "--job",
        kind,
        target,
        "--batch",
        str(args.batch),
        "--ray-batch",
        str(args.ray_batch),
        "--seq-len",
        str(args.seq_len),
        "--masks",
        str(args.masks),
        "--repeats",
        str(args.repeats),
        "--out",
        str(args.out),
        "--device",
        args.device,
        "--work",
        str(args.work),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
    }
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {target} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind} {Path(target).name}: {time.perf_counter() - t:.0f} s {json.dumps(res)}", flush=True)
    return res


# --------------------------------------------------------------------------------------------------- the fit
def fit(points: list[dict]) -> dict:
    """``t = c0 + x / R`` (``x`` = matmul parameters under the mask x tokens) by least squares on the relative error
    (the sizes span 10x in time: absolute errors would let the largest decide the fit); the relative errors."""
    x = np.array([p["matmul_masked"] * p["tokens"] for p in points], dtype=np.float64)
    t = np.array([p["mask_forward_s"] for p in points], dtype=np.float64)
    a = np.stack([np.ones_like(x), x], 1)
    (c0, inv_r), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    pred = c0 + inv_r * x
    return {
        "c0_s": float(c0),
        "rate_param_tokens_per_s": float(1 / inv_r),
        "rel_error": [float(e) for e in (pred - t) / t],
        "max_abs_rel_error": float(np.abs((pred - t) / t).max()),
    }


def predict(f: dict, gpu_tflops: float, mfu: float, gpus: list[int], gpu_mem_gib: float) -> list[dict]:
    """Minutes of the paper's search on LLaMA-2 7B/13B/70B: the fitted form with a GPU's rate ``mfu x peak / 2``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cost_model import MODELS, replica_gpus, search_tokens

    rate = mfu * gpu_tflops * 1e12 / 2  # parameter-tokens per second: 2 FLOPs per matmul parameter per token
    forwards = 15000 * 2
    tokens_per_forward = search_tokens(15000, 2, 8, 128) // forwards
    rows = []
    for name, shape in MODELS.items():
        kept = KEEP * shape.prunable + shape.vocab * shape.hidden  # 50 % of head groups and channels kept
        per_forward = tokens_per_forward * kept / rate  # c0 (launch overhead on a GPU) is left out: see the notes
        per_replica = replica_gpus(shape, gpu_mem_gib)
        row = {"model": name, "gpus_per_replica": per_replica, "forward_s": per_forward, "minutes": {}}
        for n in gpus:
            replicas = n // per_replica
            # every replica busy: whole masks when K >= replicas, else each mask's rows split over them
            row["minutes"][n] = math.inf if replicas == 0 else forwards * per_forward / replicas / 60
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=2, help="sequences per mask-forward (bench, driver)")
    ap.add_argument(
        "--ray-batch",
        type=int,
        default=8,
        help="sequences per mask in the Ray step timings (the paper's 8: the rows a split shares)",
    )
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--masks", type=int, default=2, help="masks per search step (the paper's K)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where bench runs (cuda: only the bench part, see --parts)")
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["bench", "driver", "ray"],
        choices=["bench", "driver", "ray"],
        help="driver and ray measure CPU actors and the driver process",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "probprune-scaling",
        help="where the random models are saved as folders (≈ 2.5 GB)",
    )
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s per GPU (H100/H200)")
    ap.add_argument("--mfu", type=float, default=0.3, help="assumed model FLOP utilisation of a masked forward")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="refit and rewrite the report from OUT/scaling.json's measured points",
    )
    ap.add_argument("--job", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.job:
        kind, target = args.job
        res = {"bench": job_bench, "driver": job_driver, "ray": job_ray, "save": job_save}[kind](target, args)
        print(json.dumps(res))
        return 0

    from _common import machine_info

    if args.report_only:
        res = json.loads((args.out / "scaling.json").read_text())
        for k in ("sizes", "batch", "ray_batch", "seq_len", "masks", "repeats", "device", "parts", "work"):
            setattr(args, k, res["settings"].get(k, getattr(args, k)))  # what was measured, not today's defaults
        points, load_before, wall = res["points"], res["loadavg_before"], res["wall_s"]
        return write(args, points, res["machine"], load_before, wall)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    points = []
    for size in args.sizes:
        print(f"{size}:", flush=True)
        row = {"size": size, **run_job("bench", size, args)}
        folder = args.work / size
        if {"driver", "ray"} & set(args.parts) and not (folder / "config.json").exists():
            run_job("save", size, args)  # in its own process: this one never holds a model
        for part in ("driver", "ray"):
            if part in args.parts:
                row.update(run_job(part, str(folder), args))
        points.append(row)
    if "driver" not in args.parts or "ray" not in args.parts or len(points) < 2:
        (args.out / "scaling.json").write_text(
            json.dumps(
                {
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "machine": machine_info(args.device),
                    "points": points,
                },
                indent=2,
            )
            + "\n"
        )
        print(json.dumps(points, indent=2))
        return 0
    return write(args, points, machine_info(), list(load_before), time.perf_counter() - t0)


def write(args, points: list[dict], machine: dict, load_before: list[float], wall_s: float) -> int:
    """Fit, predict, and write ``scaling.json`` and ``scaling.md``."""
    f = fit(points)
    gpus = [1, 8, 64]
    pred = predict(f, args.gpu_tflops, args.mfu, gpus, args.gpu_mem_gib)
    settings = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("job", "report_only")
    }
    res = {
        "settings": settings,
        "machine": machine,
        "loadavg_before": load_before,
        "wall_s": wall_s,
        "points": points,
        "fit": f,
        "prediction": pred,
    }
    (args.out / "scaling.json").write_text(json.dumps(res, indent=2) + "\n")
    md = report(res, gpus)
    (args.out / "scaling.md").write_text(md)
    print(md)
    return 0


def report(res: dict, gpus: list[int]) -> str:
    s, f = res["settings"], res["fit"]
    k = s["masks"]
    lines = [
        f"Random LLaMA-architecture models, bf16, CPU ({res['machine']['cpus']} cores, load "
        f"{res['loadavg_before'][0]:.2f} before), one thread per process; mask-forward = {s['batch']} x "
        f"{s['seq_len']} tokens on the fast path at 50 % of head groups and channels; `python "
        f"benchmarks/scaling.py`",
        "",
        "| size | params | s / mask-forward | s / dense forward | search peak ÷ inference peak (RSS) | "
        "local-engine process peak | Ray driver peak | step: 2 actors ÷ 1, "
        f"K={k} | step: 2 actors ÷ 1, K=1 ({s['ray_batch']} rows split) | cost-model error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, e in zip(res["points"], f["rel_error"]):
        lines.append(
            f"| {p['size']} | {p['params'] / 1e6:,.0f}M | {p['mask_forward_s']:.3f} | {p['dense_forward_s']:.3f} | "
            f"{p['search_over_inference']:.2f} | {p['inference_peak_mib'] / 1024:.2f} GiB | "
            f"{p['driver_peak_rss_mib'] / 1024:.2f} GiB | {p[f'speedup_k{k}_2_over_1']:.2f}× | "
            f"{p['speedup_k1_2_over_1']:.2f}× | {e:+.1%} |"
        )
    lines += [
        "",
        f"Fit: t = {f['c0_s'] * 1e3:.1f} ms + P x tokens / {f['rate_param_tokens_per_s'] / 1e9:.2f}e9 "
        f"(P: matmul parameters under the mask; max |error| {f['max_abs_rel_error']:.1%} over the sizes).",
        "",
        f"Prediction, the paper's search (15,000 steps x K=2 masks x 8 x 128 tokens, 50 %), the fitted form "
        f"with a GPU's rate: {s['mfu']:.0%} of {s['gpu_tflops']:g} TFLOP/s bf16 (assumed, not measured), "
        f"c0 left out, every replica busy; minutes:",
        "",
        "| model | GPUs / replica | s / mask-forward | " + " | ".join(f"{n} GPUs" for n in gpus) + " |",
        "|---|---:|---:|" + "---:|" * len(gpus),
    ]
    for r in res["prediction"]:
        lines.append(
            f"| LLaMA-2 {r['model']} | {r['gpus_per_replica']} | {r['forward_s']:.3f} | "
            + " | ".join("n/a" if math.isinf(r["minutes"][n]) else f"{r['minutes'][n]:,.1f}" for n in gpus)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
