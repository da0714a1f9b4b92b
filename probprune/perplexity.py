"""Held-out perplexity.

Protocol: perplexity = exp(mean next-token cross-entropy) over non-overlapping windows of ``seq_len`` tokens taken
from the start of the held-out token stream (full windows only). Each window predicts its ``seq_len - 1`` last
tokens from the ones before it; there is no context carried across windows. Report it at 128 tokens (the paper's
and LLM-Pruner's convention) and at a long length (2048 or the model's limit). With a BOS id (``data.bos``, on for
families that prescribe it, e.g. Gemma 3) each window is the BOS followed by the next ``seq_len - 1`` stream tokens
(:func:`probprune.data.cut_windows`); the BOS is never a target, so a window still scores ``seq_len - 1`` tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import cut_windows
from .errors import UserError
from .losses import token_losses


def _row_nll_sums(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy per row, float32: logits ``[B, T, V]``, ids ``[B, T]`` -> ``[B]``."""
    B, T, V = logits.shape
    pred = logits[:, :-1].float().reshape(-1, V)  # [B*(T-1), V]
    return token_losses(pred, input_ids[:, 1:].reshape(-1)).view(B, T - 1).sum(dim=1)  # [B]


def max_context(model: Any) -> int | None:
    """The model's context limit (``config.max_position_embeddings``), or None."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value else None


def effective_len(seq_len: int, limit: int | None) -> int:
    """``seq_len`` clamped to the model's context ``limit`` (None: no limit)."""
    return min(int(seq_len), limit) if limit else int(seq_len)


def protocol(bos_id: int | None) -> str:
    """The evaluation protocol in words (``summary.json``'s ``eval.protocol``)."""
    if bos_id is None:
        return "non-overlapping windows"
    return (
        f"non-overlapping windows, each the BOS (id {bos_id}) then seq_len - 1 held-out tokens; the BOS is never "
        "a target, so a window scores seq_len - 1 tokens"
    )


def held_out_windows(
    tokens: torch.Tensor, seq_len: int, max_tokens: int | None, bos_id: int | None = None
) -> torch.Tensor:
    """The non-overlapping full windows ``[W, seq_len]`` from the start of ``tokens``, at most
    ``max_tokens // seq_len`` of them; with ``bos_id`` each is the BOS then ``seq_len - 1`` stream tokens
    (:func:`probprune.data.cut_windows`).

    Raises:
        UserError: not a single full window fits.
    """
    windows = cut_windows(tokens, seq_len, None if max_tokens is None else int(max_tokens) // seq_len, bos_id)
    if windows.shape[0] == 0:
        raise UserError(
            f"no full window of seq_len={seq_len} fits: the held-out split has {tokens.numel()} tokens and "
            f"eval.max_tokens={max_tokens}"
        )
    return windows  # [W, T]


def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "",
    bos_id: int | None = None,
) -> dict:
    """Perplexity of a causal LM over non-overlapping windows of a held-out token stream.

    Windows of ``seq_len`` tokens are taken from the start of ``tokens`` (full windows only; at most
    ``max_tokens // seq_len`` of them). ``seq_len`` above the model's ``config.max_position_embeddings`` is clamped
    to it. Runs under ``torch.inference_mode()`` with the model in eval mode (its mode is restored afterwards);
    logits are cast to float32 for the cross-entropy and the total is accumulated in float64.

    Args:
        model: a causal LM returning ``.logits`` (``transformers`` style).
        tokens: ``[n]`` held-out token ids (e.g. :func:`probprune.data.test_stream`).
        seq_len: window length (``eval.seq_lens``).
        max_tokens: cap on the tokens evaluated (``eval.max_tokens``); ``None`` uses the whole stream.
        batch_size: windows per forward.
        progress: show a progress bar.
        desc: label of the progress bar.
        bos_id: each window starts with this id, then ``seq_len - 1`` stream tokens; None: plain windows.

    Returns:
        ``{"ppl": exp(nll), "nll": mean nats per predicted token, "tokens": predicted tokens
        (windows * (seq_len - 1)), "windows": windows evaluated, "seq_len": the effective window length}``.

    Raises:
        UserError: ``seq_len < 2``, ``batch_size < 1``, or not a single full window in the stream (or under
            ``max_tokens``).
    """
    if int(seq_len) < 2:
        raise UserError(f"seq_len={seq_len!r} must be at least 2")
    if int(batch_size) < 1:
        raise UserError(f"eval batch_size={batch_size!r} must be at least 1")
    eff_len = effective_len(seq_len, max_context(model))
    windows = held_out_windows(tokens, eff_len, max_tokens, bos_id)  # [W, T]
    n_windows = windows.shape[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0  # float64 accumulator
    try:
        with (
            torch.inference_mode(),
            tqdm(total=n_windows, desc=desc or f"ppl@{eff_len}", unit="win", disable=not progress, leave=False) as bar,
        ):
            for start in range(0, n_windows, batch_size):
                x = windows[start : start + batch_size].to(device)  # [B, T]
                logits = model(input_ids=x, use_cache=False).logits  # [B, T, V]
                for b in range(x.shape[0]):  # one row at a time bounds the float32 copy of the logits
                    total_nll += float(_row_nll_sums(logits[b : b + 1], x[b : b + 1]).double().sum())
                del logits
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
    n_pred = n_windows * (eff_len - 1)
    nll = total_nll / n_pred
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_pred, "windows": n_windows, "seq_len": eff_len}


def evaluate_ppl(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_lens: list[int],
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    bos_id: int | None = None,
) -> dict[int, float]:
    """Perplexity at several window lengths (see :func:`perplexity`).

    Args:
        model: a causal LM.
        tokens: ``[n]`` held-out token ids.
        seq_lens: window lengths; each is clamped to the model's context, and lengths that clamp to the same
            value are evaluated once.
        max_tokens: cap on the tokens evaluated per length.
        batch_size: windows per forward.
        progress: show progress bars.
        bos_id: as :func:`perplexity`.

    Returns:
        ``{effective seq_len: perplexity}``, in the order of ``seq_lens``.

    Raises:
        UserError: as :func:`perplexity`.
    """
    limit = max_context(model)
    out: dict[int, float] = {}
    for seq_len in seq_lens:
        eff = effective_len(seq_len, limit)
        if eff not in out:
            out[eff] = perplexity(model, tokens, eff, max_tokens, batch_size, progress, bos_id=bos_id)["ppl"]
    return out
