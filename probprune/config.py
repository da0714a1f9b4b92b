"""Typed run configuration: dataclasses loaded from YAML plus ``a.b=c`` overrides, validated at load with pydantic.

The schema is a tree of dataclasses whose field annotations carry the types, bounds and descriptions
(``Annotated[int, Field(ge=1, description=...)]``); :mod:`pydantic` checks a nested mapping against it. Every problem
found is collected and reported together in one :class:`~probprune.errors.ConfigError`, each message naming the
dotted field and the offending value::

    invalid config, found the following errors:
      - unknown config key 'search.lrr' (did you mean 'search.lr'?)
      - search.sparsity must be in (0, 1), got 1.5

A field a config leaves out takes the recommended setting (the quickstart's search: allocation over 128-channel
blocks, warm start from the best forward-only baseline, KL objective, check set). The paper's method is a preset:
``preset: paper`` at the top of a config layers it under the file (preset < file < overrides). The classes below
are the single source of ``docs/configuration.md`` (``python -m probprune.config --markdown``).

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
import logging
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from probprune.errors import ConfigError, UserError

__all__ = [
    "ModelConfig",
    "DataConfig",
    "MaskConfig",
    "SearchConfig",
    "EngineConfig",
    "EvalConfig",
    "HealConfig",
    "SweepConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "validate_config",
    "parse_override",
    "presets",
    "reference_markdown",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------------------------------

# A check returns None when the value is fine, else the constraint it breaks ("must be one of ...").
Check = Callable[[Any], str | None]


def _rule(check: Check) -> AfterValidator:
    """A pydantic validator that reports ``check``'s problem as the field's message (the docstring documents it)."""

    def validate(value: Any) -> Any:
        if value is not None and (problem := check(value)):
            raise PydanticCustomError("config_rule", "{problem}", {"problem": problem})
        return value

    validate.__doc__ = check.__doc__
    return AfterValidator(validate)


def _yaml_float(value: Any) -> Any:
    """ints as floats; strings such as '1e-3', which PyYAML (YAML 1.1) loads as str, as the number they spell."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False), BeforeValidator(_yaml_float)]
NonEmptyStr = Annotated[Str, Field(min_length=1)]
Fraction = Annotated[Number, Field(gt=0, lt=1)]

_DEVICE_RE = re.compile(r"cpu|cuda|cuda:\d+|auto")


def _device(v: str) -> str | None:
    """'cpu', 'cuda', 'cuda:N', 'auto'"""
    return None if _DEVICE_RE.fullmatch(v) else "must be one of 'cpu', 'cuda', 'cuda:N', 'auto'"


def _device_entries(v: dict) -> str | None:
    """module name -> device (int or str)"""
    bad = [k for k, d in v.items() if isinstance(d, bool) or not isinstance(d, (int, str))]
    return f"must map module names to a device (int or str); bad entries: {bad}" if bad else None


def _data_file(v: str) -> str | None:
    """a .txt / .jsonl file, or a folder (its .txt / .jsonl files are read, recursively)"""
    if v.endswith((".txt", ".jsonl")) or Path(v).expanduser().is_dir():
        return None
    return "must be a .txt or .jsonl file, or a folder of them"


def _device_map_kind(v: Any) -> str | None:
    return "name" if isinstance(v, str) else "map" if isinstance(v, Mapping) else None


DeviceMapName = Annotated[Literal["auto", "balanced", "balanced_low_0", "sequential"], Tag("name")]
DeviceMap = Annotated[
    DeviceMapName | Annotated[dict[Any, Any], _rule(_device_entries), Tag("map")],
    Discriminator(_device_map_kind, custom_error_type="wrong_type", custom_error_message="wrong type"),
]
DataPath = Annotated[Str, _rule(_data_file)]


def _section(cls: type) -> type:
    """Pydantic settings shared by every section: unknown keys are errors."""
    cls.__pydantic_config__ = ConfigDict(extra="forbid")  # read by pydantic from a standard dataclass
    return dataclass(cls)


# --------------------------------------------------------------------------------------------------------------------
# Schema (defaults = the recommended settings; the paper's are probprune/presets/paper.yaml)
# --------------------------------------------------------------------------------------------------------------------


@_section
class ModelConfig:
    """Which model to prune and where it lives."""

    name_or_path: Annotated[
        NonEmptyStr,
        Field(
            description=(
                "Hugging Face hub id, local folder, `embedded:<name>` (shipped offline) or `tiny:<family>` (random test model)"
            )
        ),
    ] = "embedded:smollm2-135m"
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], Field(description="weights' dtype")] = "float32"
    device: Annotated[Str, _rule(_device), Field(description="where each replica's weights live")] = "cpu"
    device_map: Annotated[
        DeviceMap | None,
        Field(
            description=(
                "accelerate `device_map` that spreads one replica over several devices (a name or module -> device)"
            )
        ),
    ] = None
    trust_remote_code: Annotated[Bool, Field(description="let transformers run the checkpoint's own code")] = False


