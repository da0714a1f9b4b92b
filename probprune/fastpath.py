"""Fast mask scoring: run each mask at its pruned width, so a forward costs what the pruned model costs.

:func:`probprune.masked.masked_losses` (the reference) multiplies masks into a dense forward: every mask costs a full
forward. Here each mask is turned into index lists (kept KV groups and channels per layer, dropped layers), only
those weight slices are gathered, and the decoder runs on them (:mod:`probprune.models.functional` holds the family
knowledge). The result equals the reference up to floating-point summation order.

Cost per mask: one copy of the kept weights (~3 % of a 4 x 128-token forward on CPU) plus ``2 * P_kept * tokens``
FLOPs, plus the mask-independent embedding and ``lm_head`` (not pruned, so it bounds the speed-up: on SmolLM2-135M
the tied head is 21 % of a dense forward and a 50 % mask can be at most 1.65x faster). Identical masks in one call are
scored once; the embedding and the rotary tables are computed once per call and shared by all masks. On CPU the heap
freed by each mask's forward is handed back to the OS before the next mask (:func:`probprune.heap.release_freed_heap`),
which keeps a search's peak memory at ~1.1x dense inference instead of growing with heap fragmentation.

One mask per forward: stacking several masks into one forward could share only the per-mask Python dispatch (the
whole fixed cost per mask, gather and a 1-token ``lm_head`` included, is 7-10 % of a gathered call on CPU) while each
mask still needs its own gathered weights and matmuls, and padding every layer to the widest stacked mask adds ~6 %
matmul FLOPs for random 50 % masks (``benchmarks/fastpath.py`` prints both). It does not pay on CPU, so it is not done.
On a GPU, where one mask's matmuls may not fill the device, it might; that is not measured.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .heap import release_freed_heap
from .masks import MaskSpace
from .models import functional as fn
from .models.adapter import LlamaAdapter

LOGIT_ELEMENTS = 1 << 22  # at most this many logits (16 MiB in fp32) exist at once in the loss


def _check_binary(masks: torch.Tensor) -> None:
    bad = (masks != 0) & (masks != 1)
    if bool(bad.any()):
        v = float(masks[bad][0])
        raise ValueError(f"the gathered path needs 0/1 masks (a unit is kept or not), got a value {v}; "
                         "use probprune.masked.masked_losses for soft masks")


def _as_masks(space: MaskSpace, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks, dtype=torch.float32)
    m = m.detach().cpu()
    if m.dim() == 1:
        m = m[None]
    if m.dim() != 2 or m.shape[1] != space.num_units:
        raise ValueError(f"masks must have shape [K, {space.num_units}] (the mask space's units), got {tuple(m.shape)}")
    _check_binary(m)
    return m


def _check_batch(batch: torch.Tensor, min_len: int) -> None:
    if batch.dim() != 2 or batch.shape[1] < min_len:
        raise ValueError(f"batch must be [B, T] token ids with T >= {min_len}, got shape {tuple(batch.shape)}")


Plan = list[tuple[torch.Tensor, torch.Tensor] | None]  # per layer: (kept KV groups, kept channels) or None


def layer_plan(space: MaskSpace, expanded: dict[str, torch.Tensor], k: int) -> Plan:
    """Index lists of one mask: per decoder layer ``(kept KV groups, kept channels)``, or ``None`` if dropped.

    Args:
        space: the mask space.
        expanded: :meth:`MaskSpace.expand` of K masks: ``heads`` [K, L, G], ``channels`` [K, L, I], ``layers`` [K, L].
        k: which of the K masks.

    Returns:
        One entry per layer: ``None`` for a dropped layer, else two sorted CPU long tensors (possibly empty).
    """
    plan: Plan = []
    for li, ls in enumerate(space.layers):
        if expanded["layers"][k, li] < 0.5:
            plan.append(None)
            continue
        groups = (expanded["heads"][k, li, : ls.num_kv_heads] > 0.5).nonzero().flatten()  # [g]
        chans = (expanded["channels"][k, li, : ls.intermediate_size] > 0.5).nonzero().flatten()  # [c]
        plan.append((groups, chans))
    return plan


class _Inputs:
    """Mask-independent state of one call: embeddings and RoPE tables (per device, for split models)."""

    def __init__(self, adapter: LlamaAdapter, input_ids: torch.Tensor):
        base = adapter.base_model
        emb = base.embed_tokens
        ids = input_ids.to(emb.weight.device)
        self.embeds = emb(ids)  # [B, T, H]
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)[None]  # [1, T]
        self._pe = {self.embeds.device: base.rotary_emb(self.embeds, pos)}  # (cos, sin): [1, T, d] each

    def position_embeddings(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._pe:
            cos, sin = next(iter(self._pe.values()))
            self._pe[device] = (cos.to(device), sin.to(device))
        return self._pe[device]


def _forward_plan(
    adapter: LlamaAdapter,
    inputs: _Inputs,
    plan: Plan,
    ws: fn.Workspace,
) -> torch.Tensor:
    """Decoder stack + final norm under one mask's plan. Returns ``[B, T, H]``."""
    h = inputs.embeds  # [B, T, H]
    for layer, entry in zip(adapter.layers, plan):
        if entry is None:  # dropped layer: identity on the residual stream
            continue
        dev = layer.input_layernorm.weight.device
        if h.device != dev:
            h = h.to(dev)
        groups, chans = entry
        attn, mlp = fn.slice_layer(layer, groups.to(dev), chans.to(dev), ws)
        h = fn.decoder_layer_forward(layer, h, inputs.position_embeddings(dev), attn, mlp)  # [B, T, H]
    norm = adapter.base_model.norm
    return norm(h.to(norm.weight.device))


