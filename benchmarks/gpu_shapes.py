"""A search at Llama-3.2-1B, Llama-2-7B and Llama-2-13B shapes on one device, each figure beside `plan`'s prediction.

For every shape (random init, bf16, created on the device: speed and memory do not depend on the values), every
preset and both scoring paths (gathered: each mask at its pruned width; batched: all K masks as per-row masks in one
dense forward):

- ``dense_s``: one dense forward + loss of ``B x T`` tokens (the batched path with the all-keep mask: no hooks);
- ``mask_s@30/50``: seconds per mask-forward at exact 30 % / 50 % of head groups and channel units, and its ratio to
  ``dense_s``;
- ``steps/s``: search steps (sample K masks, score them, update the policy) at 50 %, after ``--warmup`` steps, over
  ``--steps`` steps; the projected time of the paper's 15,000 steps;
- ``peak``: peak memory of the search (CUDA: ``max_memory_allocated``; CPU: the process's VmHWM after a reset);
- ``plan``: :func:`probprune.plan.make_plan` of the same configuration with the rate ``probprune plan`` calibrates
  on this device for it (:func:`probprune.plan.calibrate` on the shape's layers and the preset's channel block):
  seconds per step and the search phase's memory (on CUDA without the context, which ``max_memory_allocated`` does
  not see).

Presets: ``paper`` (K=2 masks x 8 x 128 tokens, cross-entropy, single channels) and ``default`` (K=4 x 4 x 128,
KL objective, channel blocks of 128).

    python benchmarks/gpu_shapes.py --device cuda --out benchmarks/results/gpu/shapes      # ~6 min on an H100
    python benchmarks/gpu_shapes.py --device cpu --shapes small --steps 2 --out /tmp/shapes  # CPU check, seconds
    python benchmarks/gpu_shapes.py --device cpu --shapes 135M --steps 10 --out benchmarks/results/plan_cpu  # ~3 min
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _common import PeakMemory, exact_mask, machine_info, sync

from probprune.plan import Rate

SHAPES = {  # name -> LlamaConfig fields
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "135M": dict(  # SmolLM2-135M's shape: the CPU check of plan's time and memory at a real model's size
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "7B": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "13B": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
PRESETS = {
    "paper": dict(num_samples=2, batch_size=8, objective="ce", channel_block=1),
    "default": dict(num_samples=4, batch_size=4, objective="kl", channel_block=128),
}
SEQ_LEN = 128
PAPER_STEPS = 15_000
PATHS = ("gathered", "batched")


def build(shape: str, device: str) -> torch.nn.Module:
    """The random bf16 model of ``shape``, its parameters created on ``device`` in bf16 (no float32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def median_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def plan_for(model, preset: dict, path: str, device: str, rate, sparsity: float = 0.5) -> dict:
    from probprune.config import load_config
    from probprune.plan import make_plan

    cfg = load_config(
        None,
        [
            "model.dtype=bfloat16",
            f"model.device={device}",
            f"data.block_len={SEQ_LEN}",
            f"search.masks_per_step={preset['num_samples']}",
            f"search.batch_size={preset['batch_size']}",
            f"search.objective={preset['objective']}",
            f"search.sparsity={sparsity}",
            f"search.steps={PAPER_STEPS}",
            f"engine.scoring={path}",
            "eval.seq_lens=[128]",
            "eval.max_tokens=512",
            "eval.batch_size=1",
        ],
    )
    p = make_plan(cfg, model, rate=rate)
    search = p.phases["search"] - p.memory["runtime"]
    return {"seconds_per_step": p.seconds_per_step, "search_bytes": search, "projected_min": p.total_seconds / 60}


def measure_shape(shape: str, args, rates: dict) -> list[dict]:
    """Every preset and path on ``shape``; the calibrated rate of each (shape, preset) goes into ``rates``."""
    from probprune.engine.local import LocalEngine
    from probprune.masked_forward import masked_losses
    from probprune.models import get_adapter
    from probprune.policy import Policy, uniform_probs

    dev = args.device
    t0 = time.perf_counter()
    model = build(shape, dev)
    adapter = get_adapter(model)
    build_s = time.perf_counter() - t0
    rows = []
    for name, preset in PRESETS.items():
        if args.presets and name not in args.presets:
            continue
        space = adapter.mask_space(channel_block=preset["channel_block"])
        k, b = preset["num_samples"], preset["batch_size"]
        batch = torch.randint(0, model.config.vocab_size, (b, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        rng = np.random.default_rng(0)
        full = space.full_mask()[None]  # [1, N]
        dense_s = median_time(lambda sp=space, x=batch, f=full: masked_losses(adapter, sp, f, x), dev, args.repeats)
        for path in PATHS:
            ev = LocalEngine(model, space, scoring=path, objective=preset["objective"])
            row = {
                "shape": shape,
                "preset": name,
                "path": path,
                "K": k,
                "B": b,
                "T": SEQ_LEN,
                "params": sum(p.numel() for p in model.parameters()),
                "dense_s": dense_s,
            }
            for pct in (30, 50):
                masks = np.stack([exact_mask(space, 1 - pct / 100, rng) for _ in range(k)])  # [K, N]
                t = median_time(lambda e=ev, m=masks, x=batch: e.losses(m, x), dev, args.repeats) / k
                row[f"mask_s@{pct}"], row[f"ratio@{pct}"] = t, t / dense_s
            policy = Policy(space, uniform_probs(space, 0.5), lr=2e-3, total_steps=PAPER_STEPS, sparsity=0.5, seed=0)

            gen = torch.Generator().manual_seed(1)
            fresh = iter(  # a new batch every step, as in a search: the KL objective's teacher is computed each step
                torch.randint(0, model.config.vocab_size, (b, SEQ_LEN), generator=gen)
                for _ in range(args.warmup + args.steps)
            )

            def step(policy=policy, ev=ev, k=k, fresh=fresh):
                masks = policy.sample(k)  # [K, N]
                policy.step(masks, ev.losses(masks.numpy(), next(fresh)))

            for _ in range(args.warmup):
                step()
            mem = PeakMemory(dev)
            base = mem.reset()
            sync(dev)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(dev)
            step_s = (time.perf_counter() - t) / args.steps
            peak_mib = mem.peak()
            key = f"{shape}/{name}"
            if key not in rates:  # what `probprune plan` calibrates for this model and mask space
                from probprune.plan import calibrate, model_shape

                rate = calibrate(
                    dev, "bfloat16", tokens=b * SEQ_LEN, shape=model_shape(model), channel_block=preset["channel_block"]
                )
                rates[key] = rate.__dict__
                print(f"calibrated rate for {key}: {rate}", flush=True)
            pred = plan_for(model, preset, path, dev, Rate(**rates[key]))
            row.update(
                {
                    "steps_per_s": 1 / step_s,
                    "step_s": step_s,
                    "projected_15000_min": PAPER_STEPS * step_s / 60,
                    "peak_gib": peak_mib / 1024,
                    "memory_method": mem.method,
                    "base_gib": base / 1024,
                    "plan_step_s": pred["seconds_per_step"],
                    "plan_projected_15000_min": pred["projected_min"],
                    "plan_search_gib": pred["search_bytes"] / 2**30,
                    "plan_step_error": pred["seconds_per_step"] / step_s - 1,
                    "build_s": build_s,
                }
            )
            if mem.method.startswith("cuda"):  # allocated bytes: comparable with the plan's search phase
                row["plan_memory_error"] = pred["search_bytes"] / 2**30 / row["peak_gib"] - 1
            rows.append(row)
            print(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}), flush=True)
            gc.collect()
    return rows


def markdown(res: dict) -> str:
    lines = [
        f"Random Llama shapes, bf16, {res['machine'].get('cuda_device') or res['device']}; K masks x B x 128 "
        f"tokens; mask-forward ÷ dense forward at exact 30 % / 50 % of head groups and channel units; steps/s "
        f"of the search at 50 %; peak: {res['rows'][0]['memory_method'] if res['rows'] else ''}; plan: "
        "`probprune plan` with the rate it calibrates on this device for each shape and preset "
        f"({next(iter(res['rates'].values()))['source'] if res['rates'] else ''}). "
        f"`{res['command']}`",
        "",
        "| shape | preset | path | mask ÷ dense @30% | @50% | steps/s | 15,000 steps (min) | plan (min) | "
        "plan ÷ measured step | peak GiB | plan search GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['shape']} | {r['preset']} | {r['path']} | {r['ratio@30']:.2f} | {r['ratio@50']:.2f} | "
            f"{r['steps_per_s']:.2f} | {r['projected_15000_min']:.1f} | {r['plan_projected_15000_min']:.1f} "
            f"| {1 + r['plan_step_error']:.2f} | {r['peak_gib']:.2f} | {r['plan_search_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=["1B", "7B", "13B"], choices=list(SHAPES))
    ap.add_argument("--presets", nargs="+", default=None, choices=list(PRESETS))
    ap.add_argument("--steps", type=int, default=10, help="timed search steps per (shape, preset, path)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the forward measurements (median)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    ap.add_argument("--out", type=Path, required=True, help="folder for shapes.json and shapes.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, rates = [], {}
    for shape in args.shapes:
        rows += measure_shape(shape, args, rates)
        gc.collect()  # the shape's model is gone with measure_shape's frame
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    import sys

    res = {
        "device": args.device,
        "machine": machine_info(args.device),
        "rates": rates,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shapes.json").write_text(json.dumps(res, indent=2))
    (args.out / "shapes.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
