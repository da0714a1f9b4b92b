"""The loss of a model on token rows, in one place: next-token cross-entropy, or KL(dense ‖ model) for distillation.

Every path that scores a model uses it: the gathered fast path and the masked reference (from final hidden states,
through :func:`sequence_losses`) and held-out perplexity (from a model's logits, through :func:`token_losses`). Logits
are cast to float32 before the softmax whatever the model's dtype, and only a few positions' logits exist at a time
(:data:`LOGIT_ELEMENTS`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

LOGIT_ELEMENTS = 1 << 22  # at most this many logits (16 MiB in fp32) exist at once
OBJECTIVES = ("ce", "kl")


def token_losses(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of each position: cross-entropy against ``targets``, or KL(teacher ‖ model) when ``teacher`` is given.

    Args:
        logits: ``[n, V]`` float32 logits of n positions.
        targets: ``[n]`` the next tokens (unused with ``teacher``).
        teacher: ``[n, V]`` log-probabilities p of a reference model; KL(p ‖ q) = Σ_v p_v (log p_v − log q_v).

    Returns:
        ``[n]`` float32.
    """
    if teacher is None:
        return F.cross_entropy(logits, targets.to(logits.device), reduction="none")
    p_log = teacher.to(logits.device)
    return (p_log.exp() * (p_log - F.log_softmax(logits, dim=-1))).sum(dim=-1)


def next_token_logits(adapter, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, logits)``: the float32 logits ``[n, V]`` of the positions that predict a next token
    (0..T−2 of every sequence, flattened to ``B·(T−1)`` rows), a few positions at a time.

    Args:
        adapter: the model's family adapter (its ``logits`` applies the head and any soft-capping).
        hidden: ``[B, T, H]`` final hidden states (after the last norm).
    """
    b, t, h = hidden.shape
    x = hidden[:, :-1].reshape(b * (t - 1), h)  # [B(T-1), H]
    step = max(1, LOGIT_ELEMENTS // adapter.lm_head.out_features)
    for s in range(0, x.shape[0], step):
        yield slice(s, s + step), adapter.logits(x[s : s + step]).float()  # [n, V]


def teacher_logprobs(adapter, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of a (dense) model from its final hidden states, for the ``kl`` objective.

    Returns:
        ``[B·(T−1), V]`` float32 log-softmax of the logits at positions 0..T−2 (those that predict a next token).
    """
    b, t, _ = hidden.shape
    out = torch.empty(b * (t - 1), adapter.lm_head.out_features, dtype=torch.float32, device=hidden.device)
    for rows, logits in next_token_logits(adapter, hidden):
        out[rows] = F.log_softmax(logits, dim=-1)
    return out


def sequence_losses(
    adapter, hidden: torch.Tensor, input_ids: torch.Tensor, teacher: torch.Tensor | None = None, to_cpu: bool = True
) -> torch.Tensor:
    """Per-sequence mean over next-token positions of the cross-entropy (or of KL(teacher ‖ model)).

    Args:
        adapter: the model's family adapter.
        hidden: ``[B, T, H]`` final hidden states (after the last norm).
        input_ids: ``[B, T]`` the tokens (targets are ``input_ids[:, 1:]``), T >= 2.
        teacher: ``[B·(T−1), V]`` log-probabilities (:func:`teacher_logprobs` of the dense model), or None.
        to_cpu: copy the result to the CPU (a host-device synchronisation); False leaves it on ``hidden``'s device.

    Returns:
        ``[B]`` float32 on CPU (or on ``hidden``'s device).
    """
    b, t, _ = hidden.shape
    targets = input_ids[:, 1:].reshape(-1).to(hidden.device)  # [B(T-1)]
    loss = torch.empty(b * (t - 1), dtype=torch.float32, device=hidden.device)
    for rows, logits in next_token_logits(adapter, hidden):
        loss[rows] = token_losses(logits, targets[rows], None if teacher is None else teacher[rows])
    per_seq = loss.view(b, t - 1).mean(dim=1)  # [B]
    return per_seq.cpu() if to_cpu else per_seq