@_section
class DataConfig:
    """Calibration and held-out text."""

    source: Annotated[
        Literal["brown", "hf", "files"],
        Field(description=("`brown`: the embedded Brown corpus; `hf`: a `datasets` dataset; `files`: `data.paths`")),
    ] = "brown"
    dataset: Annotated[Str | None, Field(description="hf: dataset name, e.g. `wikitext`, `allenai/c4`")] = None
    dataset_config: Annotated[Str | None, Field(description=("hf: dataset config, e.g. `wikitext-2-raw-v1`, `en`"))] = (
        None
    )
    text_field: Annotated[NonEmptyStr, Field(description="hf / .jsonl: the record field holding the text")] = "text"
    train_split: Annotated[NonEmptyStr, Field(description="hf: calibration split")] = "train"
    test_split: Annotated[NonEmptyStr, Field(description="hf: held-out split")] = "test"
    paths: Annotated[list[DataPath], Field(description="files: calibration .txt / .jsonl files or folders")] = field(
        default_factory=list
    )
    test_paths: Annotated[
        list[DataPath], Field(description=("files: held-out files (else `data.test_fraction` of `data.paths`)"))
    ] = field(default_factory=list)
    test_fraction: Annotated[Fraction, Field(description="brown / files: share of files held out")] = 0.1
    split_seed: Annotated[
        Int, Field(ge=0, description=("seed of the split by file: fixed, so every run seed sees one test set"))
    ] = 0
    block_len: Annotated[Int, Field(ge=8, description="calibration block length in tokens")] = 128
    calib_blocks: Annotated[Int, Field(ge=1, description="calibration blocks drawn from the calibration split")] = 1024
    bos: Annotated[
        Literal["auto"] | Bool,
        Field(
            description=(
                "a BOS token first in every calibration block and evaluation window: `auto` = where the model family "
                "prescribes it (Gemma 3), none elsewhere (LLaMA-family numbers stay comparable with LLM-Pruner's protocol); "
                "`true` / `false` force it"
            )
        ),
    ] = "auto"


@_section
class MaskConfig:
    """Which units are prunable and how channels are grouped."""

    heads: Annotated[Bool, Field(description="attention head units are prunable")] = True
    head_unit: Annotated[
        Literal["group", "query"],
        Field(
            description=(
                "`group`: a head unit is one KV group with its query heads; `query`: one query head (models with one KV "
                "head per layer, e.g. small Gemma 3, where a KV group is the layer's whole attention)"
            )
        ),
    ] = "group"
    channels: Annotated[Bool, Field(description="MLP channel units are prunable")] = True
    layers: Annotated[
        Bool, Field(description=("whole decoder layers are units too (needs `search.budget: params`)"))
    ] = False
    channel_block: Annotated[
        Int,
        Field(
            ge=1, description=("MLP channels per channel unit; every kept MLP width is a multiple of it (the paper: 1)")
        ),
    ] = 128
    block_order: Annotated[
        Literal["index", "metric"],
        Field(
            description=(
                "how channel blocks are formed in a layer: `metric` groups channels of similar Wanda-sp rank (the "
                "permutation is saved), `index` takes them in order (the paper)"
            )
        ),
    ] = "metric"
    align: Annotated[Int, Field(ge=1, description="round kept MLP widths to a multiple of this (1 = off)")] = 1
    shape: Annotated[
        Literal["free", "uniform"],
        Field(
            description=(
                "`free`: per-layer widths; `uniform`: every layer keeps the same number of head groups and the same MLP "
                "width (the search still learns which ones), so the pruned model is a stock checkpoint; needs "
                "`search.method: units` and a `search.init` other than `best`"
            )
        ),
    ] = "free"


@_section
class SearchConfig:
    """The policy-gradient search (defaults = the recommended search; the paper's is `preset: paper`)."""

    sparsity: Annotated[Fraction, Field(description="fraction of prunable parameters removed")] = 0.5
    budget: Annotated[
        Literal["per_type", "params"],
        Field(
            description=(
                "`per_type`: heads and channels each at the keep ratio; `params`: one parameter budget over all units"
            )
        ),
    ] = "per_type"
    method: Annotated[
        Literal["units", "allocation"],
        Field(
            description=(
                "`allocation`: one keep fraction per (layer, unit type), units inside a layer ranked by Wanda-sp; "
                "`units`: one keep probability per unit (the paper)"
            )
        ),
    ] = "allocation"
    steps: Annotated[Int, Field(ge=1, description="policy-gradient steps")] = 150
    masks_per_step: Annotated[Int, Field(ge=1, description="K: masks sampled and scored per step")] = 4
    batch_size: Annotated[Int, Field(ge=1, description="calibration blocks per step")] = 4
    lr: Annotated[Number, Field(gt=0, description="learning rate of the keep-probability logits")] = 0.1
    lr_schedule: Annotated[Literal["cosine", "constant"], Field(description="learning-rate schedule")] = "cosine"
    baseline: Annotated[
        Literal["ema", "loo"],
        Field(
            description=(
                "`loo`: each sample's baseline is the mean loss of the other K-1 (needs K >= 2); `ema`: moving average"
            )
        ),
    ] = "loo"
    ema_window: Annotated[Int, Field(ge=1, description="steps averaged by the `ema` baseline")] = 5
    score_scaling: Annotated[
        Literal["sqrt", "exact"],
        Field(
            description=(
                "scaling of the policy-gradient score: `sqrt` divides k - n*s by sqrt(n*s*(1-s)), `exact` by s*(1-s)"
            )
        ),
    ] = "sqrt"
    sampling: Annotated[
        Literal["independent", "antithetic"],
        Field(description=("`antithetic` samples masks in mirrored pairs (needs an even K)")),
    ] = "independent"
    init: Annotated[
        Literal["wanda-sp", "uniform", "random", "best"],
        Field(
            description=(
                "start of the search: `best` = the forward-only baseline mask (or Wanda-sp init) with the lowest "
                "check-set loss, pulled toward it as probs = (1 - init_mix) * mask + init_mix * (1 - sparsity); "
                "`wanda` is read as `wanda-sp`"
            )
        ),
    ] = "best"
    init_blocks: Annotated[
        Int,
        Field(
            ge=1,
            description=("calibration blocks of the input statistics (Wanda-sp scores, `mask.block_order: metric`)"),
        ),
    ] = 32
    init_mix: Annotated[Fraction, Field(description="`best`: weight of the uniform keep ratio in the start")] = 0.25
    objective: Annotated[
        Literal["ce", "kl"],
        Field(
            description=(
                "`kl`: KL(dense || masked) on the calibration tokens (needs `engine.fast_path`); `ce`: next-token "
                "cross-entropy (the paper)"
            )
        ),
    ] = "kl"
    check_blocks: Annotated[
        Int,
        Field(
            ge=0,
            description=(
                "calibration blocks held out of the search's batches: the warm start is chosen on them, and the search "
                "returns its own final mask or its start, whichever has the lower cross-entropy there (0 = off, the paper)"
            ),
        ),
    ] = 32
    checkpoint_every: Annotated[Int, Field(ge=1, description="steps between search checkpoints")] = 50
    log_every: Annotated[Int, Field(ge=1, description="steps between log lines")] = 1


