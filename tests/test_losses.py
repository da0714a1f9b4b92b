"""The one loss module: cross-entropy and KL per position, per sequence, and from final hidden states in chunks."""

import pytest
import torch
import torch.nn.functional as F

from probprune import losses
from probprune.models import get_adapter, tiny_model


def test_token_losses_cross_entropy_and_kl_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    targets = torch.randint(0, 7, (5,), generator=g)
    want = torch.stack([-torch.log_softmax(logits[i], -1)[targets[i]] for i in range(5)])
    torch.testing.assert_close(losses.token_losses(logits, targets), want, rtol=1e-6, atol=1e-6)
    teacher = torch.log_softmax(torch.randn(5, 7, generator=g), -1)
    p, q = teacher.exp(), torch.softmax(logits, -1)
    want_kl = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(losses.token_losses(logits, targets, teacher), want_kl, rtol=1e-5, atol=1e-6)
    assert float(losses.token_losses(logits, targets, torch.log_softmax(logits, -1)).abs().max()) < 1e-6


@pytest.mark.parametrize("kind", ["llama", "gemma3"])  # gemma3: final-logit soft-capping goes through the adapter
@torch.no_grad()
def test_sequence_losses_equal_the_model_logits_in_small_chunks(kind, monkeypatch):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    x = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=x).logits  # [3, 9, V], soft-capped by the model itself
    want = torch.stack([F.cross_entropy(logits[b, :-1], x[b, 1:]) for b in range(3)])
    hidden = model.model(input_ids=x).last_hidden_state
    monkeypatch.setattr(losses, "LOGIT_ELEMENTS", 5 * model.config.vocab_size)  # 5 positions per chunk
    got = losses.sequence_losses(adapter, hidden, x)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    teacher = losses.teacher_logprobs(adapter, hidden)
    torch.testing.assert_close(
        teacher.view(3, 8, -1), torch.log_softmax(logits[:, :-1].float(), -1), rtol=1e-5, atol=1e-5
    )
    assert float(losses.sequence_losses(adapter, hidden, x, teacher).abs().max()) < 1e-6
