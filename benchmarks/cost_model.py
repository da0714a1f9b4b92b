"""What would a paper-sized search cost on 7B / 13B / 70B models? Hours on N GPUs from a measured throughput.

    python benchmarks/cost_model.py --from benchmarks/results/gpu/throughput.json
    python benchmarks/cost_model.py --tokens-per-second 25000 --speedup 1.6      # a number measured elsewhere

The model (every assumption is a flag):

- Work: the paper's sample budget, ``--steps`` (15,000) x ``--k`` masks (2) x ``--batch`` (8) x ``--seq-len`` (128)
  tokens = 30.72 M scored tokens; each mask is one forward over its step's batch (no backward).
- Speed of one replica of model M, dense: the measured dense tokens/s of the reference model (SmolLM2-135M from the
  throughput JSON, or ``--tokens-per-second``) times ``P_ref / P_M``, P = parameters a token passes through in
  matmuls (decoder layers + lm_head; FLOPs per token ∝ P, attention over 128 tokens is negligible). On a GPU a
  135M model at 4 x 128 tokens is launch-bound, so this understates big models' speed (overstates hours); with
  ``--gpu-tflops`` a second table uses the FLOP rate instead: ``mfu x peak / (2 P_M)``.
- Fast path at sparsity s (both unit types at s): ``--speedup scaled`` (default) keeps the efficiency measured on
  the reference model (measured speed-up ÷ its FLOP bound, capped at 1: a measured ratio above the bound comes from
  the dense HF forward's own overhead, not from sparsity) and applies it to M's bound ``1 / (1 - s f_M)``, f_M = the
  prunable share of P_M (lm_head is not pruned: 21 % of SmolLM2's P, 1-2 % of LLaMA-2's); ``measured`` uses the
  reference model's ratio as is, ``bound`` the FLOP bound, a number that number.
- Memory of a replica: ``bytes x params`` (bf16: 2) + one layer's weights (the gathered copy the fast path builds, at
  most a full layer) + ``--activation-gib`` (8 x 128 tokens of activations and a logits chunk, generously), on GPUs
  with ``--gpu-mem-gib`` of which ``--usable`` is usable: 7B and 13B fit one 80 GB GPU, 70B needs 2 (split by layers
  with ``device_map``: a pipeline without micro-batches, so a 2-GPU replica runs at one GPU's rate).
- Replicas = N // GPUs per replica. ``ideal``: the work divides over all replicas. ``K-capped``: probprune's Ray
  evaluator hands whole masks to actors, so at most K replicas are busy in a step (K=2 in the paper preset: N=64
  is no faster than 2 replicas unless K grows). Driver overhead (< 1 % per step measured on CPU) is ignored.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LlamaShape:
    """Shapes of a LLaMA-architecture model: enough to count its parameters."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def layer_matmul(self) -> int:
        """Matmul parameters of one decoder layer: q, k, v, o and gate, up, down."""
        d = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * d
        return attn + 3 * self.hidden * self.intermediate

    @property
    def prunable(self) -> int:
        """Parameters removable by head-group and channel units (all matmuls of the decoder layers)."""
        return self.layers * self.layer_matmul

    @property
    def matmul(self) -> int:
        """Parameters a token passes through in matmuls: decoder layers + lm_head (P in the FLOP count)."""
        return self.prunable + self.vocab * self.hidden

    @property
    def total(self) -> int:
        """All parameters: layers, norms, embedding and (untied) lm_head."""
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.prunable + norms + self.vocab * self.hidden * (1 if self.tied else 2)