@_section
class EngineConfig:
    """Where masks are scored: in this process or on Ray actors."""

    kind: Annotated[Literal["local", "ray"], Field(description="`local`: this process; `ray`: Ray actors")] = "local"
    num_actors: Annotated[Int, Field(ge=1, description="ray: model replicas (one actor each)")] = 2
    cpus_per_actor: Annotated[Number, Field(gt=0, description="ray: CPUs reserved per actor")] = 1.0
    gpus_per_actor: Annotated[Number, Field(ge=0, description="ray: GPUs reserved per actor")] = 0.0
    threads: Annotated[Int | None, Field(ge=1, description="torch threads per process (null = torch's)")] = None
    address: Annotated[Str | None, Field(description="ray: cluster address, e.g. `auto`")] = None
    fast_path: Annotated[
        Bool,
        Field(
            description=(
                "score masks with gathered weights (compute only kept units); false: the batched masked forward"
            )
        ),
    ] = True
    scoring: Annotated[
        Literal["auto", "gathered", "batched"] | None,
        Field(
            description=(
                "how masks are scored: `gathered` (each mask at its pruned width), `batched` (all K masks as per-row masks "
                "in one dense forward), `auto` (time both on the first step, keep the faster); null = from `fast_path`"
            )
        ),
    ] = None
    memory_gib: Annotated[
        Number | None,
        Field(
            gt=0,
            description=(
                "memory one device offers the run, GiB (null = detected: free GPU memory, or available RAM); `probprune "
                "prune` refuses at start a configuration that `probprune plan` says does not fit"
            ),
        ),
    ] = None
    max_retries: Annotated[Int, Field(ge=0, description="ray: times a lost actor's work is retried")] = 3
    placement: Annotated[
        Literal["default", "spread"],
        Field(description=("ray: how actors are placed: `default` (Ray's: fills a node before the next) or `spread`")),
    ] = "default"


@_section
class EvalConfig:
    """Held-out perplexity evaluation."""

    seq_lens: Annotated[
        list[Annotated[Int, Field(ge=8)]],
        Field(min_length=1, description=("window lengths in tokens, one perplexity each")),
    ] = field(default_factory=lambda: [128, 2048])
    max_tokens: Annotated[Int, Field(ge=1, description="held-out tokens evaluated per window length")] = 32768
    batch_size: Annotated[Int, Field(ge=1, description="windows per forward")] = 4


@_section
class ReconstructConfig:
    """Forward-only reconstruction of the kept output columns once the mask is chosen (:mod:`probprune.reconstruct`)."""

    enabled: Annotated[
        Bool,
        Field(
            description=(
                "re-fit the kept weights after the mask is chosen (with a check set, kept only where it lowers the "
                "check-set loss)"
            )
        ),
    ] = True
    target: Annotated[
        Literal["local", "dense"],
        Field(
            description=(
                "`local`: the dense sublayer on the pruned model's own input; `dense`: the dense model's own activations"
            )
        ),
    ] = "local"
    mode: Annotated[
        Literal["bias", "refit", "refit+bias"],
        Field(
            description=(
                "`refit`: ridge least squares of the kept output columns (no new parameters); `bias`: a mean-compensation "
                "output bias; `refit+bias`: both"
            )
        ),
    ] = "refit"
    damping: Annotated[
        Number, Field(ge=0, description=("ridge λ relative to the mean diagonal of the Gram matrix"))
    ] = 0.1
    blocks: Annotated[
        Int, Field(ge=1, description=("calibration blocks used, the first ones (at most all but the check set)"))
    ] = 128
    removed_layers: Annotated[
        Bool,
        Field(
            description=(
                "fold each span of removed layers into the down_proj of the kept layer before it (ReplaceMe; no new "
                "parameters; pre-norm families only: ignored for Gemma 3, whose sublayer outputs are normed)"
            )
        ),
    ] = True
    choose: Annotated[
        Bool,
        Field(
            description=("the check-set choice compares search result and start, each with and without reconstruction")
        ),
    ] = True
    candidates: Annotated[
        Int,
        Field(
            ge=0,
            description=(
                "`search.init: best` also scores its N best start candidates re-fit (one reconstruction each) and "
                "starts from the best of all, re-fit or not"
            ),
        ),
    ] = 2


