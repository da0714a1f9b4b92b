"""Compaction: turn a final mask into a physically smaller model; save it and load it back.

Kept heads/channels keep their original order, so the compacted model computes exactly what the masked model
computes (up to float rounding). Layers whose heads and channels are all gone (and that have no output biases) are
removed and the remaining layers are renumbered (the KV cache indexes layers by ``layer_idx``).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .files import dir_mode, file_mode, make_temp_dir, publish_dir
from .heap import release_freed_heap
from .mask_space import LayerKeep, MaskSpace
from .models import modeling_probprune
from .models.modeling_probprune import PRUNED_CLASSES, resize_decoder_layer
from .models.registry import get_adapter
from .shards import ShardReader, ShardWriter


def _rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.detach().index_select(0, idx.to(t.device)).clone()


def _cols(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return w.detach().index_select(1, idx.to(w.device)).clone()


def _head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d)[None]).flatten()


def _fill(parts: dict, values: dict) -> None:
    """Write sliced ``(weight, bias)`` values into the (fresh) projections ``parts`` of the resized layer."""
    for role, part in parts.items():
        w, b = values[role]
        part.weight.data[part.rows] = w.to(part.weight.dtype)
        if part.bias is not None:
            part.bias.data[part.rows] = b.to(part.bias.dtype)


def surviving_layers(space: MaskSpace, mask: np.ndarray) -> list[LayerKeep | None]:
    """:meth:`MaskSpace.plan` of ``mask``, with layers that would add nothing (no heads, no channels and no output
    biases) marked removed (None) as well: such a layer is the identity."""
    plan = space.plan(np.asarray(mask, dtype=np.float32))
    for li, (ls, keep) in enumerate(zip(space.layers, plan)):
        if keep is not None and keep.empty and not ls.o_bias and not ls.mlp_bias:
            plan[li] = None
    return plan


@torch.no_grad()
def compact(
    model: nn.Module,
    space: MaskSpace,
    mask: np.ndarray,
    inplace: bool = False,
    override: dict[int, dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Build the smaller model that computes what ``model`` computes under ``mask``.

    Args:
        model: a supported causal LM (see :func:`probprune.models.get_adapter`).
        space: the mask space ``mask`` lives in (built from this model).
        mask: ``[N]`` binary unit mask.
        inplace: slice ``model`` itself (saves memory on big models) instead of a deep copy.
        override: re-fitted weights per layer of ``model`` (:meth:`probprune.reconstruct.Reconstruction.override`):
            ``"o_proj"`` / ``"down_proj"`` replace the kept input columns of that output projection (``[H, kept]``,
            in kept order), ``"o_bias"`` / ``"down_bias"`` (``[H]``) are added to its output bias, which is created
            (and recorded in ``config.probprune_layout``) where the model has none.

    Returns:
        The compacted model. ``config.probprune_layout`` lists the per-layer widths when they differ across layers.
    """
    if not inplace:
        model = copy.deepcopy(model)
    return _compact(model, space, mask, override=override)


