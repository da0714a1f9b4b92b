"""The gathered fast path equals the masked reference (``masked_losses``) on every family, dtype and edge case."""

import numpy as np
import pytest
import torch

from probprune.compaction import compact
from probprune.fastpath import fast_forward_hidden, gathered_losses
from probprune.mask_space import CHANNEL, HEAD, LAYER
from probprune.masked_forward import masked_losses, masks_applied
from probprune.models import get_adapter, tiny_model

FP32_TOL = 1e-5
# bf16: both paths round every matmul output to 8 mantissa bits, but in different summation orders (the reference
# adds exact zeros for pruned units); on these models the losses agree to ~1e-6, 5e-3 nats leaves room for other BLAS.
BF16_TOL = 5e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _space(adapter, channel_block, seed=0):
    perm = None
    if channel_block > 1:
        rng = np.random.default_rng(seed)
        perm = [rng.permutation(ls.intermediate_size) for ls in adapter.layer_shapes()]
    return adapter.mask_space(heads=True, channels=True, layers=True, channel_block=channel_block, channel_perm=perm)


def _units(space, unit_type, layer):
    return np.flatnonzero((space.unit_type == unit_type) & (space.unit_layer == layer))


def _edge_masks(space, seed=0):
    """All-ones, random, a dropped layer, a layer with 0 heads, a layer with 0 channels, and all three at once."""
    rng = np.random.default_rng(seed)
    ones = space.full_mask()
    masks = [ones, *(rng.random((3, space.num_units)) < 0.6).astype(np.float32)]
    drop = masks[1].copy()
    drop[_units(space, LAYER, 0)] = 0
    no_heads = masks[2].copy()
    no_heads[_units(space, HEAD, 1)] = 0
    no_chans = masks[3].copy()
    no_chans[_units(space, CHANNEL, 0)] = 0
    mixed = ones.copy()
    mixed[_units(space, HEAD, 0)] = 0
    mixed[_units(space, CHANNEL, 0)] = 0
    mixed[_units(space, LAYER, 1)] = 0
    return np.stack([*masks, drop, no_heads, no_chans, mixed])


def _batch(seed, b=3, t=16):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channel_block", [1, 4])
def test_gathered_equals_masked_fp32(tiny_kind, channel_block):
    model = tiny_model(tiny_kind)
    adapter = get_adapter(model)
    space = _space(adapter, channel_block)
    masks = _edge_masks(space)
    x = _batch(0)
    want = masked_losses(adapter, space, masks, x)
    got = gathered_losses(adapter, space, masks, x)
    assert got.dtype == np.float64 and got.shape == (len(masks),)
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_TOL)
    assert np.ptp(want) > 0.05  # the masks matter, so equality is not trivial


@pytest.mark.parametrize("channel_block", [1, 4])
def test_gathered_equals_masked_bf16(tiny_kind, channel_block):
    model = tiny_model(tiny_kind).to(torch.bfloat16)
    adapter = get_adapter(model)
    space = _space(adapter, channel_block, seed=1)
    masks = _edge_masks(space, seed=1)
    x = _batch(1)
    want = masked_losses(adapter, space, masks, x)
    got = gathered_losses(adapter, space, masks, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=BF16_TOL)
    # and bf16 is close to fp32, so the comparison above is not between two broken numbers
    ref32 = masked_losses(get_adapter(tiny_model(tiny_kind)), space, masks, x)
    np.testing.assert_allclose(got, ref32, rtol=0, atol=0.1)


