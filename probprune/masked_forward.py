"""Masked forward: run a model under a batch of masks without copying or changing its weights.

A head mask multiplies the attention output before the output projection (per query head; a KV group's mask covers
its query heads), a channel mask multiplies the gated activation before the MLP's output projection, and a layer mask multiplies both sublayer outputs, so a dropped layer is the
identity on the residual stream. Every row of the input batch may carry its own mask, so K masks x B sequences are
scored in one forward. Leaving the context restores the exact original model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from .losses import sequence_losses
from .mask_space import MaskSpace
from .models.registry import model_device
from .models.base import FamilyAdapter


def _scale_rows(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # x: [R, T, ...]; m: [R] or [1] -> broadcast over all but the first dim
    return x * m.view(-1, *([1] * (x.dim() - 1)))


@contextmanager
def masks_applied(adapter: FamilyAdapter, expanded: dict[str, torch.Tensor]) -> Iterator[None]:
    """Apply per-row masks while the context is open.

    Args:
        adapter: the model's adapter.
        expanded: output of :meth:`MaskSpace.expand` for R rows (or 1 row shared by the whole batch):
            ``qheads`` [R, L, Q], ``channels`` [R, L, I], ``layers`` [R, L]. The input batch given to the model
            inside the context must have R rows (or any number when R == 1).
    """
    dtype = next(adapter.model.parameters()).dtype
    handles = []
    try:
        for li, layer in enumerate(adapter.layers):
            dev = adapter.layer_device(layer)
            qheads = expanded["qheads"][:, li].to(dev, dtype)  # [R, Q_max]
            chans = expanded["channels"][:, li].to(dev, dtype)  # [R, I_max]
            lay = expanded["layers"][:, li].to(dev, dtype)  # [R]
            if adapter.num_kv_heads(layer):
                n_q = adapter.attn_out(layer).in_features // adapter.head_dim
                h = qheads[:, :n_q]
                if bool((h != 1).any()):
                    def pre_o(mod, args, h=h, n_q=n_q):
                        (x,) = args  # x: [R, T, n_q * d]
                        r, t, width = x.shape
                        x = x.view(r, t, n_q, width // n_q) * h.view(h.shape[0], 1, n_q, 1)
                        return (x.view(r, t, width),)

                    handles.append(adapter.attn_out(layer).register_forward_pre_hook(pre_o))
            n_ch = adapter.num_channels(layer)
            if n_ch:
                c = chans[:, :n_ch]
                if bool((c != 1).any()):
                    def pre_down(mod, args, c=c):
                        (x,) = args  # x: [R, T, I]
                        return (x * c[:, None, :],)

                    handles.append(adapter.mlp_out(layer).register_forward_pre_hook(pre_down))
            if bool((lay != 1).any()):
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
) -> np.ndarray:
    """Loss of the model under each of K masks on the same batch, with per-row masks in batched forwards.

    Args:
        masks: ``[K, N]`` unit masks.
        batch: ``[B, T]`` token ids.
        max_rows: at most this many rows (masks x sequences) per forward; ``None`` = all K*B rows at once.

    Returns:
        ``[K]`` float64: mean next-token cross-entropy of each masked model over the batch.
    """
    masks_t = masks.to(torch.float32) if isinstance(masks, torch.Tensor) else torch.from_numpy(
        np.array(masks, dtype=np.float32))  # a copy: a read-only array (Ray's object store) must not be aliased
    if masks_t.dim() == 1:
        masks_t = masks_t[None]
    k, b = masks_t.shape[0], batch.shape[0]
    per_fwd = max(1, (max_rows or k * b) // b)  # masks per forward
    dev = model_device(adapter.model)
    losses = []
    for s in range(0, k, per_fwd):
        chunk = masks_t[s : s + per_fwd]  # [k', N]
        exp = space.expand(chunk)
        rows = {key: v.repeat_interleave(b, dim=0) for key, v in exp.items()}  # [k'*B, ...]
        ids = batch.to(dev).repeat(chunk.shape[0], 1)  # [k'*B, T]
        with masks_applied(adapter, rows):
            nll = sequence_nll(adapter, ids)  # [k'*B]
        losses.append(nll.view(chunk.shape[0], b).double().mean(dim=1))
    return torch.cat(losses).numpy()


@torch.no_grad()
def masked_logits(adapter: FamilyAdapter, space: MaskSpace, mask: np.ndarray, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of the model under one mask (for tests and checks)."""
    exp = space.expand(torch.from_numpy(np.array(mask, dtype=np.float32))[None])
    with masks_applied(adapter, exp):
        return adapter.model(input_ids=input_ids.to(model_device(adapter.model)), use_cache=False).logits