@_section
class SweepConfig:
    """A Ray Tune sweep: grid over lr x sparsity (x extra keys), one search per trial."""

    lr: Annotated[list[Annotated[Number, Field(gt=0)]], Field(description="values of `search.lr`")] = field(
        default_factory=list
    )
    lr_range: Annotated[
        list[Annotated[Number, Field(gt=0)]] | None,
        Field(description=("[low, high]: `search.lr` drawn log-uniformly (instead of `sweep.lr`)")),
    ] = None
    sparsity: Annotated[list[Fraction], Field(description="values of `search.sparsity`")] = field(default_factory=list)
    grid: Annotated[
        dict[Any, Any],
        Field(description=("more dotted keys -> lists of values, e.g. `{search.masks_per_step: [2, 8]}`")),
    ] = field(default_factory=dict)
    num_samples: Annotated[Int, Field(ge=1, description="Tune samples per grid point")] = 1
    scheduler: Annotated[Literal["none", "asha"], Field(description="Tune trial scheduler")] = "none"
    search_alg: Annotated[Literal["grid", "optuna"], Field(description="Tune search algorithm")] = "grid"
    report_every: Annotated[Int, Field(ge=1, description="search steps between reports to Tune")] = 10
    max_concurrent: Annotated[Int, Field(ge=0, description="trials at a time (0 = no limit)")] = 0
    storage_path: Annotated[NonEmptyStr, Field(description="folder of Tune's experiments")] = "runs/sweeps"
    trial_cpus: Annotated[Number, Field(gt=0, description="CPUs per trial")] = 1.0
    trial_gpus: Annotated[Number, Field(ge=0, description="GPUs per trial")] = 0.0


@_section
class HealConfig:
    """Healing after pruning: distillation from the dense model's next-token distribution (uses gradients).

    ``tokens`` > 0 makes ``probprune prune`` heal its pruned model at the end of the run; ``probprune heal`` heals any
    saved model. Training steps = ceil(tokens / (batch_size * block_len)).
    """

    tokens: Annotated[Int, Field(ge=0, description="calibration tokens to train on (0: no healing in `prune`)")] = 0
    teacher: Annotated[
        Str | None,
        Field(description=("the dense model to distil from (default: `model.name_or_path`, the model the run pruned)")),
    ] = None
    teacher_dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        Field(description=("teacher weights' dtype (`auto`: `model.dtype`)")),
    ] = "auto"
    block_len: Annotated[Int, Field(ge=8, description="tokens per training sequence")] = 128
    batch_size: Annotated[Int, Field(ge=1, description="sequences per optimizer step, over all workers together")] = 4
    grad_accum: Annotated[Int, Field(ge=1, description="micro-batches per step on each worker")] = 1
    lr: Annotated[
        Number,
        Field(
            gt=0, description="AdamW peak learning rate (3e-4: best of 1e-4, 3e-4, 1e-3 at 64k tokens on SmolLM2-135M)"
        ),
    ] = 3e-4
    warmup: Annotated[Number, Field(ge=0, lt=1, description="share of the steps spent warming up")] = 0.05
    weight_decay: Annotated[Number, Field(ge=0, description="AdamW weight decay")] = 0.0
    max_grad_norm: Annotated[Number, Field(ge=0, description="gradient-norm clipping (0: none)")] = 1.0
    ce_weight: Annotated[
        Number, Field(ge=0, le=1, description=("loss = (1 - w)·KL(teacher ‖ student) + w·cross-entropy with the text"))
    ] = 0.0
    method: Annotated[
        Literal["full", "lora"],
        Field(description=("`full`: every parameter; `lora`: low-rank adapters (peft), merged back at the end")),
    ] = "full"
    lora_rank: Annotated[Int, Field(ge=1, description="LoRA rank")] = 16
    lora_alpha: Annotated[Number, Field(gt=0, description="LoRA alpha")] = 32.0
    lora_targets: Annotated[
        list[Str], Field(description=("LoRA module names ([] = every linear layer except the output head)"))
    ] = field(default_factory=list)
    autocast: Annotated[
        Literal["auto", "bf16", "off"], Field(description=("`auto`: bf16 autocast on CUDA, off on CPU"))
    ] = "auto"
    save_dtype: Annotated[
        Literal["float32", "bfloat16", "float16"], Field(description=("dtype of the healed model's saved weights"))
    ] = "float32"
    eval_every: Annotated[
        Int, Field(ge=0, description=("held-out perplexity every N steps (0: before and after only)"))
    ] = 0
    checkpoint_every: Annotated[Int, Field(ge=1, description="steps between training checkpoints")] = 50
    workers: Annotated[
        Int, Field(ge=1, description=("> 1: data-parallel with Ray Train, one worker per GPU (or CPU slot)"))
    ] = 1


def _heal_rules(h: HealConfig) -> list[str]:
    per_step = h.grad_accum * h.workers
    if h.batch_size % per_step:
        return [
            f"heal.batch_size ({h.batch_size}) must be a multiple of heal.grad_accum ({h.grad_accum}) x "
            f"heal.workers ({h.workers})"
        ]
    return []


