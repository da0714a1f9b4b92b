"""Fast mask scoring: run each mask at its pruned width, so a forward costs what the pruned model costs.

:func:`probprune.masked_forward.masked_losses` (the reference) multiplies masks into a dense forward: every mask costs a full
forward. Here each mask is turned into index lists (:meth:`probprune.mask_space.MaskSpace.plan`: kept heads and channels
per layer, dropped layers), only those weight slices are gathered (:mod:`probprune.models.functional`), and the
decoder runs on them with the family's own layer forward (:meth:`probprune.models.base.FamilyAdapter.layer_forward`).
The result equals the reference up to floating-point summation order.

Cost per mask: one copy of the kept weights plus ``2 * P_kept * tokens`` FLOPs, plus the mask-independent embedding
and ``lm_head`` (not pruned, so they bound the speed-up; ``benchmarks/fastpath.py`` measures it). Identical masks in
one call are scored once; the embedding and the rotary tables are computed once per call and shared by all masks. On
CPU the heap freed by each mask's forward is handed back to the OS before the next mask
(:func:`probprune.heap.release_freed_heap`), so a search's peak memory stays near dense inference instead of growing
with heap fragmentation.

One mask per forward: stacking several masks into one forward could share only the per-mask Python dispatch, while
each mask still needs its own gathered weights and matmuls and padding every layer to the widest stacked mask adds
FLOPs (``benchmarks/fastpath.py`` prints both costs). On CPU that does not pay, so it is not done; on a GPU, where one
mask's matmuls may not fill the device, it might.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .heap import release_freed_heap
from .losses import sequence_losses, teacher_logprobs
from .mask_space import LayerKeep, MaskSpace
from .models import functional as fn
from .models.base import FamilyAdapter


def _check_binary(masks: torch.Tensor) -> None:
    bad = (masks != 0) & (masks != 1)
    if bool(bad.any()):
        v = float(masks[bad][0])
        raise ValueError(
            f"the gathered path needs 0/1 masks (a unit is kept or not), got a value {v}; "
            "use probprune.masked_forward.masked_losses for soft masks"
        )


def _as_masks(space: MaskSpace, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(masks, torch.Tensor):
        m = masks.detach().to("cpu", torch.float32)
    else:  # a copy: masks from Ray's object store are read-only views, which torch must not alias
        m = torch.from_numpy(np.array(masks, dtype=np.float32))
    if m.dim() == 1:
        m = m[None]
    if m.dim() != 2 or m.shape[1] != space.num_units:
        raise ValueError(f"masks must have shape [K, {space.num_units}] (the mask space's units), got {tuple(m.shape)}")
    _check_binary(m)
    return m


def _check_batch(batch: torch.Tensor, min_len: int) -> None:
    if batch.dim() != 2 or batch.shape[1] < min_len:
        raise ValueError(f"batch must be [B, T] token ids with T >= {min_len}, got shape {tuple(batch.shape)}")


class _Inputs:
    """Mask-independent state of one call: embeddings and rotary tables (per device, for split models)."""

    def __init__(self, adapter: FamilyAdapter, input_ids: torch.Tensor):
        emb = adapter.embed_tokens
        ids = input_ids.to(emb.weight.device)
        self.embeds = adapter.embed(ids)  # [B, T, H]
        pos = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, T]
        self._rot = {self.embeds.device: adapter.rotary(self.embeds, pos)}  # type -> (cos, sin), [1, T, d] each

    def rotary(self, device: torch.device, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._rot:
            first = next(iter(self._rot.values()))
            self._rot[device] = {lt: (cos.to(device), sin.to(device)) for lt, (cos, sin) in first.items()}
        return self._rot[device][layer_type]


def _plan_on_devices(adapter: FamilyAdapter, plan: list[LayerKeep | None]) -> list[LayerKeep | None]:
    """The plan's index tensors on their layers' devices, in one host-to-device copy per device.

    Copied layer by layer, each (three per layer) is a synchronising copy from pageable memory: the host waits for
    the device to drain before it can launch the next layer's kernels.
    """
    by_device: dict[torch.device, list[int]] = {}
    for li, keep in enumerate(plan):
        if keep is not None:
            dev = adapter.layer_device(adapter.layers[li])
            if dev.type != "cpu":
                by_device.setdefault(dev, []).append(li)
    out = list(plan)
    for dev, lis in by_device.items():
        parts = [t for li in lis for t in (plan[li].kv_heads, plan[li].q_heads, plan[li].channels)]
        flat = torch.cat(parts)
        if dev.type == "cuda":
            flat = flat.pin_memory()  # an asynchronous copy needs page-locked memory
        flat = flat.to(dev, non_blocking=True)
        pieces = iter(flat.split([t.numel() for t in parts]))
        for li in lis:
            out[li] = LayerKeep(next(pieces), next(pieces), next(pieces))
    return out


def _run_layers(
    adapter: FamilyAdapter,
    inputs: _Inputs,
    plan: list[LayerKeep | None],
    ws: fn.Workspace,
    h: torch.Tensor,
    layers: range,
    entering: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``layers`` of the decoder under a plan already on its devices (:func:`_plan_on_devices`), from ``h``
    ``[B, T, H]``; with ``entering``, append the hidden state that enters each layer. Returns ``[B, T, H]``."""
    for li in layers:
        if entering is not None:
            entering.append(h)
        layer, keep = adapter.layers[li], plan[li]
        if keep is None:  # dropped layer: identity on the residual stream
            continue
        dev = adapter.layer_device(layer)
        if h.device != dev:
            h = h.to(dev)
        attn, mlp = fn.slice_layer(adapter, layer, keep, ws)
        h = adapter.layer_forward(layer, h, inputs.rotary(dev, adapter.layer_type(li)), attn, mlp)  # [B, T, H]
    return h