def _replacement(override: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    w = override[key]
    if tuple(w.shape) != tuple(like.shape):
        raise ValueError(f"override[{key!r}] has shape {tuple(w.shape)}, the kept columns have {tuple(like.shape)}")
    return w.detach().to(like.device, like.dtype).clone()


def _compact(
    model: nn.Module,
    space: MaskSpace,
    mask: np.ndarray,
    load: Callable[[int, nn.Module], None] | None = None,
    emit: Callable[[int, nn.Module], None] | None = None,
    override: dict[int, dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """:func:`compact` in place; ``load(i, layer)`` fills a surviving layer's weights just before it is sliced and
    ``emit(new_i, layer)`` receives it right after (streamed compaction: one layer in memory at a time)."""
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != (space.num_units,):
        raise ValueError(f"mask must have shape ({space.num_units},), got {mask.shape}")
    adapter = get_adapter(model)
    config = model.config
    base_arch = getattr(config, "probprune_base_architecture", None) or type(model).__name__.removeprefix("ProbPruned")
    d = adapter.head_dim
    old_layers = list(adapter.layers)
    old_layout = getattr(config, "probprune_layout", None) or [{} for _ in old_layers]
    old_src = [int(x) for x in (getattr(config, "probprune_source_layers", None) or range(len(old_layers)))]
    new_layers, layout = [], []
    for li, keep in enumerate(surviving_layers(space, mask)):
        if keep is None:
            continue
        layer = old_layers[li]
        if load is not None:
            load(li, layer)
        # slice what is kept before resize_decoder_layer swaps the projections for fresh ones
        attn_vals = mlp_vals = None
        new = (override or {}).get(li, {})
        attn_bias, mlp_bias = adapter.attn_out_bias(layer), adapter.mlp_out_bias(layer)
        if keep.kv_heads.numel():
            q_rows, kv_rows = _head_rows(keep.q_heads, d), _head_rows(keep.kv_heads, d)
            attn_vals = {
                r: (_rows(p.w, q_rows if r == "q" else kv_rows), _rows(p.b, q_rows if r == "q" else kv_rows))
                for r, p in adapter.attn_in(layer).items()
            }
            o_w = _cols(adapter.attn_out(layer).weight, q_rows)
            if "o_proj" in new:
                o_w = _replacement(new, "o_proj", o_w)
        if keep.channels.numel():
            mlp_vals = {
                r: (_rows(p.w, keep.channels), _rows(p.b, keep.channels)) for r, p in adapter.mlp_in(layer).items()
            }
            down_w = _cols(adapter.mlp_out(layer).weight, keep.channels)
            if "down_proj" in new:
                down_w = _replacement(new, "down_proj", down_w)
        spec = {
            "num_key_value_heads": int(keep.kv_heads.numel()),
            "num_attention_heads": int(keep.q_heads.numel()),
            "intermediate_size": int(keep.channels.numel()),
            "source_layer": int(getattr(adapter.attention(layer), "probprune_source_layer", old_src[li])),
        }
        spec.update({k: True for k in ("o_bias", "down_bias") if old_layout[li].get(k)})  # added output biases
        for key, old in (("o_bias", attn_bias), ("down_bias", mlp_bias)):
            if key in new and old is None:
                spec[key] = True
        resize_decoder_layer(layer, config, spec, len(new_layers))
        if attn_vals is not None:
            _fill(adapter.attn_in(layer), attn_vals)
            adapter.attn_out(layer).weight.data = o_w
        if mlp_vals is not None:
            _fill(adapter.mlp_in(layer), mlp_vals)
            adapter.mlp_out(layer).weight.data = down_w
        for key, new_bias, old_bias in (
            ("o_bias", adapter.attn_out_bias(layer), attn_bias),
            ("down_bias", adapter.mlp_out_bias(layer), mlp_bias),
        ):
            if new_bias is None:
                continue
            value = old_bias.detach().clone() if old_bias is not None else torch.zeros_like(new_bias, device="cpu")
            if key in new:
                value = (value.double() + new[key].detach().cpu().double()).to(value.dtype)
            new_bias.data = value.to(new_bias.device)
        if emit is not None:
            emit(len(new_layers), layer)
        new_layers.append(layer)
        layout.append(spec)
    if not new_layers:
        raise UserError("the mask removes every decoder layer; nothing would be left to save")
    adapter.base_model.layers = nn.ModuleList(new_layers)
    kept_src = [s["source_layer"] for s in layout]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[old_src.index(s)] for s in kept_src]
    config.num_hidden_layers = len(new_layers)
    config.head_dim = d
    config.probprune_base_architecture = base_arch
    config.probprune_source_layers = kept_src
    shapes = {(s["num_key_value_heads"], s["num_attention_heads"], s["intermediate_size"]) for s in layout}
    uniform = len(shapes) == 1 and layout[0]["num_key_value_heads"] > 0 and layout[0]["intermediate_size"] > 0
    # stock configs insist that hidden_size is a multiple of the head count, even with an explicit head_dim
    uniform = uniform and config.hidden_size % layout[0]["num_attention_heads"] == 0
    uniform = uniform and not any(s.get("o_bias") or s.get("down_bias") for s in layout)
    if uniform:
        config.num_key_value_heads = layout[0]["num_key_value_heads"]
        config.num_attention_heads = layout[0]["num_attention_heads"]
        config.intermediate_size = layout[0]["intermediate_size"]
        config.probprune_layout = None
        model.__class__ = adapter.stock_class(base_arch)
        config.architectures = [base_arch]
        if hasattr(config, "auto_map"):
            del config.auto_map
    else:
        config.probprune_layout = layout
        model.__class__ = PRUNED_CLASSES[base_arch]
        config.architectures = [model.__class__.__name__]
        config.auto_map = {"AutoModelForCausalLM": f"modeling_probprune.{model.__class__.__name__}"}
    for li, layer in enumerate(new_layers):
        adapter.attention(layer).probprune_source_layer = kept_src[li]
    return model


def layout_entry(model: nn.Module, li: int) -> dict:
    """The ``config.probprune_layout`` entry of decoder layer ``li`` of a compacted model, to record a change to its
    shape; a stock-shaped model is switched to the per-layer-layout class first (same weights, same outputs)."""
    config = model.config
    if not getattr(config, "probprune_layout", None):
        adapter = get_adapter(model)
        config.probprune_layout = [
            {
                "num_key_value_heads": adapter.num_kv_heads(i),
                "num_attention_heads": adapter.attn_out(i).in_features // adapter.head_dim
                if adapter.num_kv_heads(i)
                else 0,
                "intermediate_size": adapter.num_channels(i),
                "source_layer": int(getattr(adapter.attention(i), "probprune_source_layer", i)),
            }
            for i in range(len(adapter.layers))
        ]
        base = getattr(config, "probprune_base_architecture", None) or type(model).__name__.removeprefix("ProbPruned")
        config.probprune_base_architecture = base
        model.__class__ = PRUNED_CLASSES[base]
        config.architectures = [model.__class__.__name__]
        config.auto_map = {"AutoModelForCausalLM": f"modeling_probprune.{model.__class__.__name__}"}
    return config.probprune_layout[li]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _publish(model: nn.Module, tokenizer, tmp: Path, dst: Path) -> None:
    """Finish the model folder ``tmp`` (tokenizer; the pruned-model classes next to per-layer shapes; umask
    permissions) and move it to ``dst``."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if getattr(model.config, "probprune_layout", None):
        shutil.copy(modeling_probprune.__file__, tmp / "modeling_probprune.py")
    for p in tmp.rglob("*"):
        os.chmod(p, dir_mode() if p.is_dir() else file_mode())
    publish_dir(tmp, dst)


def save_pruned(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Save a (compacted) model, its tokenizer and, for per-layer widths, the modeling file, atomically.

    The folder is written under a temporary name next to ``path`` and then replaces ``path`` by renames
    (:func:`probprune.files.publish_dir`), so an interrupted save never leaves a half-written model, nor a moment
    with no model. Files and folders get the permissions of the user's umask.

    Raises:
        UserError: the disk is full, a file size limit is hit, or the folder cannot be written (nothing is left
            behind; an existing ``path`` is untouched).
    """
    path = Path(path)
    tmp = make_temp_dir(path)
    try:
        model.save_pretrained(tmp)
        _publish(model, tokenizer, tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
            raise UserError(f"could not save the model to {path}: {err}") from None
        raise
    return path


# ------------------------------------------------------------------------------------------ streamed compaction
def _put_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


@torch.no_grad()
def compact_checkpoint(
    src: str | Path,
    space: MaskSpace,
    mask: np.ndarray,
    dst: str | Path,
    tokenizer=None,
    max_shard_bytes: int = 2 << 30,
    override: dict[int, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Compact a saved model folder into ``dst`` without ever holding the model: one decoder layer at a time.

    The model is built on the ``meta`` device (no memory); each surviving layer's tensors are read from the source
    safetensors shards, sliced exactly as :func:`compact` slices them, written to the output shards and dropped;
    the embeddings, final norm and head are copied in 64 MB chunks. Tensors are read with plain file reads (no
    memory map) and go to disk as soon as they are sliced, so peak memory is about one decoder layer, whatever the
    number of layers. The folder is written next to ``dst`` and published by renames
    (as :func:`save_pruned`); tokenizer and generation files are copied.

    Args:
        src: a folder with ``config.json`` and safetensors weights (a stock checkpoint or a probprune output).
        space: the mask space of that model (from its adapter; shapes only).
        mask: ``[N]`` binary mask.
        dst: the output folder.
        tokenizer: saved into ``dst`` if given (else ``src``'s tokenizer files are copied).
        max_shard_bytes: size limit of one output shard.
        override: re-fitted weights per layer, applied while each layer is sliced (as in :func:`compact`).

    Returns:
        ``dst``; it loads with :func:`probprune.models.load_pruned` and equals ``save_pruned(compact(model, ...))``.

    Raises:
        UserError: no safetensors weights in ``src``, or the mask removes every layer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    reader = ShardReader(src)
    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        if getattr(config, "probprune_layout", None):
            model = PRUNED_CLASSES[config.probprune_base_architecture](config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(model)
    prefix = next(n for n, m in model.named_modules() if m is adapter.layers) + "."  # "model.layers."
    tmp = make_temp_dir(dst)
    try:
        writer = ShardWriter(tmp, max_shard_bytes)

        def load(li: int, layer: nn.Module) -> None:
            for name, _ in list(layer.named_parameters()):
                _put_parameter(layer, name, reader.read(f"{prefix}{li}.{name}"))

        def emit(new_li: int, layer: nn.Module) -> None:
            for name, t in layer.state_dict().items():
                writer.add(f"{prefix}{new_li}.{name}", t)
            layer.to("meta")  # drop this layer's weights
            release_freed_heap()  # else freed slices stay resident: +740 MB over a 1B model's layers

        _compact(model, space, mask, load=load, emit=emit, override=override)
        for name in reader.names():
            if not name.startswith(prefix):
                reader.copy(name, writer)  # embeddings, final norm, head: bytes copied in chunks
        writer.finish()
        model.config.save_pretrained(tmp)
        for extra in src.iterdir():
            names = (
                ("generation_config",)
                if tokenizer is not None
                else ("tokenizer", "special_tokens", "generation_config", "chat_template", "vocab", "merges")
            )
            if extra.is_file() and extra.name.startswith(names):
                shutil.copy(extra, tmp / extra.name)
        _publish(model, tokenizer, tmp, dst)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(f"could not write the compacted model to {dst}: {err}") from None
        raise
    return dst