@_section
class Config:
    """A whole run: model, data, mask space, search, engine, evaluation and an optional sweep."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    sweep: SweepConfig | None = None
    seed: Annotated[Int, Field(ge=0, description="seed of the run (calibration batches, masks)")] = 0
    name: Annotated[NonEmptyStr, Field(description="name of the run")] = "probprune"


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "mask": MaskConfig,
    "search": SearchConfig,
    "engine": EngineConfig,
    "eval": EvalConfig,
    "reconstruct": ReconstructConfig,
    "heal": HealConfig,
    "sweep": SweepConfig,
}

# Loading directives: keys a config file may hold besides the schema's.
_PRESET_KEY = "preset"
_PRESETS = Path(__file__).parent / "presets"

# Keys renamed since configs were first written: the old dotted key still loads, as the new one, with a warning.
_RENAMED_KEYS: dict[str, str] = {"search.num_samples": "search.masks_per_step"}

# Values renamed since configs were first written: the old spelling still loads, as the new one.
_RENAMED_VALUES = {("search", "init"): {"wanda": "wanda-sp"}}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def _valid_keys() -> list[str]:
    """Every dotted key of the schema, sections included: ['model', 'model.name_or_path', …, 'name', 'preset']."""
    keys: list[str] = []
    for f in dataclasses.fields(Config):
        keys.append(f.name)
        if f.name in _SECTIONS:
            keys.extend(f"{f.name}.{g.name}" for g in dataclasses.fields(_SECTIONS[f.name]))
    return [*keys, _PRESET_KEY]


def _leaf_type(dotted: str) -> Any:
    """Annotation of a dotted leaf key ('search.lr' -> Annotated[float, …]), or None if it is not a schema leaf."""
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
# Reading annotations: pydantic errors -> one message per field
# --------------------------------------------------------------------------------------------------------------------


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[X, m1, m2]`` -> (X, [m1, m2, ...]) with nested Annotated flattened; other types -> (tp, [])."""
    metadata: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        metadata = [*tp.__metadata__, *metadata]
        tp = tp.__origin__
    return tp, metadata


def _alternatives(tp: Any) -> list[Any]:
    """The alternatives of a (nested, Annotated) union, each with its own annotations; [tp] for any other type."""
    inner, _ = _unwrap(tp)
    if typing.get_origin(inner) in (Union, types.UnionType):
        return [alt for arg in typing.get_args(inner) for alt in _alternatives(arg)]
    return [tp]


def _members(tp: Any) -> list[Any]:
    """The bare types a value of ``tp`` may have: Optional[Annotated[int, …]] -> [int, NoneType]."""
    return [_unwrap(alt)[0] for alt in _alternatives(tp)]


_BOUND_TYPES = {
    "gt": annotated_types.Gt,
    "ge": annotated_types.Ge,
    "lt": annotated_types.Lt,
    "le": annotated_types.Le,
    "min_length": annotated_types.MinLen,
}


def _constraints(tp: Any) -> dict[str, Any]:
    """Bounds of a type: {'gt': 0, 'lt': 1, 'ge': …, 'min_length': …} from its annotated-types metadata."""
    _, metadata = _unwrap(tp)
    out: dict[str, Any] = {}
    stack = list(metadata)
    while stack:
        m = stack.pop(0)
        if isinstance(m, FieldInfo):
            stack.extend(m.metadata)
        for name, kind in _BOUND_TYPES.items():
            if isinstance(m, kind):
                out[name] = getattr(m, name)
    return out


def _rules(tp: Any) -> list[str]:
    """The documented rules (docstrings of ``_rule`` checks) of a type."""
    _, metadata = _unwrap(tp)
    return [m.func.__doc__ for m in metadata if isinstance(m, AfterValidator) and m.func.__doc__]


def _describe(tp: Any) -> str:
    """'an int', 'a number', 'a list of int', 'a string or a mapping or null', … for type errors and the docs."""
    members = _members(tp)
    if len(members) > 1:
        text = " or ".join(_describe(m) for m in members if m is not type(None))
        return text + " or null" if type(None) in members else text
    base = members[0]
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is list or base is list:
        return f"a list of {_unwrap(args[0])[0].__name__}" if args else "a list"
    if origin is dict or base is dict or dataclasses.is_dataclass(base):
        return "a mapping"
    if origin is Literal:
        return "a string"
    return {int: "an int", float: "a number", bool: "a bool", str: "a string"}.get(base, str(base))


def _allowed(tp: Any) -> str:
    """'one of 'a', 'b'', '>= 1', 'in (0, 1)', … (what a value must be beyond its type), or ''."""
    literals = [a for m in _members(tp) if typing.get_origin(m) is Literal for a in typing.get_args(m)]
    if literals:
        return "one of " + ", ".join(repr(a) for a in literals)
    c = _constraints(tp)
    if "gt" in c and "lt" in c:
        return f"in ({c['gt']}, {c['lt']})"
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{words[k]} {v}" for k, v in c.items() if k in words]
    if c.get("min_length"):
        parts.append("not empty")
    return ", ".join(parts)


def _locate(loc: Sequence[Any], tp: Any, key: str) -> tuple[str, Any]:
    """Follow a pydantic error location from type ``tp`` named ``key``: ('eval', 'seq_lens', 1) from Config ->
    ('eval.seq_lens[1]', <annotation of an item>). The type is None where the location leaves the schema."""
    for part in loc:
        members = [m for m in _members(tp) if m is not type(None)]
        base = members[0] if len(members) == 1 else None
        if base is not None and dataclasses.is_dataclass(base):
            key = f"{key}.{part}" if key else str(part)
            tp = _hints(base).get(part) if isinstance(part, str) else None
            if tp is None:
                return key, None
        elif base is not None and typing.get_origin(base) in (list, dict):
            key += f"[{part!r}]" if isinstance(part, str) else f"[{part}]"
            tp = typing.get_args(base)[-1] if typing.get_args(base) else Any
        else:  # a discriminated union: the part is the tag of the member that was tried
            options = [a for a in _alternatives(tp) if any(getattr(m, "tag", None) == part for m in _unwrap(a)[1])]
            if not options:
                return key, tp
            tp = options[0]
    return key, tp


