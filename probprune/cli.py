"""The ``probprune`` command: prune, baseline, sweep, heal, eval, export, plan, info."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import termination
from .config_files import resolve_config
from .errors import UserError

log = logging.getLogger("probprune")
RESUME_HINT = "a search resumes from its last checkpoint with --resume"


def _setup(quiet: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="[probprune] %(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _cmd_prune(args) -> int:
    from . import run_folder as rf
    from .config import load_config
    from .export import LLAMA_QUANTS, require_llama_cpp
    from .pipeline import prune

    cfg = load_config(resolve_config(args.config), args.overrides)
    if args.export_gguf is not None and args.export_gguf.is_dir():
        raise UserError(f"--export-gguf {args.export_gguf} is a folder; give the .gguf file to write")
    if args.export_gguf is not None and args.export_outtype in LLAMA_QUANTS:
        require_llama_cpp()  # a missing llama-cpp-python is reported before the run, not after it
    summary = prune(cfg, args.output, resume=args.resume, progress=not args.quiet)
    print(rf.format_summary(summary))
    print(
        f"\nwrote {args.output}/{rf.MODEL} (load with probprune.load_pruned or AutoModelForCausalLM), {rf.SUMMARY}, "
        f"{rf.MASKS}, {rf.METRICS}, {rf.CONFIG}"
    )
    if args.export_gguf is not None:
        from .export import export_gguf

        res = export_gguf(Path(args.output) / "model", args.export_gguf, outtype=args.export_outtype)
        print(f"wrote {res['path']} (llama.cpp architecture '{res['arch']}', {args.export_outtype})")
    return 0


def _cmd_baseline(args) -> int:
    from .config import load_config
    from .pipeline import run_baseline
    from .run_folder import format_summary

    overrides = list(args.overrides) + [f"search.sparsity={args.sparsity}"]
    cfg = load_config(resolve_config(args.config), overrides)
    summary = run_baseline(cfg, args.method, args.output, progress=not args.quiet)
    print(format_summary(summary))
    return 0


def _cmd_eval(args) -> int:
    from .config import load_config
    from .pipeline import evaluate_folder

    overrides = list(args.overrides) + [f"model.name_or_path={args.model}"]
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    if args.seq_lens:
        overrides.append(f"eval.seq_lens=[{','.join(str(n) for n in args.seq_lens)}]")
    if args.max_tokens:
        overrides.append(f"eval.max_tokens={args.max_tokens}")
    cfg = load_config(resolve_config(args.config), overrides)
    res = evaluate_folder(cfg, tasks=args.tasks, limit=args.limit)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_export(args) -> int:
    from .export import export_gguf

    res = export_gguf(args.model, args.output, outtype=args.outtype, pre_tokenizer=args.pre_tokenizer)
    print(
        f"wrote {res['path']}: llama.cpp architecture '{res['arch']}', {res['layers']} layers, "
        f"{res['bytes'] / 2**20:.1f} MiB ({args.outtype})"
    )
    if "tensor_types" in res:  # what llama.cpp's quantizer chose, fallbacks for unfitting shapes included
        print("tensor types: " + ", ".join(f"{k} {n}" for k, n in res["tensor_types"].items()))
    return 0


def _cmd_sweep(args) -> int:
    import time

    from .config import load_config
    from .sweep import format_report, num_trials, search_space

    t0 = time.perf_counter()
    cfg = load_config(resolve_config(args.config), args.overrides)
    if cfg.sweep is None:
        raise UserError(
            f"--config {args.config} has no sweep section: a sweep needs sweep.lr (or sweep.lr_range) "
            "and/or sweep.sparsity / sweep.grid; see configs/smollm2/135m_sweep.yaml"
        )
    try:
        from .engine.ray.tune import run_sweep
    except ImportError as e:
        raise UserError(f"probprune sweep needs Ray Tune: pip install 'probprune[ray]' ({e})") from None
    print(f"sweep {cfg.name}: {num_trials(cfg.sweep)} trials over {', '.join(search_space(cfg.sweep))}", flush=True)
    df = run_sweep(cfg, args.output, address=args.address, smoke=args.smoke_test, resume=args.resume)
    print(format_report(df, cfg.sweep, Path(args.output), time.perf_counter() - t0))
    return 0 if (df["status"] == "finished").any() else 1


def _cmd_heal(args) -> int:
    from .config import load_config
    from .heal import format_heal_summary, heal

    base = args.config
    run_config = Path(args.model).parent / "config.yaml"
    if base is None and run_config.is_file():  # a run folder's model: its data, eval and seed settings by default
        base = run_config
    cfg = load_config(base, args.overrides)
    summary = heal(cfg, args.model, args.output, teacher=args.teacher, resume=args.resume, progress=not args.quiet)
    print(format_heal_summary(summary))
    print(f"\nwrote {args.output}/model (load with probprune.load_pruned), summary.json, metrics.jsonl, config.yaml")
    return 0


def _cmd_plan(args) -> int:
    from .config import load_config
    from .plan import format_plan, make_plan

    cfg = load_config(resolve_config(args.config), args.overrides)
    plan = make_plan(cfg, gpu_memory_gib=args.gpu_memory, calibrate_rate=not args.no_calibrate)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits is not False else 1


def _cmd_info(args) -> int:
    from .models.loading import load_model
    from .models.registry import get_adapter

    model, _ = load_model(args.model, args.dtype)
    adapter = get_adapter(model)
    try:
        space = adapter.mask_space(layers=True, channel_block=args.channel_block, query_heads=args.head_unit == "query")
    except ValueError as e:
        raise UserError(f"--head-unit {args.head_unit}: {e}") from None
    counts = space.type_counts()
    print(
        f"model {args.model}: {type(model).__name__} ({adapter.family} family), {space.num_layers} decoder layers, "
        f"{space.total_params:,} parameters ({space.prunable_params:,} prunable)"
    )
    print("| unit | count | parameters per unit | all units |")
    print("|---|---|---|---|")
    head_name = "query head" if space.query_heads else "head group"
    for t, name in ((0, head_name), (1, f"channel block ({args.channel_block})"), (2, "layer")):
        c = space.cost[space.unit_type == t]
        if c.size == 0:
            continue
        per = f"{c.min():,}" if c.min() == c.max() else f"{c.min():,}–{c.max():,}"
        print(f"| {name} | {counts[('head', 'channel', 'layer')[t]]:,} | {per} | {int(c.sum()):,} |")
    if args.layers:
        print("\n| layer | KV groups | query heads | channels |")
        print("|---|---|---|---|")
        for i, ls in enumerate(space.layers):
            print(f"| {i} | {ls.num_kv_heads} | {ls.num_query_heads} | {ls.intermediate_size} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .export import OUTTYPES

    p = argparse.ArgumentParser(prog="probprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="search a mask, compact, save and evaluate")
    pr.add_argument(
        "--config",
        required=True,
        help="YAML config file, or a packaged config's name (e.g. smollm2/135m_quickstart; see configs/)",
    )
    pr.add_argument("--output", required=True, type=Path, help="output folder")
    pr.add_argument("--resume", action="store_true", help="continue the search checkpointed in --output")
    pr.add_argument("--quiet", action="store_true")
    pr.add_argument(
        "--export-gguf",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the pruned model as one GGUF file for llama.cpp (see --export-outtype)",
    )
    pr.add_argument(
        "--export-outtype",
        default="f16",
        choices=OUTTYPES,
        help="matrix type of --export-gguf (k-quants and q4_0 need probprune[llamacpp])",
    )
    pr.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. search.lr=0.01")
    pr.set_defaults(func=_cmd_prune)

    from .baselines import BASELINES

    bl = sub.add_parser("baseline", help="prune with a built-in baseline (same outputs as prune)")
    bl.add_argument("--method", required=True, choices=BASELINES)
    bl.add_argument("--sparsity", required=True, type=float, help="fraction of prunable parameters removed")
    bl.add_argument("--config", required=True, help="YAML config file or packaged config name")
    bl.add_argument("--output", required=True, type=Path)
    bl.add_argument("--quiet", action="store_true")
    bl.add_argument("overrides", nargs="*")
    bl.set_defaults(func=_cmd_baseline)

    ev = sub.add_parser("eval", help="perplexity of any model folder on the held-out split (and lm-eval tasks)")
    ev.add_argument("--model", required=True, help="model folder, hub id or embedded:smollm2-135m")
    ev.add_argument("--config", default=None, help="config for data/eval settings (default: built-in defaults)")
    ev.add_argument("--dtype", default=None)
    ev.add_argument("--seq-lens", type=int, nargs="+", default=None)
    ev.add_argument("--max-tokens", type=int, default=None)
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs probprune[lm-eval] and a hub)")
    ev.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=_cmd_eval)

    ex = sub.add_parser("export", help="write a model folder as one GGUF file that llama.cpp runs")
    ex.add_argument("--model", required=True, help="model folder (e.g. runs/X/model) or embedded:smollm2-135m")
    ex.add_argument("--format", default="gguf", choices=["gguf"])
    ex.add_argument("--output", required=True, type=Path, help="the .gguf file to write")
    ex.add_argument(
        "--outtype",
        default="f16",
        choices=OUTTYPES,
        help="matrix type: f32, f16, bf16, q8_0 written directly; q4_k_m, q5_k_m, q6_k, q4_0 by llama.cpp's "
        "quantizer from the f16 export (needs probprune[llamacpp])",
    )
    ex.add_argument("--pre-tokenizer", default=None, help="llama.cpp pre-tokenizer name (default: detected)")
    ex.set_defaults(func=_cmd_export)

    sw = sub.add_parser("sweep", help="Ray Tune sweep of lr x sparsity (x any key): one search per trial, Pareto front")
    sw.add_argument(
        "--config",
        required=True,
        help="YAML config with a sweep section, or a packaged config's name (e.g. smollm2/135m_sweep)",
    )
    sw.add_argument("--output", required=True, type=Path, help="results folder (results.csv, pareto.md/png, best/)")
    sw.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS, else local)")
    sw.add_argument("--resume", action="store_true", help="continue the interrupted sweep of --output")
    sw.add_argument("--smoke-test", action="store_true", help=argparse.SUPPRESS)  # ray_jobs/sweep.py --smoke-test
    sw.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. sweep.lr=[0.01,0.03]")
    sw.set_defaults(func=_cmd_sweep)

    he = sub.add_parser("heal", help="distil a pruned model toward the dense model (uses gradients, unlike the search)")
    he.add_argument("--model", required=True, help="model folder to heal, e.g. runs/X/model")
    he.add_argument(
        "--teacher",
        default=None,
        help="dense model (default: heal.teacher, else model.name_or_path of the run's config.yaml)",
    )
    he.add_argument("--output", required=True, type=Path, help="output folder (new or empty)")
    he.add_argument("--config", default=None, help="config (default: the run's config.yaml next to --model)")
    he.add_argument("--resume", action="store_true", help="continue the heal checkpointed in --output")
    he.add_argument("--quiet", action="store_true")
    he.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. heal.tokens=65536")
    he.set_defaults(func=_cmd_heal)

    pl = sub.add_parser(
        "plan",
        help="memory per actor, whether it fits, replicas and time of a run, from the "
        "model's config alone (no weights are read)",
    )
    pl.add_argument("--config", required=True, help="YAML config (see configs/)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GiB",
        help="memory of one device (default: detected; engine.memory_gib)",
    )
    pl.add_argument(
        "--no-calibrate",
        action="store_true",
        help="use the fitted CPU rate instead of a short calibration forward on the device",
    )
    pl.add_argument("overrides", nargs="*", help="config overrides key=value")
    pl.set_defaults(func=_cmd_plan)

    inf = sub.add_parser("info", help="print a model's prunable units and their parameter costs")
    inf.add_argument("--model", required=True)
    inf.add_argument("--dtype", default="float32")
    inf.add_argument("--channel-block", type=int, default=1)
    inf.add_argument(
        "--head-unit",
        choices=("group", "query"),
        default="group",
        help="head units: KV groups, or query heads (models with one KV head per layer)",
    )
    inf.add_argument("--layers", action="store_true", help="also print per-layer widths")
    inf.set_defaults(func=_cmd_info)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides stand anywhere (``--config X a=1 --output D b=2``).

    argparse takes one run of positionals; overrides after a later option come back as unknown arguments and are
    appended to ``overrides`` in order. Anything else unknown is an error, as usual.
    """
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    _setup(getattr(args, "quiet", False))
    termination.install()  # SIGTERM unwinds like Ctrl-C; kept across ray.init (probprune.engine.ray.connect)
    try:
        return args.func(args)
    except UserError as e:
        print(f"probprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return termination.report_interrupt("probprune", RESUME_HINT)


if __name__ == "__main__":
    sys.exit(main())
