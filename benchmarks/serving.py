"""Serving check: export models to GGUF, run them in llama.cpp, compare with probprune's own perplexity and time them.

    pip install "probprune[llamacpp]"          # llama-cpp-python, built from source (≈ 12 CPU-minutes, once)
    python benchmarks/serving.py --models embedded:smollm2-135m RUN/model ... [--labels dense NAME ...] \
        --out benchmarks/results/serving

For every model folder: ``probprune export`` to GGUF (each ``--outtypes``), then, on the same held-out Brown token
windows (non-overlapping, ``--seq-len`` tokens, at most ``--max-tokens``):

- perplexity from llama.cpp's logits ÷ probprune's perplexity of the same folder (float32 in PyTorch), per outtype,
  and ÷ llama.cpp's perplexity of the f16 file (what quantisation costs);
- the file size and llama.cpp prefill tokens/s (one ``--prefill`` -token prompt) and decode tokens/s (``--decode``
  tokens) per outtype; for f16 also ÷ the first model's (the dense one), with the parameter ratio next to it. Decode
  feeds held-out tokens one at a time (the cost of a decode step does not depend on the token).

k-quants and q4_0 are made by llama.cpp's quantizer (``probprune export --outtype q4_k_m`` …). On CPUs with Intel
AMX, llama.cpp's extra CPU buffer types (AMX and repacked weights) are off (``probprune.export.open_llama_cpp``: its
AMX kernels crash there), so speeds are those of llama.cpp's plain CPU kernels.

Writes ``OUT/serving.json`` and ``OUT/serving.md``. One process, ``--threads`` threads for both runtimes; run it
alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def llama_cpp_ppl(path: Path, tokens: np.ndarray, seq_len: int, threads: int) -> float:
    """exp(mean next-token cross-entropy) of a GGUF in llama.cpp over non-overlapping windows of ``tokens``."""
    from probprune.export import open_llama_cpp

    llm = open_llama_cpp(path, n_ctx=seq_len, n_batch=seq_len, logits_all=True, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for lo in range(0, len(tokens) - seq_len + 1, seq_len):
        window = [int(t) for t in tokens[lo : lo + seq_len]]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: seq_len - 1], dtype=np.float64)  # [T-1, V]
        logz = logits.max(1) + np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
        nll += float((logz - logits[np.arange(seq_len - 1), window[1:]]).sum())
        count += seq_len - 1
    return math.exp(nll / count)


def llama_cpp_speed(path: Path, prompt: list[int], decode: int, threads: int, repeats: int = 3) -> dict:
    """Median prefill and decode tokens/s of a GGUF in llama.cpp (after one warm-up round)."""
    from probprune.export import open_llama_cpp

    llm = open_llama_cpp(path, n_ctx=len(prompt) + decode + 8, n_batch=len(prompt), n_threads=threads, verbose=False)
    pre, dec = [], []
    for _ in range(repeats + 1):  # the first round warms up
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pre.append(len(prompt) / (time.perf_counter() - t))
        t = time.perf_counter()
        for j in range(decode):  # one token per eval; which token does not change the cost, so feed held-out ones
            llm.eval([prompt[j % len(prompt)]])
        dec.append(decode / (time.perf_counter() - t))
    return {"prefill_tok_s": float(np.median(pre[1:])), "decode_tok_s": float(np.median(dec[1:]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="model folders; the first is the reference (dense)")
    ap.add_argument("--labels", nargs="+", help="a name per model for the table (default: the folder paths)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--outtypes", nargs="+", default=["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    labels = args.labels or args.models
    if len(labels) != len(args.models):
        ap.error(f"--labels: {len(labels)} names for {len(args.models)} models")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp is not installed: pip install 'probprune[llamacpp]' (builds llama.cpp from source)")
        return 2
    import torch

    from probprune.compaction import count_params
    from probprune.config import load_config
    from probprune.data import load_corpus, test_stream
    from probprune.export import export_gguf
    from probprune.models.loading import load_model
    from probprune.perplexity import evaluate_ppl

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None)
    rows = []
    for i, name in enumerate(args.models):
        model, tok = load_model(name, dtype="float32")
        tokens = test_stream(tok, load_corpus(cfg.data, seed=cfg.data.split_seed))[: args.max_tokens]
        ref = float(
            evaluate_ppl(model, tokens, [args.seq_len], max_tokens=args.max_tokens, batch_size=4, progress=False)[
                args.seq_len
            ]
        )
        row = {"model": labels[i], "path": name, "params": count_params(model), "ppl_probprune": ref}
        del model
        for outtype in args.outtypes:
            path = args.out / f"model{i}_{outtype}.gguf"
            t = time.perf_counter()
            res = export_gguf(name, path, outtype=outtype)
            row[f"export_s_{outtype}"] = time.perf_counter() - t
            row["arch"] = res["arch"]
            ppl = llama_cpp_ppl(path, tokens.numpy(), args.seq_len, args.threads)
            row[f"ppl_llamacpp_{outtype}"] = ppl
            row[f"ratio_{outtype}"] = ppl / ref
            row[f"mib_{outtype}"] = path.stat().st_size / 2**20
            if "tensor_types" in res:
                row[f"tensor_types_{outtype}"] = res["tensor_types"]
            speed = llama_cpp_speed(path, [int(x) for x in tokens[: args.prefill]], args.decode, args.threads)
            row.update({f"{k}_{outtype}": v for k, v in speed.items()})
            if outtype == "f16":
                row.update(speed)
            path.unlink()
        for outtype in args.outtypes:
            if "f16" in args.outtypes:
                row[f"vs_f16_{outtype}"] = row[f"ppl_llamacpp_{outtype}"] / row["ppl_llamacpp_f16"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense = rows[0]
    for r in rows:
        r["params_ratio"] = dense["params"] / r["params"]
        if "prefill_tok_s" in r:
            r["prefill_speedup"] = r["prefill_tok_s"] / dense["prefill_tok_s"]
            r["decode_speedup"] = r["decode_tok_s"] / dense["decode_tok_s"]
    (args.out / "serving.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = [f"ratio_{o}" for o in args.outtypes]
    lines = [
        f"llama.cpp vs probprune, held-out Brown, PPL@{args.seq_len} over {args.max_tokens} tokens, "
        f"{args.threads} threads",
        "",
        "| model | arch | params | PPL (probprune, fp32) | "
        + " | ".join(f"llama.cpp ÷ probprune ({o})" for o in args.outtypes)
        + " | prefill ÷ dense | decode ÷ dense | params ratio |",
        "|---|---|---:|---:|" + "---:|" * len(cols) + "---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['params'] / 1e6:.1f}M | {r['ppl_probprune']:.2f} | "
            + " | ".join(f"{r[c]:.4f}" for c in cols)
            + f" | {r.get('prefill_speedup', float('nan')):.2f} | {r.get('decode_speedup', float('nan')):.2f}"
            f" | {r['params_ratio']:.2f} |"
        )
    lines += [
        "",
        f"Per outtype: file size, llama.cpp PPL@{args.seq_len} ÷ the same model's f16 file, prefill "
        f"({args.prefill}-token prompt) and decode tokens/s ({args.threads} threads)",
        "",
        "| model | outtype | MiB | PPL (llama.cpp) | ÷ f16 | ÷ dense's ÷ f16 | prefill tok/s | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for o in args.outtypes:
            rel = r.get(f"vs_f16_{o}", float("nan")) / dense.get(f"vs_f16_{o}", float("nan"))
            lines.append(
                f"| {r['model']} | {o} | {r[f'mib_{o}']:.1f} | {r[f'ppl_llamacpp_{o}']:.2f} | "
                f"{r.get(f'vs_f16_{o}', float('nan')):.4f} | {rel:.4f} | {r[f'prefill_tok_s_{o}']:.0f} | "
                f"{r[f'decode_tok_s_{o}']:.0f} |"
            )
    (args.out / "serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