def _shown(value: Any, tp: Any) -> Any:
    """The value as the message shows it: the number a float field read from it (0 -> 0.0, '1' -> 1.0)."""
    if float in _members(tp) and not isinstance(value, bool):
        converted = _yaml_float(value)
        if isinstance(converted, float):
            return converted
    return value


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error"}
_UNKNOWN_TYPES = {"unexpected_keyword_argument", "extra_forbidden", "invalid_key"}


def _message(err: Mapping[str, Any], tp: Any, key: str) -> str:
    """One line for one pydantic error of a value of type ``tp`` named ``key``."""
    where, leaf = _locate(err["loc"], tp, key)
    kind = err["type"]
    if kind in _UNKNOWN_TYPES or leaf is None:
        return _unknown(where)
    where = where or "config"
    got = _shown(err["input"], leaf)
    if kind == "config_rule":
        problem = err["ctx"]["problem"]
    elif kind in _BOUND_ERRORS:
        problem = f"must be {_allowed(leaf)}"
    elif kind in ("too_short", "string_too_short"):
        problem = "must not be empty"
    elif kind == "finite_number":
        problem = "must be a finite number"
    else:  # the wrong type
        problem = f"must be {_describe(leaf)}"
    return f"{where} {problem}, got {got!r}"


def _field_loc(loc: Sequence[Any]) -> tuple:
    """The location of the field an error belongs to: ('eval', 'seq_lens', 1) -> ('eval', 'seq_lens')."""
    return tuple(loc[: 2 if loc and loc[0] in _SECTIONS else 1])


def _order(loc: Sequence[Any]) -> tuple:
    """Errors in schema order (unknown keys of a section before its fields), as a reader goes down a file."""
    top = [f.name for f in dataclasses.fields(Config)]
    if not loc or loc[0] not in top:
        return (0,)
    if loc[0] not in _SECTIONS or len(loc) < 2:
        return (1, top.index(loc[0]))
    fields = [f.name for f in dataclasses.fields(_SECTIONS[loc[0]])]
    inner = (1, fields.index(loc[1]), *(p if isinstance(p, int) else 0 for p in loc[2:])) if loc[1] in fields else (0,)
    return (1, top.index(loc[0]), *inner)


def _validate(data: Any) -> tuple[Config, list[str], set[str]]:
    """Validate ``data`` against the schema: (config, errors, dotted keys of bad fields).

    A field with a bad value keeps its default in the returned config and its key goes to the bad set, so that
    cross-field rules not involving it can still run and every problem is reported in one pass.
    """
    try:
        return _adapter(Config).validate_python(data), [], set()
    except ValidationError as exc:
        errs = sorted(exc.errors(), key=lambda e: _order(e["loc"]))
    messages = [_message(e, Config, "") for e in errs]
    bad = {".".join(map(str, _field_loc(e["loc"]))) or "config" for e in errs if e["type"] not in _UNKNOWN_TYPES}
    cleaned = copy.deepcopy(data) if isinstance(data, Mapping) else {}
    for e in errs:  # drop each unknown key and each bad field: what remains is valid
        loc = e["loc"] if e["type"] in _UNKNOWN_TYPES else _field_loc(e["loc"])
        node = cleaned
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, Mapping) else None
        if not loc:
            cleaned = {}
        elif isinstance(node, dict):
            node.pop(loc[-1], None)
    try:
        cfg = _adapter(Config).validate_python(cleaned)
    except ValidationError:  # pragma: no cover - every bad value was removed above
        cfg = Config()
    return cfg, messages, bad


# --------------------------------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------------------------------


def _cross_field(cfg: Config, bad: set[str]) -> list[str]:
    """Rules between fields; a rule is skipped when one of its fields already has an error of its own."""

    def ok(*keys: str) -> bool:
        return "config" not in bad and not any(k in bad or k.partition(".")[0] in bad for k in keys)

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
    if ok("search.baseline", "search.masks_per_step") and s.baseline == "loo" and s.masks_per_step < 2:
        errors.append(f"search.baseline='loo' requires search.masks_per_step >= 2, got {s.masks_per_step}")
    if ok("search.sampling", "search.masks_per_step") and s.sampling == "antithetic" and s.masks_per_step % 2:
        errors.append(f"search.sampling='antithetic' requires an even search.masks_per_step, got {s.masks_per_step}")
    if ok("search.init", "search.check_blocks") and s.init == "best" and s.check_blocks < 1:
        errors.append(
            "search.init='best' chooses its start on the check set and requires search.check_blocks >= 1, "
            f"got {s.check_blocks}"
        )
    if ok("engine.scoring", "engine.fast_path") and e.scoring == "gathered" and not e.fast_path:
        errors.append("engine.scoring='gathered' is the fast path and contradicts engine.fast_path=false")
    if ok("search.batch_size", "search.check_blocks", "data.calib_blocks") and (
        s.batch_size + s.check_blocks > d.calib_blocks
    ):
        errors.append(
            f"search.batch_size ({s.batch_size}) + search.check_blocks ({s.check_blocks}) must be <= "
            f"data.calib_blocks ({d.calib_blocks})"
        )
    if ok("search.init_blocks", "data.calib_blocks") and s.init_blocks > d.calib_blocks:
        errors.append(f"search.init_blocks ({s.init_blocks}) must be <= data.calib_blocks ({d.calib_blocks})")
    if ok("mask.shape", "search.method") and m.shape == "uniform" and s.method != "units":
        errors.append(
            "mask.shape='uniform' learns which units each layer keeps, not how many: it requires "
            f"search.method='units', got {s.method!r}"
        )
    if ok("mask.shape", "search.init") and m.shape == "uniform" and s.init == "best":
        errors.append(
            "mask.shape='uniform' starts from the Wanda-sp ranking: search.init='best' may pick a "
            "non-uniform baseline; use search.init='wanda-sp', 'uniform' or 'random'"
        )
    if (
        ok("mask.shape", "mask.layers", "search.budget")
        and m.shape == "uniform"
        and (m.layers or s.budget != "per_type")
    ):
        errors.append("mask.shape='uniform' requires mask.layers=false and search.budget='per_type'")
    if ok("mask.shape", "mask.align") and m.shape == "uniform" and m.align > 1:
        errors.append(f"mask.shape='uniform' already gives every layer one width: mask.align={m.align} must be 1")
    if ok("mask.align", "mask.channel_block") and m.align > 1 and m.align % m.channel_block:
        errors.append(f"mask.align ({m.align}) must be a multiple of mask.channel_block ({m.channel_block})")
    if ok("mask.align", "mask.channels") and m.align > 1 and not m.channels:
        errors.append(f"mask.align={m.align} aligns MLP widths and needs mask.channels=true")
    if ok("heal.batch_size", "heal.grad_accum", "heal.workers"):
        errors.extend(_heal_rules(cfg.heal))
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
        if tp is None or key.startswith("sweep") or any(dataclasses.is_dataclass(m) for m in _members(tp)):
            errors.append(f"{where}: {_unknown(str(key))}")
            continue
        if not isinstance(values, (list, tuple)) or not values:
            errors.append(f"{where} must be a non-empty list of values, got {values!r}")
            continue
        for i, v in enumerate(values):
            try:
                _adapter(tp).validate_python(v)
            except ValidationError as exc:
                errors.extend(_message(err, tp, f"{where}[{i}]") for err in exc.errors())
        name = key.rpartition(".")[2]
        if (key == "search.lr" and (sw.lr or sw.lr_range)) or (key == "search.sparsity" and sw.sparsity):
            errors.append(f"{where} conflicts with sweep.{name}; set one of them")
    return errors


