"""Typed run configuration: dataclasses loaded from YAML plus ``a.b=c`` overrides, validated at load.

Every problem found is collected and reported together in one :class:`~probprune.errors.ConfigError`, each message
naming the dotted field and the offending value::

    invalid config, found the following errors:
      - unknown config key 'search.lrr' (did you mean 'search.lr'?)
      - search.sparsity must be in (0, 1), got 1.5

Example:
    >>> cfg = load_config("configs/smollm2/135m_quickstart.yaml", ["search.sparsity=0.3", "eval.seq_lens=[128]"])
    >>> cfg.search.sparsity
    0.3
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from probprune.errors import ConfigError, UserError

__all__ = [
    "ModelConfig",
    "DataConfig",
    "MaskConfig",
    "SearchConfig",
    "EngineConfig",
    "EvalConfig",
    "SweepConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "validate_config",
    "parse_override",
]

# A check returns None when the value is fine, else the constraint it breaks ("must be >= 1").
Check = Callable[[Any], str | None]


def _one_of(*allowed: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of " + ", ".join(repr(a) for a in allowed)

    return check


def _at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _open_unit(v: Any) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


_DEVICE_RE = re.compile(r"cpu|cuda|cuda:\d+|auto")


def _device(v: str) -> str | None:
    return None if _DEVICE_RE.fullmatch(v) else "must be one of 'cpu', 'cuda', 'cuda:N', 'auto'"


_DEVICE_MAP_STRINGS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(v: Any) -> str | None:
    if isinstance(v, str):
        return _one_of(*_DEVICE_MAP_STRINGS)(v)
    if isinstance(v, dict):
        bad = [k for k, d in v.items() if isinstance(d, bool) or not isinstance(d, (int, str))]
        return f"must map module names to a device (int or str); bad entries: {bad}" if bad else None
    return None


def _data_file(v: str) -> str | None:
    """A .txt / .jsonl file, or a folder (its .txt / .jsonl files are read, recursively)."""
    if v.endswith((".txt", ".jsonl")) or Path(v).expanduser().is_dir():
        return None
    return "must be a .txt or .jsonl file, or a folder of them"


def _nonempty(v: Any) -> str | None:
    return None if len(v) > 0 else "must not be empty"


def _opt(default: Any = None, *, check: Check | None = None, each: Check | None = None, factory: Any = None) -> Any:
    """A dataclass field with a value check (``check``) and/or a per-item check for lists (``each``)."""
    meta = {"check": check, "each": each}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which model to prune and where it lives."""

    name_or_path: str = _opt("embedded:smollm2-135m", check=_nonempty)  # HF id, local folder, "embedded:…", "tiny:…"
    dtype: str = _opt("float32", check=_one_of("float32", "bfloat16", "float16"))
    device: str = _opt("cpu", check=_device)
    device_map: str | dict | None = _opt(None, check=_device_map)  # accelerate device_map for multi-device replicas
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Calibration and held-out text."""

    source: str = _opt("brown", check=_one_of("brown", "hf", "files"))
    dataset: str | None = None  # hf: "wikitext", "allenai/c4"
    dataset_config: str | None = None  # hf: "wikitext-2-raw-v1", "en"
    text_field: str = _opt("text", check=_nonempty)
    train_split: str = _opt("train", check=_nonempty)
    test_split: str = _opt("test", check=_nonempty)
    paths: list[str] = _opt(factory=list, each=_data_file)  # files: calibration .txt / .jsonl
    test_paths: list[str] = _opt(factory=list, each=_data_file)  # files: held-out (else test_fraction of paths)
    test_fraction: float = _opt(0.1, check=_open_unit)  # share of files held out (brown / files)
    split_seed: int = _opt(0, check=_at_least(0))  # seed of the split by file: fixed, so every run seed sees one test set
    block_len: int = _opt(128, check=_at_least(8))  # calibration block length in tokens
    calib_blocks: int = _opt(1024, check=_at_least(1))  # calibration blocks drawn from the calibration split


@dataclass
class MaskConfig:
    """Which units are prunable and how channels are grouped."""

    heads: bool = True
    # "group": a head unit is one KV group with its query heads; "query": one query head (models with one KV head per
    # layer, e.g. small Gemma 3, where a KV group is the layer's whole attention)
    head_unit: str = _opt("group", check=_one_of("group", "query"))
    channels: bool = True
    layers: bool = False
    channel_block: int = _opt(1, check=_at_least(1))  # channels per channel unit
    block_order: str = _opt("index", check=_one_of("index", "metric"))  # how channel blocks are formed in a layer
    align: int = _opt(1, check=_at_least(1))  # round kept widths to a multiple of this (1 = off)
    # "uniform": every layer keeps the same number of head groups and the same MLP width (the search still learns
    # which ones): the pruned model is a stock checkpoint. "free": per-layer widths (the search's default).
    shape: str = _opt("free", check=_one_of("free", "uniform"))


@dataclass
class SearchConfig:
    """The policy-gradient search (defaults = the paper preset)."""

    sparsity: float = _opt(0.5, check=_open_unit)  # fraction of prunable params removed
    budget: str = _opt("per_type", check=_one_of("per_type", "params"))
    method: str = _opt("units", check=_one_of("units", "allocation"))
    steps: int = _opt(300, check=_at_least(1))
    num_samples: int = _opt(2, check=_at_least(1))  # K masks per step
    batch_size: int = _opt(8, check=_at_least(1))  # calibration blocks per step
    lr: float = _opt(2e-3, check=_positive)
    lr_schedule: str = _opt("cosine", check=_one_of("cosine", "constant"))
    baseline: str = _opt("ema", check=_one_of("ema", "loo"))
    ema_window: int = _opt(5, check=_at_least(1))
    score_scaling: str = _opt("sqrt", check=_one_of("sqrt", "exact"))
    sampling: str = _opt("independent", check=_one_of("independent", "antithetic"))
    init: str = _opt("wanda-sp", check=_one_of("wanda-sp", "uniform", "random", "best"))  # "wanda" = old name
    init_blocks: int = _opt(32, check=_at_least(1))
    # "best": start from the forward-only baseline mask (or Wanda-sp init) with the lowest check-set loss, pulled
    # toward it as probs = (1 - init_mix) * mask + init_mix * (1 - sparsity)
    init_mix: float = _opt(0.25, check=_open_unit)
    objective: str = _opt("ce", check=_one_of("ce", "kl"))  # ce: next-token cross-entropy; kl: KL(dense || masked)
    # calibration blocks held out of the search's batches: the warm start is chosen on them, and the search returns
    # its own final mask or its start, whichever has the lower cross-entropy there (0 = off, the paper's behaviour)
    check_blocks: int = _opt(0, check=_at_least(0))
    checkpoint_every: int = _opt(50, check=_at_least(1))
    log_every: int = _opt(1, check=_at_least(1))


@dataclass
class EngineConfig:
    """Where masks are scored: in this process or on Ray actors."""

    kind: str = _opt("local", check=_one_of("local", "ray"))
    num_actors: int = _opt(2, check=_at_least(1))
    cpus_per_actor: float = _opt(1.0, check=_positive)
    gpus_per_actor: float = _opt(0.0, check=_at_least(0))
    threads: int | None = _opt(None, check=_at_least(1))
    address: str | None = None  # Ray address, e.g. "auto"
    fast_path: bool = True  # score masks with gathered weights (compute only kept units); False = batched
    # how masks are scored: "gathered" (each mask at its pruned width), "batched" (all K masks as per-row masks in one
    # dense forward), "auto" (time both on the first step, keep the faster); None = from fast_path
    scoring: str | None = _opt(None, check=_one_of("auto", "gathered", "batched"))
    # memory one device offers the run, GiB (None = detected: free GPU memory, or available RAM); `probprune prune`
    # refuses at start a configuration that `probprune plan` says does not fit
    memory_gib: float | None = _opt(None, check=_positive)
    max_retries: int = _opt(3, check=_at_least(0))
    # how Ray places the actors: "default" (Ray's: fills a node before the next) or "spread" (one node after another)
    placement: str = _opt("default", check=_one_of("default", "spread"))


@dataclass
class EvalConfig:
    """Held-out perplexity evaluation."""

    seq_lens: list[int] = _opt(factory=lambda: [128, 2048], check=_nonempty, each=_at_least(8))
    max_tokens: int = _opt(32768, check=_at_least(1))  # held-out tokens evaluated per window length
    batch_size: int = _opt(4, check=_at_least(1))


@dataclass
class SweepConfig:
    """A Ray Tune sweep: grid over lr × sparsity (× extra keys), one search per trial."""

    lr: list[float] = _opt(factory=list, each=_positive)
    lr_range: list[float] | None = _opt(None, each=_positive)  # [low, high], log-uniform
    sparsity: list[float] = _opt(factory=list, each=_open_unit)
    grid: dict[str, list] = _opt(factory=dict)  # extra dotted keys -> values, {"search.num_samples": [2, 8]}
    num_samples: int = _opt(1, check=_at_least(1))  # Tune samples per grid point
    scheduler: str = _opt("none", check=_one_of("none", "asha"))
    search_alg: str = _opt("grid", check=_one_of("grid", "optuna"))
    report_every: int = _opt(10, check=_at_least(1))
    max_concurrent: int = _opt(0, check=_at_least(0))  # 0 = no limit
    storage_path: str = _opt("runs/sweeps", check=_nonempty)
    trial_cpus: float = _opt(1.0, check=_positive)
    trial_gpus: float = _opt(0.0, check=_at_least(0))


@dataclass
class Config:
    """A whole run: model, data, mask space, search, engine, evaluation and an optional sweep."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig | None = None
    seed: int = _opt(0, check=_at_least(0))
    name: str = _opt("probprune", check=_nonempty)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "mask": MaskConfig,
    "search": SearchConfig,
    "engine": EngineConfig,
    "eval": EvalConfig,
    "sweep": SweepConfig,
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _valid_keys() -> list[str]:
    """Every dotted key of the schema, sections included: ['model', 'model.name_or_path', …, 'seed', 'name']."""
    keys: list[str] = []
    for f in dataclasses.fields(Config):
        keys.append(f.name)
        if f.name in _SECTIONS:
            keys.extend(f"{f.name}.{g.name}" for g in dataclasses.fields(_SECTIONS[f.name]))
    return keys


