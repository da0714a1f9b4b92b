"""Tests of probprune.perplexity against hand-computed perplexities on a tiny random LLaMA."""

from __future__ import annotations

import math

import pytest
import torch

from probprune.errors import UserError
from probprune.perplexity import evaluate_ppl, perplexity

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (5 * 32 + 7,), generator=torch.Generator().manual_seed(1))  # [167]


def hand_nll(model, tokens, seq_len, n_windows):
    """Sum of -log p(next token) over windows, one window and one position at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = tokens[w * seq_len : (w + 1) * seq_len]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)  # [T, V]
            for t in range(seq_len - 1):
                total -= logp[t, window[t + 1]].item()
                count += 1
    return total / count, count


def test_perplexity_matches_hand_computation(model, tokens):
    result = perplexity(model, tokens, seq_len=32, batch_size=2, progress=False)  # 5 windows: batches 2, 2, 1
    nll, count = hand_nll(model, tokens, 32, 5)
    assert result["windows"] == 5 and result["tokens"] == count == 5 * 31 and result["seq_len"] == 32
    assert result["nll"] == pytest.approx(nll, abs=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert 40 < result["ppl"] < 100  # a random model over 64 tokens: close to uniform
    assert perplexity(model, tokens, 32, batch_size=5, progress=True)["nll"] == pytest.approx(nll, abs=1e-5)


def test_perplexity_with_bos_scores_seq_len_minus_one_tokens_per_window(model, tokens):
    bos = 7
    result = perplexity(model, tokens, seq_len=32, batch_size=2, progress=False, bos_id=bos)
    windows = torch.cat([torch.full((5, 1), bos), tokens[: 5 * 31].view(5, 31)], dim=1)  # 167 // 31 = 5 windows
    nll, count = hand_nll(model, windows.reshape(-1), 32, 5)
    assert result["windows"] == 5 and result["tokens"] == count == 5 * 31
    assert result["nll"] == pytest.approx(nll, abs=1e-5)
    capped = perplexity(model, tokens, seq_len=32, max_tokens=100, progress=False, bos_id=bos)
    assert capped["windows"] == 3 and capped["tokens"] == 3 * 31  # max_tokens // seq_len windows, as without BOS
    assert evaluate_ppl(model, tokens, [32], batch_size=2, progress=False, bos_id=bos)[32] == pytest.approx(
        result["ppl"], rel=1e-6
    )


def test_perplexity_max_tokens_cap(model, tokens):
    result = perplexity(model, tokens, seq_len=32, max_tokens=100, progress=False)
    assert result["windows"] == 3 and result["tokens"] == 93
    assert result["nll"] == pytest.approx(hand_nll(model, tokens, 32, 3)[0], abs=1e-5)


def test_perplexity_clamps_to_context(model, tokens):
    long = torch.cat([tokens, tokens])  # [334]
    result = perplexity(model, long, seq_len=2048, progress=False)
    assert result["seq_len"] == 128 and result["windows"] == 2
    assert result["nll"] == pytest.approx(hand_nll(model, long, 128, 2)[0], abs=1e-5)


def test_perplexity_no_full_window(model, tokens):
    with pytest.raises(UserError, match=r"seq_len=128 fits: the held-out split has 100 tokens"):
        perplexity(model, tokens[:100], seq_len=128, progress=False)
    with pytest.raises(UserError, match=r"167 tokens and eval\.max_tokens=20"):
        perplexity(model, tokens, seq_len=32, max_tokens=20, progress=False)


def test_perplexity_restores_mode_and_device(model, tokens):
    model.train()
    try:
        train_nll = perplexity(model, tokens, 32, progress=False)["nll"]
        assert model.training
    finally:
        model.eval()
    assert train_nll == perplexity(model, tokens, 32, progress=False)["nll"]


def test_evaluate_ppl(model, tokens):
    long = torch.cat([tokens, tokens])
    out = evaluate_ppl(model, long, [16, 32, 4096, 128], max_tokens=None, batch_size=4)
    assert list(out) == [16, 32, 128]
    for seq_len, ppl in out.items():
        assert ppl == pytest.approx(perplexity(model, long, seq_len, progress=False)["ppl"], rel=1e-6)