def _final_norm(adapter: FamilyAdapter, h: torch.Tensor) -> torch.Tensor:
    norm = adapter.final_norm
    return norm(h.to(next(norm.parameters()).device))


def _forward_plan(
    adapter: FamilyAdapter, inputs: _Inputs, plan: list[LayerKeep | None], ws: fn.Workspace
) -> torch.Tensor:
    """Decoder stack + final norm under one mask's plan (:meth:`MaskSpace.plan`). Returns ``[B, T, H]``."""
    h = _run_layers(adapter, inputs, _plan_on_devices(adapter, plan), ws, inputs.embeds, range(len(adapter.layers)))
    return _final_norm(adapter, h)


@torch.no_grad()
def fast_forward_hidden(
    adapter: FamilyAdapter, space: MaskSpace, mask: np.ndarray | torch.Tensor, input_ids: torch.Tensor
) -> torch.Tensor:
    """Final hidden states (after the last norm, as ``last_hidden_state``) of the model under one mask.

    Args:
        adapter: the model's adapter.
        space: the mask space ``mask`` is laid out in.
        mask: ``[N]`` 0/1 unit mask.
        input_ids: ``[B, T]`` token ids.

    Returns:
        ``[B, T, H]`` in the model's dtype, on the device of the final norm.

    Raises:
        ValueError: the mask is not 0/1 or has the wrong length; ``input_ids`` is not ``[B, T]``.
    """
    m = _as_masks(space, mask)
    if m.shape[0] != 1:
        raise ValueError(f"fast_forward_hidden takes one mask [N], got {m.shape[0]} masks")
    _check_batch(input_ids, 1)
    plan = space.plan(m, 0)
    return _forward_plan(adapter, _Inputs(adapter, input_ids), plan, fn.Workspace())