REFERENCE = LlamaShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True)
MODELS = {  # LLaMA-2 shapes (LLaMA-2-70B uses GQA with 8 KV heads)
    "7B": LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "13B": LlamaShape(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
    "70B": LlamaShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}
GIB = 2**30


def search_tokens(steps: int, k: int, batch: int, seq_len: int) -> int:
    """Tokens scored by a search: every step scores K masks, each on a batch x seq_len batch."""
    return steps * k * batch * seq_len


def flop_bound(sparsity: float, prunable_fraction: float) -> float:
    """Speed-up bound of computing only kept units: dense matmul params ÷ kept ones, ``1 / (1 - s f)``."""
    return 1.0 / (1.0 - sparsity * prunable_fraction)


def replica_gpus(
    shape: LlamaShape,
    gpu_mem_gib: float,
    bytes_per_param: float = 2.0,
    activation_gib: float = 4.0,
    usable: float = 0.9,
) -> int:
    """GPUs one replica needs: weights + one gathered layer + activations over the usable memory per GPU."""
    need = bytes_per_param * (shape.total + shape.layer_matmul) / GIB + activation_gib
    return max(1, math.ceil(need / (usable * gpu_mem_gib) - 1e-9))


def scaled_tokens_per_second(ref_tps: float, ref_params: int, params: int) -> float:
    """Dense tokens/s of a replica of a model with ``params`` matmul params, FLOPs ∝ params."""
    return ref_tps * ref_params / params


def flop_tokens_per_second(params: int, gpu_tflops: float, mfu: float) -> float:
    """Dense forward tokens/s of one GPU at ``mfu`` of ``gpu_tflops``: 2 FLOPs per matmul param per token."""
    return mfu * gpu_tflops * 1e12 / (2.0 * params)


def search_hours(tokens: int, tokens_per_second: float, speedup: float, replicas: int) -> float:
    """Wall hours to score ``tokens`` on ``replicas`` replicas at ``tokens_per_second`` x ``speedup`` each."""
    if replicas < 1:
        return math.inf
    return tokens / (tokens_per_second * speedup * replicas) / 3600.0


def model_speedup(
    mode: str | float, sparsity: float, measured: float | None, ref_bound: float, shape: LlamaShape
) -> float:
    """Fast-path speed-up on ``shape``: ``scaled`` / ``measured`` / ``bound`` (see the module docstring) or a number."""
    bound = flop_bound(sparsity, shape.prunable / shape.matmul)
    if isinstance(mode, (int, float)):
        return float(mode)
    if mode == "bound":
        return bound
    if measured is None:
        raise ValueError(
            f"--speedup {mode} needs a measured speed-up (a throughput JSON with a gathered row at "
            f"{sparsity:.0%}); use --speedup bound or a number"
        )
    if mode == "measured":
        return measured
    return min(measured / ref_bound, 1.0) * bound  # an efficiency above 1 is the dense path's overhead: capped


def estimate(
    ref_tps: float,
    ref_params: int,
    speedup_mode: str | float,
    sparsity: float,
    measured: float | None,
    ref_bound: float,
    gpus: list[int],
    tokens: int,
    k: int,
    gpu_mem_gib: float,
    activation_gib: float,
    usable: float,
    gpu_tflops: float | None = None,
    mfu: float = 0.4,
) -> list[dict]:
    """One row per model: replica size, speeds, and hours for every N in ``gpus`` (ideal and K-capped)."""
    rows = []
    for name, shape in MODELS.items():
        per_replica = replica_gpus(shape, gpu_mem_gib, activation_gib=activation_gib, usable=usable)
        tps = scaled_tokens_per_second(ref_tps, ref_params, shape.matmul)
        sp = model_speedup(speedup_mode, sparsity, measured, ref_bound, shape)
        row = {
            "model": name,
            "params": shape.total,
            "matmul_params": shape.matmul,
            "gpus_per_replica": per_replica,
            "dense_tokens_per_s": tps,
            "speedup": sp,
            "hours": {},
            "hours_k_capped": {},
        }
        if gpu_tflops:
            row["flop_tokens_per_s"] = flop_tokens_per_second(shape.matmul, gpu_tflops, mfu)
            row["hours_flops"] = {}
        for n in gpus:
            replicas = n // per_replica
            row["hours"][n] = search_hours(tokens, tps, sp, replicas)
            row["hours_k_capped"][n] = search_hours(tokens, tps, sp, min(replicas, k))
            if gpu_tflops:
                row["hours_flops"][n] = search_hours(tokens, row["flop_tokens_per_s"], sp, replicas)
        rows.append(row)
    return rows


def from_throughput(path: Path, dtype: str | None, sparsity: float) -> dict:
    """Dense tokens/s, measured gathered speed-up at ``sparsity`` and its FLOP bound from a throughput JSON."""
    res = json.loads(path.read_text())
    runs = res["results"]
    run = next((r for r in runs if dtype is None or r["dtype"] == dtype), None)
    if run is None:
        raise SystemExit(f"{path} has no results for dtype {dtype} (has {[r['dtype'] for r in runs]})")
    rows = {r["row"]: r for r in run["scoring"]}
    gathered = rows.get(f"gathered {round(sparsity * 100)}%")
    return {
        "tokens_per_s": rows["dense"]["tokens_per_s"],
        "dtype": run["dtype"],
        "device": res["settings"]["device"],
        "cuda_device": res["machine"].get("cuda_device"),
        "measured_speedup": gathered["vs_dense"] if gathered else None,
        "ref_bound": gathered["flop_bound"]
        if gathered
        else flop_bound(sparsity, REFERENCE.prunable / REFERENCE.matmul),
    }


def fmt_hours(h: float) -> str:
    if math.isinf(h):
        return "n/a"
    return f"{h:,.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2g}"


def markdown(rows: list[dict], gpus: list[int], meta: dict) -> str:
    lines = [meta["header"], ""]
    tables = [
        ("hours, work divided over all replicas", "hours"),
        (f"hours, K-capped (at most K={meta['k']} replicas busy per step)", "hours_k_capped"),
    ]
    if "hours_flops" in rows[0]:
        tables.append(
            (
                f"hours from the FLOP rate ({meta['mfu']:.0%} of {meta['gpu_tflops']:g} TFLOP/s per GPU), "
                "work divided over all replicas",
                "hours_flops",
            )
        )
    for title, key in tables:
        lines += [
            f"**{title}**",
            "",
            "| model | params | GPUs / replica | dense tok/s / replica | fast-path speed-up | "
            + " | ".join(f"N={n}" for n in gpus)
            + " |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(gpus),
        ]
        for r in rows:
            tps = r["flop_tokens_per_s"] if key == "hours_flops" else r["dense_tokens_per_s"]
            lines.append(
                f"| {r['model']} | {r['params'] / 1e9:.1f}B | {r['gpus_per_replica']} | {tps:,.0f} | "
                f"{r['speedup']:.2f} | " + " | ".join(fmt_hours(r[key][n]) for n in gpus) + " |"
            )
        lines.append("")
    lines.append("n/a: fewer GPUs than one replica needs.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", type=Path, help="a throughput JSON (benchmarks/throughput.py --out)")
    src.add_argument("--tokens-per-second", type=float, help="dense tokens/s of the reference model, measured")
    ap.add_argument("--dtype", default=None, help="which dtype's results in the JSON (default: the first)")
    ap.add_argument(
        "--ref-params",
        type=int,
        default=REFERENCE.matmul,
        help="matmul params of the measured model (default: SmolLM2-135M's)",
    )
    ap.add_argument("--sparsity", type=float, default=0.5, help="share of head groups and channels removed")
    ap.add_argument("--speedup", default="scaled", help="scaled | measured | bound | a number")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=15000)
    ap.add_argument("--k", type=int, default=2, help="masks per step")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--usable", type=float, default=0.9, help="share of GPU memory usable by one replica")
    ap.add_argument("--activation-gib", type=float, default=4.0)
    ap.add_argument("--gpu-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s per GPU (FLOP table)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for the FLOP table")
    ap.add_argument("--out", type=Path, default=None, help="write JSON here and markdown next to it (.md)")
    args = ap.parse_args()
    try:
        mode: str | float = float(args.speedup)
    except ValueError:
        mode = args.speedup
        if mode not in ("scaled", "measured", "bound"):
            ap.error(f"--speedup must be scaled, measured, bound or a number, got {args.speedup!r}")
    if args.source:
        src_info = from_throughput(args.source, args.dtype, args.sparsity)
        where = f"{args.source} ({src_info['dtype']} on {src_info['cuda_device'] or src_info['device']})"
    else:
        src_info = {
            "tokens_per_s": args.tokens_per_second,
            "measured_speedup": None,
            "ref_bound": flop_bound(args.sparsity, REFERENCE.prunable / REFERENCE.matmul),
        }
        where = "--tokens-per-second"
    tokens = search_tokens(args.steps, args.k, args.batch, args.seq_len)
    rows = estimate(
        src_info["tokens_per_s"],
        args.ref_params,
        mode,
        args.sparsity,
        src_info["measured_speedup"],
        src_info["ref_bound"],
        args.gpus,
        tokens,
        args.k,
        args.gpu_mem_gib,
        args.activation_gib,
        args.usable,
        args.gpu_tflops,
        args.mfu,
    )
    header = (
        f"Search cost at the paper's budget: {args.steps:,} steps x {args.k} masks x {args.batch} x "
        f"{args.seq_len} tokens = {tokens / 1e6:.2f} M tokens, {args.sparsity:.0%} sparsity. Reference: "
        f"{src_info['tokens_per_s']:,.0f} dense tok/s for {args.ref_params / 1e6:.1f} M matmul params from "
        f"{where}; speed-up mode {args.speedup}"
        + (
            f" (measured {src_info['measured_speedup']:.2f} vs bound {src_info['ref_bound']:.2f} on the reference)"
            if src_info["measured_speedup"]
            else ""
        )
        + f"; replicas on {args.gpu_mem_gib:g} GiB GPUs ({args.usable:.0%} usable), bf16 weights + one "
        f"gathered layer + {args.activation_gib:g} GiB activations."
    )
    if args.source and src_info["device"] == "cpu":
        header += (
            " NOTE: the reference was measured on a CPU, so every 'GPU' here runs at that CPU's speed; use a "
            "GPU measurement (benchmarks/gpu.sh) for GPU hours."
        )
    md = markdown(rows, args.gpus, {"header": header, "k": args.k, "mfu": args.mfu, "gpu_tflops": args.gpu_tflops})
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "reference": src_info,
                    "tokens": tokens,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
        args.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
