"""Masked forward: run a model under a batch of masks without copying or changing its weights.

A head mask multiplies the attention output before the output projection (per query head; a KV group's mask covers
its query heads), a channel mask multiplies the gated activation before the MLP's output projection, and a layer mask multiplies both sublayer outputs, so a dropped layer is the
identity on the residual stream. Every row of the input batch may carry its own mask, so K masks x B sequences are
scored in one forward. Leaving the context restores the exact original model.

As a scoring path (``engine.scoring=batched``) this costs dense FLOPs for every mask but needs no per-mask host work:
no index lists, no gathered weight copies, and no host-device synchronisation (which units are masked is decided on
the host from the CPU masks; the masks are copied to the device once per call), so all K masks run as one forward of
K·B rows. On a GPU where one pruned-width mask-forward is launch-bound this can beat the gathered path
(:mod:`probprune.fastpath`); on CPU it costs a dense forward per mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .losses import sequence_losses, teacher_logprobs
from .mask_space import MaskSpace
from .models.base import FamilyAdapter
from .models.registry import model_device


def _scale_rows(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` [R, T, ...] times per-group masks ``m`` [G, ...] (R = G·rows per group; G = 1 masks every row alike):
    rows ``g·R/G .. (g+1)·R/G − 1`` get mask ``g``, broadcast over the dims ``m`` lacks."""
    g = m.shape[0]
    xs = x.unflatten(0, (g, x.shape[0] // g))  # [G, R/G, T, ...]
    ms = m.reshape(g, 1, *([1] * (x.dim() - m.dim())), *m.shape[1:])  # [G, 1, 1.., *m.shape[1:]]
    return (xs * ms).flatten(0, 1)


@contextmanager
def masks_applied(adapter: FamilyAdapter, expanded: dict[str, torch.Tensor]) -> Iterator[None]:
    """Apply per-row masks while the context is open.

    Args:
        adapter: the model's adapter.
        expanded: output of :meth:`MaskSpace.expand` for G masks: ``qheads`` [G, L, Q], ``channels`` [G, L, I],
            ``layers`` [G, L]. The input batch given to the model inside the context must have a multiple of G rows,
            R = G·n: rows ``g·n .. (g+1)·n − 1`` run under mask ``g`` (G == 1: every row under the one mask).

    Which hooks a layer needs is decided from the masks where they are (the CPU, normally), so no device value is
    read back; each key is copied to each layer device once.
    """
    dtype = next(adapter.model.parameters()).dtype
    on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def moved(dev: torch.device) -> dict[str, torch.Tensor]:
        if dev not in on_device:
            on_device[dev] = {k: v.to(dev, dtype, non_blocking=True) for k, v in expanded.items()}
        return on_device[dev]

    handles = []
    try:
        for li, layer in enumerate(adapter.layers):
            dev = adapter.layer_device(layer)
            if adapter.num_kv_heads(layer):
                n_q = adapter.attn_out(layer).in_features // adapter.head_dim
                if bool((expanded["qheads"][:, li, :n_q] != 1).any()):
                    h = moved(dev)["qheads"][:, li, :n_q]  # [G, n_q]

                    def pre_o(mod, args, h=h, n_q=n_q):
                        (x,) = args  # x: [R, T, n_q * d]
                        r, t, width = x.shape
                        x = _scale_rows(x.view(r, t, n_q, width // n_q), h[:, :, None])  # [R, T, n_q, d] x [G, n_q, 1]
                        return (x.view(r, t, width),)

                    handles.append(adapter.attn_out(layer).register_forward_pre_hook(pre_o))
            n_ch = adapter.num_channels(layer)
            if n_ch and bool((expanded["channels"][:, li, :n_ch] != 1).any()):
                c = moved(dev)["channels"][:, li, :n_ch]  # [G, I]

                def pre_down(mod, args, c=c):
                    (x,) = args  # x: [R, T, I]
                    return (_scale_rows(x, c),)

                handles.append(adapter.mlp_out(layer).register_forward_pre_hook(pre_down))
            if bool((expanded["layers"][:, li] != 1).any()):
                lay = moved(dev)["layers"][:, li]  # [G]

                def post_attn(mod, args, out, lay=lay):
                    return (_scale_rows(out[0], lay), *out[1:])

                def post_mlp(mod, args, out, lay=lay):
                    return _scale_rows(out, lay)

                handles.append(adapter.attention(layer).register_forward_hook(post_attn))
                handles.append(adapter.mlp(layer).register_forward_hook(post_mlp))
        yield
    finally:
        for hd in handles:
            hd.remove()


def sequence_nll(adapter: FamilyAdapter, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per row of the model as it is (hooks included).

    Args:
        input_ids: ``[R, T]``.

    Returns:
        ``[R]`` float32 (on CPU).
    """
    hidden = adapter.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # [R, T, H]
    return sequence_losses(adapter, hidden, input_ids)


@torch.no_grad()
def masked_losses(
    adapter: FamilyAdapter,
    space: MaskSpace,
    masks: np.ndarray | torch.Tensor,
    batch: torch.Tensor,
    max_rows: int | None = None,
    teacher: torch.Tensor | None = None,
) -> np.ndarray:
    """Loss of the model under each of K masks on the same batch, with per-row masks in batched forwards.

    Identical masks are scored once. The losses stay on the device until the end: one host-device copy per call.

    Args:
        masks: ``[K, N]`` unit masks (soft values allowed).
        batch: ``[B, T]`` token ids, T >= 2.
        max_rows: at most this many rows (masks x sequences) per forward; ``None`` = all K*B rows at once.
        teacher: ``[B·(T−1), V]`` next-token log-probabilities of the dense model on ``batch`` (:func:`dense_teacher`):
            the loss becomes KL(dense ‖ masked). None = cross-entropy against the tokens.

    Returns:
        ``[K]`` float64: mean over the batch of each sequence's mean next-token loss under each mask.
    """
    masks_t = (
        masks.detach().to("cpu", torch.float32)
        if isinstance(masks, torch.Tensor)
        else torch.from_numpy(np.array(masks, dtype=np.float32))
    )  # a copy: a read-only array (Ray's object store) must not be aliased
    if masks_t.dim() == 1:
        masks_t = masks_t[None]
    uniq, inverse = torch.unique(masks_t, dim=0, return_inverse=True)  # [U, N], [K]
    u, b = uniq.shape[0], batch.shape[0]
    per_fwd = max(1, (max_rows or u * b) // b)  # masks per forward
    ids = batch.to(model_device(adapter.model))  # [B, T]
    out = []
    for s in range(0, u, per_fwd):
        chunk = uniq[s : s + per_fwd]  # [g, N]
        g = chunk.shape[0]
        with masks_applied(adapter, space.expand(chunk)):
            hidden = adapter.base_model(input_ids=ids.repeat(g, 1), use_cache=False).last_hidden_state  # [g*B, T, H]
        for j in range(g):
            per_seq = sequence_losses(adapter, hidden[j * b : (j + 1) * b], ids, teacher, to_cpu=False)  # [B]
            out.append(per_seq.double().mean())
        del hidden
    return torch.stack(out).cpu().numpy()[inverse.numpy()]


@torch.no_grad()
def dense_teacher(adapter: FamilyAdapter, batch: torch.Tensor) -> torch.Tensor:
    """The dense model's next-token log-probabilities on ``batch`` by the model's own forward (no hooks), so the
    ``kl`` loss of the all-keep mask on this path is exactly 0.

    Returns:
        ``[B·(T−1), V]`` float32 (:func:`probprune.losses.teacher_logprobs`).
    """
    ids = batch.to(model_device(adapter.model))  # [B, T]
    return teacher_logprobs(adapter, adapter.base_model(input_ids=ids, use_cache=False).last_hidden_state)


@torch.no_grad()
def masked_logits(adapter: FamilyAdapter, space: MaskSpace, mask: np.ndarray, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of the model under one mask (for tests and checks)."""
    exp = space.expand(torch.from_numpy(np.array(mask, dtype=np.float32))[None])
    with masks_applied(adapter, exp):
        return adapter.model(input_ids=input_ids.to(model_device(adapter.model)), use_cache=False).logits