@torch.no_grad()
def gathered_losses(
    adapter: FamilyAdapter,
    space: MaskSpace,
    masks: np.ndarray | torch.Tensor,
    batch: torch.Tensor,
    masks_per_forward: int = 1,
    teacher: torch.Tensor | None = None,
) -> np.ndarray:
    """Loss of the model under each of K masks, computing only the kept units (drop-in for ``masked_losses``).

    Each distinct mask gathers its kept weights once and runs the whole batch through the pruned-width layers;
    the loss is the mean next-token cross-entropy per sequence (or, with ``teacher``, the mean per-position
    KL(teacher ‖ masked model)), then the mean over the batch.

    Args:
        adapter: the model's adapter (weights are read, never written).
        space: the mask space the masks are laid out in.
        masks: ``[K, N]`` (or ``[N]``) 0/1 unit masks.
        batch: ``[B, T]`` token ids, T >= 2.
        masks_per_forward: masks per forward; only 1 is supported (several masks in one padded forward cannot
            pay on CPU, see the module docstring).
        teacher: ``[B·(T−1), V]`` next-token log-probabilities of the dense model on ``batch``
            (:func:`dense_teacher`): the loss becomes the distillation objective KL(dense ‖ masked), which is 0 for
            the all-keep mask. None = cross-entropy against the tokens.

    Returns:
        ``[K]`` float64 losses, equal to :func:`probprune.masked_forward.masked_losses` up to summation order.

    Raises:
        ValueError: soft (non 0/1) masks, wrong mask length, a batch that is not ``[B, T>=2]``, or
            ``masks_per_forward != 1``.
    """
    if masks_per_forward != 1:
        raise ValueError(
            f"masks_per_forward must be 1 on the gathered path (got {masks_per_forward}): several masks "
            "per forward does not pay on CPU; use probprune.masked_forward.masked_losses(max_rows=...) to batch"
        )
    m = _as_masks(space, masks)
    _check_batch(batch, 2)
    uniq, inverse = torch.unique(m, dim=0, return_inverse=True)  # [U, N], [K]
    expanded = space.expand(uniq)
    inputs = _Inputs(adapter, batch)
    ws = fn.Workspace()  # gathered weights of the current layer, reused by every layer and mask
    out = np.empty(uniq.shape[0], dtype=np.float64)
    for k in range(uniq.shape[0]):
        hidden = _forward_plan(adapter, inputs, space.plan(expanded, k), ws)  # [B, T, H]
        per_seq = sequence_losses(adapter, hidden, batch, teacher)  # [B]
        out[k] = float(per_seq.double().mean())
        if hidden.device.type == "cpu":
            del hidden
            release_freed_heap()
    return out[inverse.numpy()]


@torch.no_grad()
def layer_removal_losses(
    adapter: FamilyAdapter,
    space: MaskSpace,
    mask: np.ndarray | torch.Tensor,
    layers: Sequence[int],
    batch: torch.Tensor,
) -> np.ndarray:
    """Cross-entropy of the model under ``mask`` with each of ``layers`` removed in turn (SLEB's trials).

    The trial that removes layer ``l`` shares everything before ``l`` with the model under ``mask``: the hidden
    state entering each layer is computed once, and each trial restarts from the state entering its layer and runs
    only the layers after it. Equal, up to summation order, to :func:`gathered_losses` of the masks with each layer's
    units switched off, at about half the decoder cost (the ``lm_head`` and loss still run once per trial).

    Args:
        adapter: the model's adapter.
        space: the mask space.
        mask: ``[N]`` 0/1 mask of the model the trials start from.
        layers: decoder layers to try removing (each kept by ``mask``).
        batch: ``[B, T]`` token ids, T >= 2.

    Returns:
        ``[len(layers)]`` float64 mean next-token cross-entropy per trial (mean over the batch's sequences).

    Raises:
        ValueError: as :func:`gathered_losses`, or a layer that ``mask`` already removes.
    """
    m = _as_masks(space, mask)
    _check_batch(batch, 2)
    plan = space.plan(m, 0)
    for li in layers:
        if plan[li] is None:
            raise ValueError(f"layer {li} is already removed by the mask")
    inputs = _Inputs(adapter, batch)
    ws = fn.Workspace()
    on_dev = _plan_on_devices(adapter, plan)
    n_layers = len(adapter.layers)
    entering: list[torch.Tensor] = []  # [L] x [B, T, H]: the state entering each layer under ``mask``
    _run_layers(adapter, inputs, on_dev, ws, inputs.embeds, range(n_layers), entering)
    out = np.empty(len(layers), dtype=np.float64)
    for r, li in enumerate(layers):
        h = _run_layers(adapter, inputs, on_dev, ws, entering[li], range(li + 1, n_layers))  # [B, T, H]
        out[r] = float(sequence_losses(adapter, _final_norm(adapter, h), batch).double().mean())
        del h
        if inputs.embeds.device.type == "cpu":
            release_freed_heap()
    return out


@torch.no_grad()
def dense_teacher(adapter: FamilyAdapter, space: MaskSpace, batch: torch.Tensor) -> torch.Tensor:
    """The dense model's next-token log-probabilities on ``batch``, computed once and reused for every mask.

    It runs the all-keep mask through the same gathered path as the masks, so the ``kl`` objective of the all-keep
    mask is exactly 0.

    Args:
        adapter: the model's adapter.
        space: the mask space.
        batch: ``[B, T]`` token ids, T >= 2.

    Returns:
        ``[B·(T−1), V]`` float32 (:func:`teacher_logprobs`).
    """
    _check_batch(batch, 2)
    hidden = fast_forward_hidden(adapter, space, space.full_mask(), batch)  # [B, T, H]
    return teacher_logprobs(adapter, hidden)