# --------------------------------------------------------------------------------------------------------------------
# Presets and renamed keys
# --------------------------------------------------------------------------------------------------------------------


def presets() -> list[str]:
    """Names a config's ``preset:`` may take (the YAML files of ``probprune/presets``)."""
    return sorted(p.stem for p in _PRESETS.glob("*.yaml"))


def _renamed_key(key: str) -> str:
    """The current name of a dotted key (with a warning naming both when ``key`` is an old one)."""
    new = _RENAMED_KEYS.get(key)
    if new is None:
        return key
    log.warning("config key '%s' is deprecated: it is now '%s' (read as such)", key, new)
    return new


def _rename_keys(data: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with old dotted keys (also those of ``sweep.grid``) moved to their new names."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for old in _RENAMED_KEYS:
        section, _, name = old.rpartition(".")
        holder = out.get(section) if section else out
        if not isinstance(holder, dict) or name not in holder:
            continue
        new = _renamed_key(old)
        new_section, _, new_name = new.rpartition(".")
        target = out.setdefault(new_section, {}) if new_section else out
        if not isinstance(target, dict) or new_name in target:
            errors.append(f"config sets both '{old}' and its new name '{new}'; keep only '{new}'")
            holder.pop(name)
            continue
        target[new_name] = holder.pop(name)
    sweep = out.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("grid"), Mapping):
        sweep["grid"] = {_renamed_key(k) if isinstance(k, str) else k: v for k, v in sweep["grid"].items()}
    return out


def _renamed_values(data: dict[str, Any]) -> dict[str, Any]:
    for (section, key), names in _RENAMED_VALUES.items():
        sec = data.get(section)
        if isinstance(sec, Mapping) and isinstance(sec.get(key), str) and sec[key] in names:
            data[section] = {**sec, key: names[sec[key]]}
    return data


def _with_preset(data: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """``data`` layered over the preset it names (``preset: paper``): a section of ``data`` updates the preset's."""
    name = data.pop(_PRESET_KEY, None)
    if name is None:
        return data
    if not isinstance(name, str) or name not in presets():
        errors.append(f"preset must be one of {', '.join(repr(p) for p in presets())}, got {name!r}")
        return data
    base = _rename_keys(_read_yaml(_PRESETS / f"{name}.yaml"), errors)
    for key, value in data.items():
        if key in _SECTIONS and key != "sweep" and value is None:
            continue  # an empty section sets nothing
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def _prepare(data: Any, errors: list[str]) -> Any:
    """Renamed keys and values, the preset, and empty sections read as ``{}`` (``sweep:`` empty = no sweep)."""
    if not isinstance(data, Mapping):
        return data
    data = _with_preset(_rename_keys(data, errors), errors)
    for name in _SECTIONS:
        if name != "sweep" and name in data and data[name] is None:
            data[name] = {}
    return _renamed_values(data)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys take their defaults).

    A top-level ``preset: NAME`` layers the mapping over the preset's settings (see :func:`presets`).

    Raises:
        ConfigError: listing every unknown key, type error, out-of-range value and broken cross-field rule.
    """
    errors: list[str] = []
    prepared = _prepare({} if data is None else data, errors)
    cfg, field_errors, bad = _validate(prepared)
    errors.extend(field_errors)
    errors.extend(_cross_field(cfg, bad))
    if errors:
        raise ConfigError(errors)
    return cfg


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

    Below a mapping-typed field the rest of the key is one dict key: 'sweep.grid.search.masks_per_step' sets
    ``data['sweep']['grid']['search.masks_per_step']``.
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
    return any(m is dict or typing.get_origin(m) is dict for m in _members(tp))


def _apply_to_dict(data: dict[str, Any], overrides: Sequence[str], errors: list[str]) -> None:
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        try:
            key, value = parse_override(text)
        except UserError as exc:
            errors.append(str(exc))
            continue
        if problem := _set_dotted(data, _renamed_key(key), value):
            errors.append(f"override {text!r}: {problem}")


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Return a new validated :class:`Config`: ``cfg`` with ``a.b=c`` overrides applied (``cfg`` is unchanged).

    Raises:
        ConfigError: listing malformed overrides and every resulting invalid field.
    """
    data = config_to_dict(cfg)
    errors: list[str] = []
    _apply_to_dict(data, overrides, errors)
    if _PRESET_KEY in data:
        errors.append(
            f"override '{_PRESET_KEY}={data.pop(_PRESET_KEY)}': a preset applies when a config is loaded "
            "(load_config), under the file; a built config already sets every field"
        )
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
        raise UserError(
            f"cannot read config file {path}: it is not UTF-8 text (byte {exc.start}: "
            f"{exc.object[exc.start : exc.start + 1]!r})"
        ) from None
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

    Settings are layered: the preset the file (or an override) names in ``preset:``, then the file, then the
    overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: strings ``'a.b=c'``; each value is read with ``yaml.safe_load`` (``search.lr=1e-2``,
            ``eval.seq_lens=[128,512]``, ``model.device_map=null``, ``sweep.grid.search.masks_per_step=[2,8]``,
            ``preset=paper``).

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
    errors: list[str] = []
    data = _rename_keys(_read_yaml(Path(path)), errors) if path is not None else {}
    _apply_to_dict(data, overrides, errors)
    return _finish(data, errors)