def _leaf_type(dotted: str) -> Any:
    """Type of a dotted leaf key ('search.lr' -> float), or None if the key is not a leaf of the schema."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return None if parts[0] in _SECTIONS else _hints(Config).get(parts[0])
    if len(parts) == 2 and parts[0] in _SECTIONS:
        return _hints(_SECTIONS[parts[0]]).get(parts[1])
    return None


def _suggest(key: str) -> str:
    """' (did you mean 'x.y'?)' for the closest valid key, or ''."""
    valid = _valid_keys()
    parent, _, leaf = key.rpartition(".")
    leaf_of = {k: k.rpartition(".")[2] for k in valid}
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    # the same field name in another section ('search.block_len' -> 'data.block_len'), a sibling close in
    # spelling ('search.lrr' -> 'search.lr'), or a field close in spelling anywhere
    match = [k for k in valid if leaf_of[k] == leaf]
    for candidates, cutoff in ((siblings, 0.6), (valid, 0.8)):
        if not match:
            close = difflib.get_close_matches(leaf, [leaf_of[k] for k in candidates], n=1, cutoff=cutoff)
            match = [k for k in candidates if close and leaf_of[k] == close[0]]
    return f" (did you mean '{match[0]}'?)" if match else ""


def _unknown(key: str) -> str:
    return f"unknown config key '{key}'{_suggest(key)}"


# --------------------------------------------------------------------------------------------------------------------
# Type conversion and checks
# --------------------------------------------------------------------------------------------------------------------

_INVALID = object()


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is list:
        return f"a list of {args[0].__name__}" if args else "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    return {int: "an int", float: "a number", bool: "a bool", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Return ``value`` as type ``tp`` or append an error naming ``key`` and return _INVALID."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, arg, key, trial)
            if not trial:
                return out
            if _matches_container(value, arg):  # right container, bad contents: report the inner errors
                errors.extend(trial)
                return _INVALID
        errors.append(f"{key} must be {_describe(tp)}, got {value!r}")
        return _INVALID
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key} must be {_describe(tp)}, got {value!r}")
            return _INVALID
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{key} must be {_describe(tp)}, got {value!r}")
            return _INVALID
        return copy.deepcopy(dict(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            if math.isfinite(number):
                return number
            errors.append(f"{key} must be a finite number, got {value!r}")
            return _INVALID
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    errors.append(f"{key} must be {_describe(tp)}, got {value!r}")
    return _INVALID


def _matches_container(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return (origin is list and isinstance(value, (list, tuple))) or (origin is dict and isinstance(value, Mapping))


def _as_float(value: Any) -> float | None:
    """ints and floats; also strings such as '1e-3', which PyYAML (YAML 1.1) loads as str, not float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _check(value: Any, f: dataclasses.Field, key: str, errors: list[str]) -> None:
    check, each = f.metadata.get("check"), f.metadata.get("each")
    if value is None:
        return
    if check is not None and (problem := check(value)):
        errors.append(f"{key} {problem}, got {value!r}")
    if each is not None:
        for i, item in enumerate(value):
            if problem := each(item):
                errors.append(f"{key}[{i}] {problem}, got {item!r}")


