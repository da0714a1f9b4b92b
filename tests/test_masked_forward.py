import numpy as np
import pytest
import torch

from probprune.masked_forward import masked_logits, masked_losses, sequence_nll
from probprune.models import get_adapter, tiny_model


def _setup(kind="llama", layers=True):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    return model, adapter, adapter.mask_space(layers=layers)


def test_all_ones_mask_is_the_dense_model(tiny_kind):
    model, adapter, space = _setup(tiny_kind)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=x).logits
    assert torch.equal(masked_logits(adapter, space, space.full_mask(), x), dense)


def test_removing_masks_restores_exact_outputs():
    model, adapter, space = _setup()
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=x).logits
    m = (np.random.default_rng(0).random(space.num_units) < 0.5).astype(np.float32)
    changed = masked_logits(adapter, space, m, x)
    assert (changed - before).abs().max() > 1e-2  # the mask did something
    assert torch.equal(model(input_ids=x).logits, before)


def test_dropped_layer_is_identity_on_the_residual_stream():
    model, adapter, space = _setup()
    m = space.full_mask()
    m[space.type_slice(2).start] = 0  # drop layer 0
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    got = masked_logits(adapter, space, m, x)
    layer0 = model.model.layers[0]
    model.model.layers = torch.nn.ModuleList([model.model.layers[1]])
    model.model.layers[0].self_attn.layer_idx = 0
    try:
        want = model(input_ids=x).logits
    finally:
        model.model.layers = torch.nn.ModuleList([layer0, model.model.layers[0]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_head_mask_equals_zeroing_o_proj_columns():
    model, adapter, space = _setup("llama", layers=False)
    m = space.full_mask()
    m[1] = 0  # layer 0, KV group 1 -> query heads 2, 3 -> o_proj columns 16..31
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    got = masked_logits(adapter, space, m, x)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.o_proj.weight
        saved = w[:, 16:32].clone()
        w[:, 16:32] = 0
        want = model(input_ids=x).logits
        w[:, 16:32] = saved
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batch_of_masks_equals_one_mask_at_a_time(tiny_kind):
    model, adapter, space = _setup(tiny_kind)
    rng = np.random.default_rng(4)
    masks = (rng.random((5, space.num_units)) < 0.6).astype(np.float32)
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(4))
    batched = masked_losses(adapter, space, masks, x)
    chunked = masked_losses(adapter, space, masks, x, max_rows=6)
    single = np.array([masked_losses(adapter, space, m[None], x)[0] for m in masks])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked, single, rtol=1e-5, atol=1e-6)
    assert batched.std() > 1e-3  # different masks give different losses


def test_sequence_nll_matches_cross_entropy():
    model, adapter, _ = _setup()
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    logits = model(input_ids=x).logits
    want = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
        )
        .view(2, -1)
        .mean(1)
    )
    torch.testing.assert_close(sequence_nll(adapter, x), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- the batched scoring path
BATCHED_TOL = 2e-5  # fp32: the batched dense forward and the gathered pruned-width forward differ by summation order


def _scoring_case(kind: str, device: str = "cpu"):
    model = tiny_model(kind).to(device)
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True, channel_block=4)
    g = np.random.default_rng(3)
    masks = (g.random((5, space.num_units)) < 0.6).astype(np.float32)  # [K, N]
    masks[0] = 1.0  # the all-keep mask
    masks[3] = masks[1]  # a duplicate: scored once, reported twice
    batch = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(4))  # [B, T]
    return adapter, space, masks, batch


def _batched_equals_gathered(kind: str, device: str) -> None:
    from probprune.fastpath import dense_teacher as gathered_teacher
    from probprune.fastpath import gathered_losses
    from probprune.masked_forward import dense_teacher

    adapter, space, masks, batch = _scoring_case(kind, device)
    want = gathered_losses(adapter, space, masks, batch)
    for max_rows in (None, 3, 7):  # all K·B rows in one forward, one mask per forward, two masks per forward
        got = masked_losses(adapter, space, masks, batch, max_rows=max_rows)
        np.testing.assert_allclose(got, want, rtol=0, atol=BATCHED_TOL)
    assert got[3] == got[1] and want[0] > 1.0  # real cross-entropies, duplicates identical
    kl_want = gathered_losses(adapter, space, masks, batch, teacher=gathered_teacher(adapter, space, batch))
    kl_got = masked_losses(adapter, space, masks, batch, teacher=dense_teacher(adapter, batch))
    assert kl_got[0] == 0.0  # the all-keep mask runs the teacher's own forward
    np.testing.assert_allclose(kl_got, kl_want, rtol=0, atol=BATCHED_TOL)
    assert (kl_got[1:] > 1e-3).all()


def test_batched_losses_equal_the_gathered_per_mask_losses(tiny_kind):
    _batched_equals_gathered(tiny_kind, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_losses_equal_the_gathered_per_mask_losses_on_cuda():
    _batched_equals_gathered("llama", "cuda")


def test_one_mask_broadcasts_over_any_number_of_rows():
    model, adapter, space = _setup()
    m = (np.random.default_rng(5).random(space.num_units) < 0.5).astype(np.float32)
    x = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(6))
    per_row = torch.stack([masked_logits(adapter, space, m, x[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(masked_logits(adapter, space, m, x), per_row, rtol=1e-5, atol=1e-5)