def config_text(cfg: Config) -> str:
    """The YAML text that :func:`save_config` writes for ``cfg`` (every field, no preset needed)."""
    return "# probprune config (written by save_config)\n" + yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=None
    )


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then ``os.replace``) and return the path.

    Every field is written, so the file needs no preset: ``load_config(save_config(cfg, p)) == cfg``.
    """
    from .files import write_text_atomic

    return write_text_atomic(path, config_text(cfg))


# --------------------------------------------------------------------------------------------------------------------
# Reference documentation
# --------------------------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """``docs/configuration.md``: every section and field with its type, default, allowed values and description."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m probprune.config --markdown > docs/configuration.md`; do not edit -->",
        "",
        "A config is a YAML file of the sections below; every field may be left out (it then takes the default "
        "shown) and set on the command line as `section.field=value` (the value read as YAML). Unknown keys, "
        "wrong types and values out of range are all reported at once, each naming the field and the value.",
        "",
        "The defaults are the recommended settings (those of `configs/smollm2/135m_quickstart.yaml`). A top-level "
        "`preset: NAME` loads a preset's settings under the file (preset < file < overrides); presets: "
        + ", ".join(f"`{p}`" for p in presets())
        + " (`probprune/presets/`). `preset: paper` is the method of the paper (arXiv 2406.10576).",
        "",
    ]
    if _RENAMED_KEYS:
        lines += [
            "Old key names that still load (with a warning): "
            + ", ".join(f"`{o}` → `{n}`" for o, n in _RENAMED_KEYS.items())
            + ".",
            "",
        ]
    hints = _hints(Config)
    paper = _read_yaml(_PRESETS / "paper.yaml")
    for top in dataclasses.fields(Config):
        if top.name not in _SECTIONS:
            continue
        cls = _SECTIONS[top.name]
        lines += [f"## `{top.name}`", "", cls.__doc__ or "", ""]
        if top.name == "sweep":
            lines += ["The section is optional (`null`, the default: no sweep).", ""]
        lines += [_HEADER, "|---|---|---|---|---|---|"]
        lines += [
            _row(f"{top.name}.{f.name}", f, _hints(cls)[f.name], paper.get(top.name, {}))
            for f in dataclasses.fields(cls)
        ]
        lines.append("")
    lines += ["## Top level", "", _HEADER, "|---|---|---|---|---|---|"]
    lines += [_row(f.name, f, hints[f.name], paper) for f in dataclasses.fields(Config) if f.name not in _SECTIONS]
    lines.append(
        f"| `{_PRESET_KEY}` | a string or null | `null` | | one of "
        + ", ".join(repr(p) for p in presets())
        + " | settings loaded under the file's |"
    )
    return "\n".join(lines) + "\n"


_HEADER = "| key | type | default | `preset: paper` | allowed | description |"


def _flow(value: Any) -> str:
    """A value as one line of YAML."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _row(key: str, f: dataclasses.Field, tp: Any, preset: Mapping[str, Any]) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    description = " ".join(m.description for m in _unwrap(tp)[1] if isinstance(m, FieldInfo) and m.description)
    allowed = "; ".join(a for a in [_allowed(tp), *_rules(tp)] if a)
    if typing.get_origin(_members(tp)[0]) is list:
        item = _allowed(typing.get_args(_members(tp)[0])[0]) or "; ".join(_rules(typing.get_args(_members(tp)[0])[0]))
        allowed = "; ".join(a for a in [allowed, f"each {item}" if item else ""] if a)
    name = key.rpartition(".")[2]
    in_preset = f"`{_flow(preset[name])}`" if name in preset else ""
    return f"| `{key}` | {_describe(tp)} | `{_flow(default)}` | {in_preset} | {_cell(allowed)} | {_cell(description)} |"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m probprune.config --markdown > docs/configuration.md")
    sys.stdout.write(reference_markdown())