def _build(cls: type, data: Any, prefix: str, errors: list[str], bad: set[str]) -> Any:
    """Build dataclass ``cls`` from mapping ``data``; unknown keys and bad values go to ``errors``.

    A field with a bad value keeps its default and its dotted key goes to ``bad``, so cross-field rules that do not
    involve it can still run and every problem is reported in one pass.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        errors.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
        bad.add(prefix.rstrip("."))
        return cls()
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str) or key not in fields:
            errors.append(_unknown(f"{prefix}{key}"))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}{name}"
        tp = hints[name]
        section = _section_type(tp)
        if section is not None:
            if data[name] is None and type(None) in typing.get_args(tp):
                kwargs[name] = None
            else:
                kwargs[name] = _build(section, data[name], f"{key}.", errors, bad)
            continue
        n_before = len(errors)
        value = _convert(data[name], tp, key, errors)
        if len(errors) == n_before:
            _check(value, f, key, errors)
        if len(errors) == n_before:
            kwargs[name] = value
        else:
            bad.add(key)
    return cls(**kwargs)


def _section_type(tp: Any) -> type | None:
    candidates = [tp, *typing.get_args(tp)]
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


# --------------------------------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------------------------------


def _cross_field(cfg: Config, bad: set[str]) -> list[str]:
    """Rules between fields; a rule is skipped when one of its fields already has an error of its own."""

    def ok(*keys: str) -> bool:
        return not any(k in bad or k.partition(".")[0] in bad for k in keys)

    errors: list[str] = []
    m, d, s, e = cfg.mask, cfg.data, cfg.search, cfg.engine
    if ok("mask.heads", "mask.channels", "mask.layers") and not (m.heads or m.channels or m.layers):
        errors.append("at least one of mask.heads, mask.channels, mask.layers must be true")
    if ok("mask.layers", "search.budget") and m.layers and s.budget != "params":
        errors.append(f"mask.layers=true requires search.budget='params', got {s.budget!r}")
    if ok("data.source", "data.paths") and d.source == "files" and not d.paths:
        errors.append("data.source='files' requires data.paths (a list of .txt / .jsonl files), got []")
    if ok("data.source", "data.dataset") and d.source == "hf" and not d.dataset:
        errors.append(f"data.source='hf' requires data.dataset (e.g. 'wikitext'), got {d.dataset!r}")
    if ok("engine.gpus_per_actor", "model.device") and e.gpus_per_actor > 0 and cfg.model.device == "cpu":
        errors.append(
            f"engine.gpus_per_actor={e.gpus_per_actor} requires a GPU model.device ('cuda' or 'auto'), got 'cpu'"
        )
    if ok("search.baseline", "search.num_samples") and s.baseline == "loo" and s.num_samples < 2:
        errors.append(f"search.baseline='loo' requires search.num_samples >= 2, got {s.num_samples}")
    if ok("search.sampling", "search.num_samples") and s.sampling == "antithetic" and s.num_samples % 2:
        errors.append(f"search.sampling='antithetic' requires an even search.num_samples, got {s.num_samples}")
    if ok("search.init", "search.check_blocks") and s.init == "best" and s.check_blocks < 1:
        errors.append("search.init='best' chooses its start on the check set and requires search.check_blocks >= 1, "
                      f"got {s.check_blocks}")
    if ok("engine.scoring", "engine.fast_path") and e.scoring == "gathered" and not e.fast_path:
        errors.append("engine.scoring='gathered' is the fast path and contradicts engine.fast_path=false")
    if ok("search.batch_size", "search.check_blocks", "data.calib_blocks") and (
        s.batch_size + s.check_blocks > d.calib_blocks
    ):
        errors.append(f"search.batch_size ({s.batch_size}) + search.check_blocks ({s.check_blocks}) must be <= "
                      f"data.calib_blocks ({d.calib_blocks})")
    if ok("search.init_blocks", "data.calib_blocks") and s.init_blocks > d.calib_blocks:
        errors.append(f"search.init_blocks ({s.init_blocks}) must be <= data.calib_blocks ({d.calib_blocks})")
    if ok("mask.shape", "search.method") and m.shape == "uniform" and s.method != "units":
        errors.append("mask.shape='uniform' learns which units each layer keeps, not how many: it requires "
                      f"search.method='units', got {s.method!r}")
    if ok("mask.shape", "search.init") and m.shape == "uniform" and s.init == "best":
        errors.append("mask.shape='uniform' starts from the Wanda-sp ranking: search.init='best' may pick a "
                      "non-uniform baseline; use search.init='wanda-sp', 'uniform' or 'random'")
    if ok("mask.shape", "mask.layers", "search.budget") and m.shape == "uniform" and (m.layers or s.budget != "per_type"):
        errors.append("mask.shape='uniform' requires mask.layers=false and search.budget='per_type'")
    if ok("mask.shape", "mask.align") and m.shape == "uniform" and m.align > 1:
        errors.append(f"mask.shape='uniform' already gives every layer one width: mask.align={m.align} must be 1")
    if ok("mask.align", "mask.channel_block") and m.align > 1 and m.align % m.channel_block:
        errors.append(f"mask.align ({m.align}) must be a multiple of mask.channel_block ({m.channel_block})")
    if ok("mask.align", "mask.channels") and m.align > 1 and not m.channels:
        errors.append(f"mask.align={m.align} aligns MLP widths and needs mask.channels=true")
    if cfg.sweep is not None and ok("sweep.lr", "sweep.lr_range", "sweep.sparsity", "sweep.grid"):
        errors.extend(_sweep_rules(cfg.sweep))
    return errors


def _sweep_rules(sw: SweepConfig) -> list[str]:
    errors: list[str] = []
    if sw.lr_range is not None:
        if len(sw.lr_range) != 2:
            errors.append(f"sweep.lr_range must be [low, high], got {sw.lr_range!r}")
        elif not sw.lr_range[0] < sw.lr_range[1]:
            errors.append(f"sweep.lr_range must have low < high, got {sw.lr_range!r}")
        if sw.lr:
            errors.append(f"sweep.lr and sweep.lr_range are mutually exclusive, got {sw.lr!r} and {sw.lr_range!r}")
    for key, values in sw.grid.items():
        where = f"sweep.grid[{key!r}]"
        tp = _leaf_type(key) if isinstance(key, str) else None
        if tp is None or key.startswith("sweep") or _section_type(tp) is not None:
            errors.append(f"{where}: {_unknown(str(key))}")
            continue
        if not isinstance(values, (list, tuple)) or not values:
            errors.append(f"{where} must be a non-empty list of values, got {values!r}")
            continue
        section, _, name = key.rpartition(".")
        f = next(f for f in dataclasses.fields(_SECTIONS[section] if section else Config) if f.name == name)
        for i, v in enumerate(values):
            item_errors: list[str] = []
            out = _convert(v, tp, f"{where}[{i}]", item_errors)
            if not item_errors:
                _check(out, f, f"{where}[{i}]", item_errors)
            errors.extend(item_errors)
        if (key == "search.lr" and (sw.lr or sw.lr_range)) or (key == "search.sparsity" and sw.sparsity):
            errors.append(f"{where} conflicts with sweep.{name}; set one of them")
    return errors


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys take their defaults).

    Raises:
        ConfigError: listing every unknown key, type error, out-of-range value and broken cross-field rule.
    """
    errors: list[str] = []
    bad: set[str] = set()
    cfg = _build(Config, _renamed(data), "", errors, bad)
    errors.extend(_cross_field(cfg, bad))
    if errors:
        raise ConfigError(errors)
    return cfg


