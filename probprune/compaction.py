"""Compaction: turn a final mask into a physically smaller model; save it and load it back.

Kept heads/channels keep their original order, so the compacted model computes exactly what the masked model
computes (up to float rounding). Layers whose heads and channels are all gone (and that have no output biases) are
removed and the remaining layers are renumbered (the KV cache indexes layers by ``layer_idx``).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .files import dir_mode, file_mode, make_temp_dir, publish_dir
from .masks import MaskSpace
from .models import modeling_probprune
from .models.adapter import get_adapter
from .models.modeling_probprune import PRUNED_CLASSES, EmptyAttention, EmptyMLP, resize_decoder_layer


def _take(dst: nn.Linear, src: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    w = src.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    dst.weight.data = w.contiguous().clone()
    if src.bias is not None:
        b = src.bias.data
        dst.bias.data = (b.index_select(0, rows.to(b.device)) if rows is not None else b).clone()


def layer_plan(space: MaskSpace, mask: np.ndarray) -> list[dict]:
    """Per original layer: kept KV groups, kept channels (ascending), and whether the layer survives."""
    e = space.expand(np.asarray(mask, dtype=np.float32))
    plan = []
    for li, ls in enumerate(space.layers):
        keep_layer = bool(e["layers"][li] > 0.5)
        groups = torch.nonzero(e["heads"][li, : ls.num_kv_heads] > 0.5).flatten() if keep_layer else torch.zeros(0, dtype=torch.long)
        chans = torch.nonzero(e["channels"][li, : ls.intermediate_size] > 0.5).flatten() if keep_layer else torch.zeros(0, dtype=torch.long)
        if keep_layer and groups.numel() == 0 and chans.numel() == 0 and not ls.o_bias and not ls.mlp_bias:
            keep_layer = False  # both sublayers add nothing: the layer is the identity
        plan.append({"layer": li, "keep": keep_layer, "groups": groups, "channels": chans})
    return plan


@torch.no_grad()
def compact(model: nn.Module, space: MaskSpace, mask: np.ndarray, inplace: bool = False) -> nn.Module:
    """Build the smaller model that computes what ``model`` computes under ``mask``.

    Args:
        model: a supported causal LM (see :func:`probprune.models.get_adapter`).
        space: the mask space ``mask`` lives in (built from this model).
        mask: ``[N]`` binary unit mask.
        inplace: slice ``model`` itself (saves memory on big models) instead of a deep copy.

    Returns:
        The compacted model. ``config.probprune_layout`` lists the per-layer widths when they differ across layers.
    """
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != (space.num_units,):
        raise ValueError(f"mask must have shape ({space.num_units},), got {mask.shape}")
    if not inplace:
        model = copy.deepcopy(model)
    adapter = get_adapter(model)
    config = model.config
    base_arch = getattr(config, "probprune_base_architecture", None) or type(model).__name__.removeprefix("ProbPruned")
    d, group = adapter.head_dim, adapter.group_size
    plan = layer_plan(space, mask)
    old_layers = list(adapter.layers)
    new_layers, layout = [], []
    for p in plan:
        if not p["keep"]:
            continue
        layer = old_layers[p["layer"]]
        old_attn, old_mlp = layer.self_attn, layer.mlp
        # resize_decoder_layer swaps the projections inside these modules: keep the old ones to slice from
        old = {n: getattr(old_attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        old.update({n: getattr(old_mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")})
        groups, chans = p["groups"], p["channels"]
        spec = {
            "num_key_value_heads": int(groups.numel()),
            "num_attention_heads": int(groups.numel()) * group,
            "intermediate_size": int(chans.numel()),
            "source_layer": int(getattr(old_attn, "probprune_source_layer", p["layer"])),
        }
        new_idx = len(new_layers)
        resize_decoder_layer(layer, config, spec, new_idx)
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(attn, EmptyAttention):
            if attn.o_bias is not None:
                src_bias = old_attn.o_bias if isinstance(old_attn, EmptyAttention) else old["o_proj"].bias
                attn.o_bias.data = src_bias.data.clone()
        else:
            # query heads of kept KV groups, in order: group g owns heads g*group .. (g+1)*group-1
            q_heads = (groups[:, None] * group + torch.arange(group)[None]).flatten()  # [n_kv' * group]
            q_rows = (q_heads[:, None] * d + torch.arange(d)[None]).flatten()
            kv_rows = (groups[:, None] * d + torch.arange(d)[None]).flatten()
            _take(attn.q_proj, old['q_proj'], rows=q_rows)
            _take(attn.k_proj, old['k_proj'], rows=kv_rows)
            _take(attn.v_proj, old['v_proj'], rows=kv_rows)
            _take(attn.o_proj, old['o_proj'], cols=q_rows)
        if isinstance(mlp, EmptyMLP):
            if mlp.down_bias is not None:
                src_bias = old_mlp.down_bias if isinstance(old_mlp, EmptyMLP) else old["down_proj"].bias
                mlp.down_bias.data = src_bias.data.clone()
        else:
            _take(mlp.gate_proj, old['gate_proj'], rows=chans)
            _take(mlp.up_proj, old['up_proj'], rows=chans)
            _take(mlp.down_proj, old['down_proj'], cols=chans)
        new_layers.append(layer)
        layout.append(spec)
    if not new_layers:
        raise UserError("the mask removes every decoder layer; nothing would be left to save")
    adapter.base_model.layers = nn.ModuleList(new_layers)
    kept_src = [s["source_layer"] for s in layout]
    old_src = [int(x) for x in (getattr(config, "probprune_source_layers", None) or range(len(old_layers)))]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[old_src.index(s)] for s in kept_src]
    config.num_hidden_layers = len(new_layers)
    config.head_dim = d
    config.probprune_base_architecture = base_arch
    config.probprune_source_layers = kept_src
    uniform = len({(s["num_key_value_heads"], s["intermediate_size"]) for s in layout}) == 1
    uniform = uniform and layout[0]["num_key_value_heads"] > 0 and layout[0]["intermediate_size"] > 0
    # stock configs insist that hidden_size is a multiple of the head count, even with an explicit head_dim
    uniform = uniform and config.hidden_size % layout[0]["num_attention_heads"] == 0
    if uniform:
        config.num_key_value_heads = layout[0]["num_key_value_heads"]
        config.num_attention_heads = layout[0]["num_attention_heads"]
        config.intermediate_size = layout[0]["intermediate_size"]
        config.probprune_layout = None
        model.__class__ = _stock_class(base_arch)
        config.architectures = [base_arch]
        if hasattr(config, "auto_map"):
            del config.auto_map
    else:
        config.probprune_layout = layout
        model.__class__ = PRUNED_CLASSES[base_arch]
        config.architectures = [model.__class__.__name__]
        config.auto_map = {"AutoModelForCausalLM": f"modeling_probprune.{model.__class__.__name__}"}
    for li, layer in enumerate(new_layers):
        layer.self_attn.probprune_source_layer = kept_src[li]
    return model


def _stock_class(arch: str):
    import transformers

    return getattr(transformers, arch)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model.config, "probprune_layout", None):
            shutil.copy(modeling_probprune.__file__, tmp / "modeling_probprune.py")
        for p in tmp.rglob("*"):
            os.chmod(p, dir_mode() if p.is_dir() else file_mode())
        publish_dir(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
            raise UserError(f"could not save the model to {path}: {err}") from None
        raise
    return path


def load_pruned(path: str | Path, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_pruned` (no remote code needed: the classes come from probprune).

    Raises:
        UserError: the folder does not exist or has no config.json.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.loading import DTYPES

    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"model path not found or not a model folder: {path}")
    config = AutoConfig.from_pretrained(path)
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation="sdpa")
    if getattr(config, "probprune_layout", None):
        base = config.probprune_base_architecture
        model = PRUNED_CLASSES[base].from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()