OBJECTIVES = ("ce", "kl")


def chunked_sequence_nll(adapter: LlamaAdapter, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence from final hidden states, a few tokens' logits at a time.

    Args:
        adapter: the model's adapter (its ``lm_head`` is used).
        hidden: ``[B, T, H]`` after the final norm.
        input_ids: ``[B, T]`` the tokens (targets are ``input_ids[:, 1:]``).

    Returns:
        ``[B]`` float32 on CPU, as :func:`probprune.masked.sequence_nll`.
    """
    return _chunked_sequence_loss(adapter, hidden, input_ids, None)


def _next_token_logits(adapter: LlamaAdapter, hidden: torch.Tensor):
    """Yield ``(rows, logits)``: the float32 ``lm_head`` logits ``[n, V]`` of the positions that predict a next token
    (0..T−2 of every sequence, flattened to ``B·(T−1)`` rows), a few positions at a time (``LOGIT_ELEMENTS``)."""
    b, t, h = hidden.shape
    head = adapter.lm_head
    x = hidden[:, :-1].reshape(b * (t - 1), h)  # [B(T-1), H]
    step = max(1, LOGIT_ELEMENTS // head.out_features)
    for s in range(0, x.shape[0], step):
        yield slice(s, s + step), head(x[s : s + step]).float()  # [n, V]


def teacher_logprobs(adapter: LlamaAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of a (dense) model from its final hidden states, for the ``kl`` objective.

    Args:
        adapter: the model's adapter (its ``lm_head`` is used).
        hidden: ``[B, T, H]`` after the final norm.

    Returns:
        ``[B·(T−1), V]`` float32 log-softmax of the logits at positions 0..T−2 (those that predict a next token).
    """
    b, t, _ = hidden.shape
    out = torch.empty(b * (t - 1), adapter.lm_head.out_features, dtype=torch.float32, device=hidden.device)
    for rows, logits in _next_token_logits(adapter, hidden):
        out[rows] = F.log_softmax(logits, dim=-1)
    return out


def _chunked_sequence_loss(
    adapter: LlamaAdapter, hidden: torch.Tensor, input_ids: torch.Tensor, teacher: torch.Tensor | None
) -> torch.Tensor:
    """Per-sequence mean over next-token positions of CE (``teacher`` None) or KL(teacher ‖ model). ``[B]`` on CPU.

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per position, with p = exp(``teacher``) ([B·(T−1), V] log-probs) and q the
    model's softmax; only a few positions' logits exist at a time (``LOGIT_ELEMENTS``).
    """
    b, t, _ = hidden.shape
    targets = input_ids[:, 1:].reshape(-1).to(hidden.device)  # [B(T-1)]
    loss = torch.empty(b * (t - 1), dtype=torch.float32, device=hidden.device)
    for rows, logits in _next_token_logits(adapter, hidden):
        if teacher is None:
            loss[rows] = F.cross_entropy(logits, targets[rows], reduction="none")
        else:
            p_log = teacher[rows].to(logits.device)  # [n, V]
            loss[rows] = (p_log.exp() * (p_log - F.log_softmax(logits, dim=-1))).sum(dim=-1)
    return loss.view(b, t - 1).mean(dim=1).cpu()


@torch.no_grad()
def fast_forward_hidden(
    adapter: LlamaAdapter, space: MaskSpace, mask: np.ndarray | torch.Tensor, input_ids: torch.Tensor
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
    plan = layer_plan(space, space.expand(m), 0)
    return _forward_plan(adapter, _Inputs(adapter, input_ids), plan, fn.Workspace())


@torch.no_grad()
def gathered_losses(
    adapter: LlamaAdapter,
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
        ``[K]`` float64 losses, equal to :func:`probprune.masked.masked_losses` up to summation order.

    Raises:
        ValueError: soft (non 0/1) masks, wrong mask length, a batch that is not ``[B, T>=2]``, or
            ``masks_per_forward != 1``.
    """
    if masks_per_forward != 1:
        raise ValueError(f"masks_per_forward must be 1 on the gathered path (got {masks_per_forward}): several masks "
                         "per forward does not pay on CPU; use probprune.masked.masked_losses(max_rows=...) to batch")
    m = _as_masks(space, masks)
    _check_batch(batch, 2)
    uniq, inverse = torch.unique(m, dim=0, return_inverse=True)  # [U, N], [K]
    expanded = space.expand(uniq)
    inputs = _Inputs(adapter, batch)
    ws = fn.Workspace()  # gathered weights of the current layer, reused by every layer and mask
    out = np.empty(uniq.shape[0], dtype=np.float64)
    for k in range(uniq.shape[0]):
        hidden = _forward_plan(adapter, inputs, layer_plan(space, expanded, k), ws)  # [B, T, H]
        per_seq = _chunked_sequence_loss(adapter, hidden, batch, teacher)  # [B]
        out[k] = float(per_seq.double().mean())
        if hidden.device.type == "cpu":
            del hidden
            release_freed_heap()
    return out[inverse.numpy()]


@torch.no_grad()
def dense_teacher(adapter: LlamaAdapter, space: MaskSpace, batch: torch.Tensor) -> torch.Tensor:
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
