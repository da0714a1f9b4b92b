"""Inference speed and memory of compacted SmolLM2-135M models vs the dense model.

Rows: the dense model, and for each prunable sparsity (default 30 % and 50 %: that share of the KV head groups and of
the MLP channels removed) the compacted model of a budget-exact Wanda-sp mask (``baseline_mask("wanda-sp")`` on a few
Brown calibration blocks; speed does not depend on which units are removed, only on how many and on the shapes).
With ``--align A`` each pruned row also gets an aligned twin whose MLP widths are multiples of A channels
(:func:`probprune.widths.align_mask`; same budget to within one aligned block).

Measurements (each ratio is printed next to its limit ``dense params ÷ pruned params``):

- prefill: tokens/s of one forward over ``B × T`` tokens (default 1 × 512 and 16 × 512) with ``logits_to_keep=1``
  (what ``generate`` does; the vocabulary projection for every position would add a fixed, unpruned cost).
- decode: tokens/s of greedy decoding of ``--decode-tokens`` new tokens with the KV cache after a
  ``--prompt-len``-token prompt (batch 1); only the decode loop is timed.
- peak memory: extra memory the 16 × 512 prefill and the decode take above the resident weights. On CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``
  before each measurement, freed heap returned first with ``malloc_trim``), else a ``resource.getrusage`` delta (a
  lower bound: it only sees growth past the process's earlier peak).

Timing: one or more warm-up rounds, then ``--repeats`` rounds; each round runs every row once in turn (so load from
other processes hits every row alike) and the median is reported, with the process CPU time beside the wall time on
CPU. ``limit (layers)`` is the same ratio without the embedding / tied lm_head, the bound for prefill with
``logits_to_keep=1``; ``limit (total)`` bounds batch-1 decode, which reads every weight once per token.

Usage (full run, ≈ 10–20 min on 2 CPU cores; on a GPU add ``--device cuda``):
    python benchmarks/inference.py --dtype bfloat16 --threads 2 --align 64 --out benchmarks/results/inference.json
Smoke test (seconds):
    python benchmarks/inference.py --quick
Markdown from a saved JSON:
    python benchmarks/inference.py --report benchmarks/results/inference_cpu_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import PeakMemory, sync, timed
from torch import nn

from probprune.baselines import baseline_mask, layer_quantiles
from probprune.compaction import compact, count_params
from probprune.models import get_adapter
from probprune.models.loading import load_model
from probprune.widths import align_mask, channel_widths


# --------------------------------------------------------------------------------------------------- workloads
@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    """One forward over ``ids`` ([B, T]), logits for the last position only."""
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


@torch.inference_mode()
def decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Greedy decoding with the KV cache; returns the seconds of the decode loop (prompt prefill not counted)."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)  # prompt: [1, P]
    key = "cache" if hasattr(out, "cache") else "past_key_values"  # newer transformers name it "cache"
    cache, nxt = getattr(out, key), out.logits[:, -1:].argmax(-1)  # nxt: [1, 1]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{key: cache})
        cache, nxt = getattr(out, key), out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------- models
def layer_params(model: nn.Module) -> int:
    """Parameters of the decoder layers (no embedding, final norm or lm_head)."""
    return sum(p.numel() for p in get_adapter(model).layers.parameters())


def build_rows(args: argparse.Namespace, model: nn.Module, tokenizer, device: torch.device) -> dict[str, dict]:
    """The dense model and one compacted model per (sparsity, aligned?) with their parameter counts."""
    adapter = get_adapter(model)
    space = adapter.mask_space()  # heads + single channels
    blocks = None
    if args.mask_method == "wanda-sp":
        from probprune.config import DataConfig
        from probprune.data import CalibrationData, load_corpus

        corpus = load_corpus(DataConfig(source="brown"), seed=0)
        blocks = CalibrationData.from_corpus(tokenizer, corpus, 128, args.calib_blocks, seed=0).blocks.to(device)
    rows = {
        "dense": {"model": model, "params": count_params(model), "layer_params": layer_params(model), "widths": None}
    }
    priority = None
    if args.align > 1:  # which channels an aligned layer adds or drops: the same metric, as within-layer quantiles
        from probprune.importance import collect_input_stats, magnitude_scores, wanda_sp_scores

        scores = (
            wanda_sp_scores(adapter, space, collect_input_stats(adapter, blocks))
            if blocks is not None
            else magnitude_scores(adapter, space)
        )
        priority = layer_quantiles(space, scores)
    for sp in args.sparsity:
        mask = baseline_mask(args.mask_method, adapter, space, blocks, sp, budget="per_type")
        variants = [(f"{sp:.0%} pruned", mask)]
        if priority is not None:
            aligned = align_mask(space, mask, priority, args.align, sp, "per_type")
            variants.append((f"{sp:.0%} aligned {args.align}", aligned))
        for name, m in variants:
            small = compact(model, space, m).eval()
            rows[name] = {
                "model": small,
                "params": count_params(small),
                "layer_params": layer_params(small),
                "widths": sorted(set(channel_widths(space, m))),
                "heads_kept": int(m[space.unit_type == 0].sum()),
                "prunable_sparsity": space.sparsity(m)["prunable"],
            }
    for folder in args.models:
        rows.update(saved_row(folder, args, device))
    return rows


def saved_row(folder: Path, args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """A row for a model folder written by ``probprune prune`` (``RUN/model``; its ``RUN/summary.json`` names it)."""
    import json as _json

    from probprune.models.loading import load_pruned

    small = load_pruned(folder, dtype=args.dtype, device_map=str(device))
    widths = [getattr(getattr(layer.mlp, "down_proj", None), "in_features", 0) for layer in get_adapter(small).layers]
    summary = folder.parent / "summary.json"
    sparsity = _json.loads(summary.read_text())["sparsity"]["prunable"] if summary.exists() else float("nan")
    return {
        f"{folder.parent.name} (searched)": {
            "model": small,
            "params": count_params(small),
            "layer_params": layer_params(small),
            "widths": sorted(set(widths)),
            "heads_kept": None,
            "prunable_sparsity": sparsity,
        }
    }


# --------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    rows = build_rows(args, model, tok, device)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    inputs = {b: torch.randint(0, vocab, (b, args.seq_len), generator=gen).to(device) for b in args.batches}
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(device)

    work: dict[str, Callable[[nn.Module], Callable[[], float | None]]] = {}
    for b in args.batches:
        work[f"prefill {b}x{args.seq_len}"] = lambda m, b=b: lambda: prefill(m, inputs[b])
    work[f"decode {args.decode_tokens}"] = lambda m: lambda: decode(m, prompt, args.decode_tokens, device)
    ntok = {f"prefill {b}x{args.seq_len}": b * args.seq_len for b in args.batches}
    ntok[f"decode {args.decode_tokens}"] = args.decode_tokens

    times = {(r, w): [] for r in rows for w in work}
    cpu = {(r, w): [] for r in rows for w in work}
    for rnd in range(args.warmup + args.repeats):
        for w, make in work.items():
            for r, row in rows.items():
                wall, c = timed(make(row["model"]), device)
                if rnd >= args.warmup:
                    times[(r, w)].append(wall)
                    cpu[(r, w)].append(c)

    peak = PeakMemory(device)
    mem_work = [w for w in work if w.startswith(f"prefill {max(args.batches)}x") or w.startswith("decode")]
    memory = {(r, w): peak.measure(work[w](row["model"])) for r, row in rows.items() for w in mem_work}

    dense = rows["dense"]
    results = []
    for r, row in rows.items():
        limit_total = dense["params"] / row["params"]
        limit_layers = dense["layer_params"] / row["layer_params"]
        rec = {
            "row": r,
            "params": row["params"],
            "layer_params": row["layer_params"],
            "limit_total": limit_total,
            "limit_layers": limit_layers,
            "mlp_widths": row["widths"],
            "heads_kept": row.get("heads_kept"),
            "prunable_sparsity": row.get("prunable_sparsity", 0.0),
            "weights_mib": sum(p.numel() * p.element_size() for p in row["model"].parameters()) / 2**20,
        }
        for w in work:
            med, med_d = statistics.median(times[(r, w)]), statistics.median(times[("dense", w)])
            rec[w] = {
                "tokens_per_s": ntok[w] / med,
                "speedup": med_d / med,
                "speedup_cpu_time": statistics.median(cpu[("dense", w)]) / statistics.median(cpu[(r, w)]),
                "median_s": med,
                "times_s": times[(r, w)],
                "cpu_s": cpu[(r, w)],
            }
        for w in mem_work:
            rec[w]["peak_extra_mib"] = memory[(r, w)]
        results.append(rec)
    return {
        "model": args.model,
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "mask_method": args.mask_method,
        "align": args.align,
        "seq_len": args.seq_len,
        "batches": args.batches,
        "decode_tokens": args.decode_tokens,
        "prompt_len": args.prompt_len,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "memory_method": peak.method,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "rows": results,
    }


TARGET_FRACTION = 0.9  # prefill speed-up of the 50 % model >= this x its parameter-ratio limit


def markdown(res: dict) -> str:
    """The results as a markdown table, with the memory rows and the prefill target line."""
    works = [k for k in res["rows"][0] if k.startswith(("prefill", "decode"))]
    lines = [
        f"{res['model']} ({res['dtype']}, {res['device']}, {res['threads']} threads); median of "
        f"{res['repeats']} after {res['warmup']} warm-up round(s); prefill with logits_to_keep=1; decode after a "
        f"{res['prompt_len']}-token prompt, batch 1; 'pruned' / 'aligned' rows: budget-exact {res['mask_method']} "
        f"masks; '(searched)' rows: models saved by probprune prune; memory: {res['memory_method']}.",
        "",
        "| row | params | limit (total) | limit (layers) | MLP widths | "
        + " | ".join(f"{w} tok/s | ×" for w in works)
        + " |",
        "|---|---:|---:|---:|---|" + "---:|---:|" * len(works),
    ]
    for r in res["rows"]:
        widths = (
            "-"
            if r["mlp_widths"] is None
            else (
                f"{r['mlp_widths'][0]}" if len(r["mlp_widths"]) == 1 else f"{r['mlp_widths'][0]}..{r['mlp_widths'][-1]}"
            )
        )
        lines.append(
            f"| {r['row']} | {r['params'] / 1e6:.1f}M | {r['limit_total']:.2f} | {r['limit_layers']:.2f} | "
            f"{widths} | " + " | ".join(f"{r[w]['tokens_per_s']:,.0f} | {r[w]['speedup']:.2f}" for w in works) + " |"
        )
    lines += ["", "Peak extra memory above the weights (MiB):", ""]
    for r in res["rows"]:
        mem = ", ".join(f"{w}: {r[w]['peak_extra_mib']:.0f}" for w in works if "peak_extra_mib" in r[w])
        lines.append(f"- {r['row']}: weights {r['weights_mib']:.0f}; {mem}")
    lines += [
        "",
        "× = speed-up over dense (median wall time); limit = dense params ÷ pruned params (total; "
        "'layers' without the embedding and tied lm_head, the bound for prefill with logits_to_keep=1).",
    ]
    for r in res["rows"]:
        if abs(r["prunable_sparsity"] - 0.5) > 0.01:
            continue
        for w in (w for w in works if w.startswith("prefill")):
            need = TARGET_FRACTION * r["limit_total"]
            lines.append(
                f"- {r['row']}, {w}: {r[w]['speedup']:.2f} vs {TARGET_FRACTION} × limit (total) = "
                f"{need:.2f}: "
                f"{'met' if r[w]['speedup'] >= need else 'not met'} ({r[w]['speedup'] / r['limit_layers']:.2f}"
                f" of the layers-only limit)"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--sparsity",
        type=float,
        nargs="*",
        default=[0.3, 0.5],
        help="prunable sparsities of the Wanda-sp rows (none: only --models)",
    )
    p.add_argument(
        "--models",
        type=Path,
        nargs="*",
        default=[],
        help="also time these saved pruned models (RUN/model folders written by probprune prune)",
    )
    p.add_argument("--align", type=int, default=1, help="also time MLP widths aligned to this many channels")
    p.add_argument("--mask-method", default="wanda-sp", choices=["wanda-sp", "magnitude"])
    p.add_argument("--calib-blocks", type=int, default=8, help="128-token Brown blocks for the Wanda-sp masks")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny settings to check that everything runs (seconds)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON (and .md beside it)")
    p.add_argument("--report", type=Path, default=None, help="rebuild the .md from this JSON; measure nothing")
    args = p.parse_args()
    if args.quick:
        args.seq_len, args.batches, args.decode_tokens, args.prompt_len = 64, [1, 2], 8, 16
        args.repeats, args.warmup, args.calib_blocks = 2, 1, 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.report is not None:
        res = json.loads(args.report.read_text())
    else:
        res = run(args)
    md = markdown(res)
    print(md)
    out = args.out or args.report
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.report is None:
            out.write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