# Values renamed since configs were first written: the old spelling still loads, as the new one.
_RENAMED_VALUES = {("search", "init"): {"wanda": "wanda-sp"}}


def _renamed(data: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if not isinstance(data, Mapping):
        return data
    out = dict(data)
    for (section, key), names in _RENAMED_VALUES.items():
        sec = out.get(section)
        if isinstance(sec, Mapping) and isinstance(sec.get(key), str) and sec[key] in names:
            out[section] = {**sec, key: names[sec[key]]}
    return out


def validate_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` if ``cfg`` (e.g. built or edited in code) breaks any rule."""
    config_from_dict(config_to_dict(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict of ``cfg`` (lists, dicts, scalars and None only), safe for ``yaml.safe_dump``."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``'a.b=c'`` into ``('a.b', value)``, the value read as YAML (``1e-2``, ``[128, 512]``, ``null``).

    Raises:
        UserError: if the text has no ``=``, an empty key or a value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"malformed override {text!r}: expected key=value, e.g. search.lr=1e-2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"override {text!r}: value is not valid YAML ({problem})") from None
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> str | None:
    """Set ``data[a][b]… = value`` for ``key`` 'a.b…'; return a problem, or None.

    Below a mapping-typed field the rest of the key is one dict key: 'sweep.grid.search.num_samples' sets
    ``data['sweep']['grid']['search.num_samples']``.
    """
    parts = key.split(".")
    for i in range(1, len(parts)):
        tp = _leaf_type(".".join(parts[:i]))
        if tp is not None and _is_mapping_field(tp):  # the rest of the key is one dict key
            parts = [*parts[:i], ".".join(parts[i:])]
            break
        if tp is not None:
            return f"'{'.'.join(parts[:i])}' is a value, not a section"
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            return f"'{'.'.join(parts[: i + 1])}' is {child!r}, not a mapping"
        node = child
    node[parts[-1]] = value
    return None


def _is_mapping_field(tp: Any) -> bool:
    return any(t is dict or typing.get_origin(t) is dict for t in (tp, *typing.get_args(tp)))


def _apply_to_dict(data: dict[str, Any], overrides: Sequence[str], errors: list[str]) -> None:
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        try:
            key, value = parse_override(text)
        except UserError as exc:
            errors.append(str(exc))
            continue
        if problem := _set_dotted(data, key, value):
            errors.append(f"override {text!r}: {problem}")


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Return a new validated :class:`Config`: ``cfg`` with ``a.b=c`` overrides applied (``cfg`` is unchanged).

    Raises:
        ConfigError: listing malformed overrides and every resulting invalid field.
    """
    data = config_to_dict(cfg)
    errors: list[str] = []
    _apply_to_dict(data, overrides, errors)
    return _finish(data, errors)


def _finish(data: Any, errors: list[str]) -> Config:
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors) from None
    if errors:
        raise ConfigError(errors)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    if path.is_dir():
        raise UserError(f"config path is a directory, not a YAML file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read config file {path}: it is not UTF-8 text (byte {exc.start}: "
                        f"{exc.object[exc.start:exc.start + 1]!r})") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise UserError(f"cannot parse config file {path}: {where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (``None`` = all defaults), apply ``a.b=c`` overrides and validate the result.

    Args:
        path: YAML file, or None for the defaults.
        overrides: strings ``'a.b=c'``; each value is read with ``yaml.safe_load`` (``search.lr=1e-2``,
            ``eval.seq_lens=[128,512]``, ``model.device_map=null``, ``sweep.grid.search.num_samples=[2,8]``).

    Returns:
        The validated :class:`Config`.

    Raises:
        UserError: the file is missing or is not valid YAML (the message names the file and line).
        ConfigError: every unknown key (with the closest valid key), type error, out-of-range value, malformed
            override and broken cross-field rule, all at once.

    Examples:
        >>> load_config(None, ["search.sparsity=0.3"]).search.sparsity
        0.3
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    errors: list[str] = []
    _apply_to_dict(data, overrides, errors)
    return _finish(data, errors)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then ``os.replace``) and return the path.

    ``load_config(save_config(cfg, p)) == cfg``.
    """
    from .files import write_text_atomic

    text = "# probprune config (written by save_config)\n" + yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=None
    )
    return write_text_atomic(path, text)
