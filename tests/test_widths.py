"""Aligned MLP widths: multiples of align, budget met to one aligned block, best channels kept, exact compaction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probprune.compaction import compact
from probprune.errors import UserError
from probprune.importance import collect_input_stats, rank_channels
from probprune.mask_space import CHANNEL, HEAD, LAYER, LayerShape, MaskSpace
from probprune.masked_forward import masked_logits
from probprune.models import get_adapter, tiny_model
from probprune.projection import final_mask
from probprune.widths import align_mask, channel_widths, check_align

SHAPE = LayerShape(num_kv_heads=3, group_size=3, head_dim=8, hidden_size=64, intermediate_size=96)


def _space(width: int = 96, layers: int = 8, block: int = 4, include_layers: bool = False) -> MaskSpace:
    shape = LayerShape(num_kv_heads=3, group_size=3, head_dim=8, hidden_size=64, intermediate_size=width)
    return MaskSpace([shape] * layers, channel_block=block, include_layers=include_layers, total_params=10**6)


def _probs(space: MaskSpace, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(space.num_units)


def _check_widths(space: MaskSpace, mask: np.ndarray, align: int) -> None:
    for li, w in enumerate(channel_widths(space, mask)):
        full = space.layers[li].intermediate_size
        assert w % align == 0 or w == full, (li, w)


def _check_best_kept(space: MaskSpace, before: np.ndarray, after: np.ndarray, probs: np.ndarray) -> None:
    """Per layer, the kept full-width blocks are a prefix of (kept before by prob desc, then dropped by prob desc)."""
    for li, ls in enumerate(space.layers):
        b = space.channel_block
        units = np.flatnonzero((space.unit_type == CHANNEL) & (space.unit_layer == li))
        full = units[ls.intermediate_size - space.unit_index[units] * b >= b]
        kept, dropped = full[before[full] > 0.5], full[before[full] < 0.5]
        by_prob = [x[np.argsort(-probs[x], kind="stable")] for x in (kept, dropped)]
        order = np.r_[by_prob[0], by_prob[1]]
        n_now = int(after[full].sum())
        assert after[order[:n_now]].all() and not after[order[n_now:]].any()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.62])
@pytest.mark.parametrize("align", [8, 16, 32, 64])
def test_per_type_widths_aligned_and_budget_within_one_block(sparsity, align):
    space = _space()
    probs = _probs(space, 0)
    mask = final_mask(space, probs, sparsity, "per_type")
    out = align_mask(space, mask, probs, align, sparsity, "per_type")
    _check_widths(space, out, align)
    np.testing.assert_array_equal(out[space.unit_type != CHANNEL], mask[space.unit_type != CHANNEL])  # heads as is
    target = (1 - sparsity) * 8 * 96
    total = sum(channel_widths(space, out))
    assert target - align < total <= target
    _check_best_kept(space, mask, out, probs)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("align", [16, 32])
def test_params_budget_within_one_aligned_block(sparsity, align):
    space = _space(include_layers=True)
    probs = _probs(space, 1)
    probs[space.type_slice(LAYER)] = 1.0  # keep every layer: the budget is spent on heads and channels
    mask = final_mask(space, probs, sparsity, "params")
    out = align_mask(space, mask, probs, align, sparsity, "params")
    _check_widths(space, out, align)
    limit = (1 - sparsity) * space.prunable_params
    block_cost = align * space.layers[0].channel_cost
    assert limit - block_cost < space.kept_params(out) <= limit
    _check_best_kept(space, mask, out, probs)


def test_width_not_a_multiple_of_align_allows_full_width_and_narrow_last_block():
    space = _space(width=98, block=2)  # 49 blocks of 2
    probs = _probs(space, 2)
    mask = final_mask(space, probs, 0.3, "per_type")
    out = align_mask(space, mask, probs, 64, 0.3, "per_type")
    assert set(channel_widths(space, out)) <= {0, 64, 98}
    assert (1 - 0.3) * 8 * 98 - 64 < sum(channel_widths(space, out)) <= (1 - 0.3) * 8 * 98
    space4 = _space(width=98, block=4)  # 24 blocks of 4 + one of 2
    probs4 = _probs(space4, 3)
    mask4 = final_mask(space4, probs4, 0.5, "per_type")
    out4 = align_mask(space4, mask4, probs4, 8, 0.5, "per_type")
    _check_widths(space4, out4, 8)
    assert 0.5 * 8 * 98 - 8 < sum(channel_widths(space4, out4)) <= 0.5 * 8 * 98


def test_dropped_layers_are_left_untouched():
    space = _space(include_layers=True)
    probs = _probs(space, 4)
    mask = final_mask(space, probs, 0.5, "per_type")  # drops 4 of the 8 layers
    alive = mask[space.unit_type == LAYER] > 0.5
    assert alive.sum() == 4
    out = align_mask(space, mask, probs, 16, 0.5, "per_type")
    dead = (space.unit_type == CHANNEL) & ~alive[space.unit_layer]
    np.testing.assert_array_equal(out[dead], mask[dead])
    assert any(w % 16 for w in np.asarray(channel_widths(space, mask))[~alive])  # unaligned, and left so
    for li, w in enumerate(channel_widths(space, out)):
        assert not alive[li] or w % 16 == 0


def test_align_one_is_a_copy_and_bad_align_names_the_fields():
    space = _space()
    probs = _probs(space, 5)
    mask = final_mask(space, probs, 0.5, "per_type")
    out = align_mask(space, mask, probs, 1, 0.5, "per_type")
    np.testing.assert_array_equal(out, mask)
    assert out is not mask
    with pytest.raises(UserError, match=r"mask\.align \(6\) must be a multiple of mask\.channel_block \(4\)"):
        align_mask(space, mask, probs, 6, 0.5, "per_type")
    with pytest.raises(UserError, match="mask.align must be an integer >= 1"):
        check_align(space, 0)
    heads_only = MaskSpace([SHAPE] * 2, include_channels=False)
    with pytest.raises(UserError, match="mask.channels=true"):
        check_align(heads_only, 16)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("budget", ["per_type", "params"])
def test_aligned_mask_compacts_exactly(kind, budget):
    model = tiny_model(kind, num_hidden_layers=4)
    adapter = get_adapter(model)
    stats = collect_input_stats(adapter, torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)))
    space = adapter.mask_space(channel_block=4, channel_perm=rank_channels(adapter, stats))
    probs = _probs(space, 6)
    mask = final_mask(space, probs, 0.5, budget)
    out = align_mask(space, mask, probs, 16, 0.5, budget)
    _check_widths(space, out, 16)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    small = compact(model, space, out)
    torch.testing.assert_close(small(input_ids=x).logits, masked_logits(adapter, space, out, x), rtol=1e-5, atol=1e-5)
    widths = [layer.mlp.down_proj.in_features for layer in small.model.layers]
    assert widths == channel_widths(space, out) and all(w % 16 == 0 for w in widths)
    assert int(out[space.unit_type == HEAD].sum()) == int(mask[space.unit_type == HEAD].sum())