def test_output_biases_are_kept_when_a_sublayer_is_empty():
    model = tiny_model("llama", attention_bias=True, mlp_bias=True)
    adapter = get_adapter(model)
    space = _space(adapter, 4)
    masks = _edge_masks(space, seed=2)
    x = _batch(2)
    np.testing.assert_allclose(
        gathered_losses(adapter, space, masks, x), masked_losses(adapter, space, masks, x), rtol=0, atol=FP32_TOL
    )


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("mistral", {}),  # tiny_config pins sliding_window=None: set on the shared config below
        ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),  # layer 1 slides, layer 0 not
    ],
)
def test_sliding_window_shorter_than_the_sequence(kind, overrides):
    model = tiny_model(kind, **overrides)
    if kind == "mistral":
        model.config.sliding_window = 5
        assert model.model.layers[0].self_attn.config.sliding_window == 5
    adapter = get_adapter(model)
    space = _space(adapter, 1)
    masks = _edge_masks(space, seed=3)
    x = _batch(3, t=20)
    want = masked_losses(adapter, space, masks, x)
    np.testing.assert_allclose(gathered_losses(adapter, space, masks, x), want, rtol=0, atol=FP32_TOL)
    full = masked_losses(get_adapter(tiny_model(kind)), space, masks[:1], x)
    assert abs(full[0] - want[0]) > 1e-3  # the window changes the result, so it was really applied


def test_already_pruned_model_with_empty_sublayers():
    model = tiny_model("qwen2", attention_bias=True)
    space0 = get_adapter(model).mask_space(layers=False)
    prune = space0.full_mask()
    prune[_units(space0, HEAD, 0)] = 0  # layer 0 -> EmptyAttention
    prune[_units(space0, CHANNEL, 1)] = 0  # layer 1 -> EmptyMLP
    prune[_units(space0, CHANNEL, 0)[::2]] = 0
    pruned = compact(model, space0, prune)
    adapter = get_adapter(pruned)
    space = adapter.mask_space(layers=True)
    masks = (np.random.default_rng(4).random((4, space.num_units)) < 0.6).astype(np.float32)
    masks[0] = 1
    x = _batch(4)
    np.testing.assert_allclose(
        gathered_losses(adapter, space, masks, x), masked_losses(adapter, space, masks, x), rtol=0, atol=FP32_TOL
    )


def test_parameters_are_unchanged(tiny_kind):
    model = tiny_model(tiny_kind)
    adapter = get_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = _space(adapter, 4)
    gathered_losses(adapter, space, _edge_masks(space), _batch(5))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_fast_forward_hidden_equals_masked_last_hidden_state(tiny_kind):
    model = tiny_model(tiny_kind)
    adapter = get_adapter(model)
    space = _space(adapter, 4)
    x = _batch(6, b=2, t=10)
    for mask in _edge_masks(space, seed=6):
        with torch.no_grad(), masks_applied(adapter, space.expand(mask[None])):
            want = adapter.base_model(input_ids=x, use_cache=False).last_hidden_state
        got = fast_forward_hidden(adapter, space, mask, x)
        assert got.shape == (2, 10, model.config.hidden_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_repeated_masks_are_scored_once_and_in_order(monkeypatch):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    space = _space(adapter, 1)
    a, b, c = _edge_masks(space, seed=7)[[0, 1, 7]]  # all-ones, random, mixed: distinct
    masks = np.stack([b, a, b, c, a])
    import probprune.fastpath as fastpath

    calls = []
    real = fastpath._forward_plan
    monkeypatch.setattr(fastpath, "_forward_plan", lambda *args: calls.append(1) or real(*args))
    x = _batch(7)
    got = gathered_losses(adapter, space, masks, x)
    assert len(calls) == 3
    np.testing.assert_allclose(got, masked_losses(adapter, space, masks, x), rtol=0, atol=FP32_TOL)
    assert got[0] == got[2] and got[1] == got[4]


@pytest.mark.filterwarnings("error::UserWarning")
def test_read_only_masks_are_copied_not_aliased():
    """Masks that arrive through Ray's object store are read-only numpy views: both paths copy them (torch warns
    "The given NumPy array is not writable" when it aliases one; here that warning is an error)."""
    adapter = get_adapter(tiny_model("llama"))
    space = _space(adapter, 1)
    masks = _edge_masks(space)[[0, 4]]
    frozen = masks.copy()
    frozen.flags.writeable = False
    x = _batch(3)
    got = gathered_losses(adapter, space, frozen, x)
    np.testing.assert_array_equal(got, gathered_losses(adapter, space, masks, x))
    np.testing.assert_allclose(masked_losses(adapter, space, frozen, x), got, rtol=0, atol=FP32_TOL)
    assert got[1] > got[0]  # dropping layer 0 costs loss on this model


def test_rejects_bad_inputs():
    adapter = get_adapter(tiny_model("llama"))
    space = _space(adapter, 1)
    x = _batch(8)
    soft = space.full_mask() * 0.5
    with pytest.raises(ValueError, match="0/1 masks"):
        gathered_losses(adapter, space, soft[None], x)
    with pytest.raises(ValueError, match=rf"masks must have shape \[K, {space.num_units}\]"):
        gathered_losses(adapter, space, np.ones((2, 3), dtype=np.float32), x)
    with pytest.raises(ValueError, match="T >= 2"):
        gathered_losses(adapter, space, space.full_mask()[None], x[:, :1])
    with pytest.raises(ValueError, match="masks_per_forward must be 1"):
        gathered_losses(adapter, space, space.full_mask()[None], x, masks_per_forward=2)


def _half_mask(space, seed=0):
    """Exactly half of the head groups and half of the channels kept, at random."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(space.num_units, dtype=np.float32)
    for t in (HEAD, CHANNEL):
        idx = np.flatnonzero(space.unit_type == t)
        mask[rng.choice(idx, size=idx.size // 2, replace=False)] = 1
    return mask


@pytest.mark.slow
def test_smollm2_half_mask_equals_reference(smollm2):
    model, _ = smollm2
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = _half_mask(space)
    x = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    want = masked_losses(adapter, space, mask[None], x)
    got = gathered_losses(adapter, space, mask[None], x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # observed 5e-5
    assert 2.0 < got[0] < 20.0


@pytest.mark.slow
def test_smollm2_half_mask_bf16(smollm2):
    """bf16 over 30 layers of a half-pruned model: both paths drift ~1e-2 nats from fp32, so they agree to 5e-2.

    (After one layer the two bf16 hidden states differ by single ulps only; a 50 % mask makes the model sensitive.)
    """
    from probprune.models.loading import load_model

    model32, _ = smollm2
    model, _ = load_model("embedded:smollm2-135m", dtype="bfloat16")
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = _half_mask(space)
    x = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    got = gathered_losses(adapter, space, mask[None], x)
    np.testing.assert_allclose(got, masked_losses(adapter, space, mask[None], x), rtol=0, atol=5e-2)
    np.testing.assert_allclose(got, masked_losses(get_adapter(model32), space, mask[None], x), rtol=0, atol=1e-1)


@pytest.mark.parametrize("kind", ["llama", "gemma3-mqa"])
def test_layer_removal_losses_equal_gathered_losses_of_the_trial_masks(kind: str) -> None:
    from probprune.fastpath import layer_removal_losses
    from probprune.mask_space import LAYER

    extra = {"layer_types": ["sliding_attention", "full_attention"] * 2} if kind.startswith("gemma3") else {}
    model = tiny_model(kind, num_hidden_layers=4, **extra)
    adapter = get_adapter(model)
    batch = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(4))
    for space in (adapter.mask_space(layers=True), adapter.mask_space(query_heads=kind == "gemma3-mqa")):
        lay = space.unit_type == LAYER
        units = [np.flatnonzero((space.unit_layer == li) & (lay if lay.any() else True)) for li in range(4)]
        mask = space.full_mask()
        mask[units[2]] = 0.0  # start from a model without layer 2
        mask[np.flatnonzero(space.unit_layer == 0)[:1]] = 0.0  # and thinner in layer 0
        trials = np.repeat(mask[None], 3, axis=0)
        for r, li in enumerate((0, 1, 3)):
            trials[r, units[li]] = 0.0
        want = gathered_losses(adapter, space, trials, batch)  # [3]
        got = layer_removal_losses(adapter, space, mask, [0, 1, 3], batch)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
        assert np.ptp(want) > 1e-3  # the trials differ, so equality is not trivial
        if lay.any():
            with pytest.raises(ValueError, match="layer 2 is already removed"):
                layer_removal_losses(adapter, space, mask, [2], batch)
