"""Channel blocks formed by metric rank: costs, expansion, exact compaction and reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.compaction import compact, count_params, save_pruned
from probprune.importance import channel_wanda_scores, collect_input_stats, rank_channels, wanda_sp_scores
from probprune.mask_space import CHANNEL, HEAD
from probprune.masked_forward import masked_logits
from probprune.models import get_adapter, tiny_model
from probprune.models.loading import load_pruned

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32
BLOCK = 4
WIDTH = 98  # 24 blocks of 4 + one of 2


def _blocked(kind: str):
    model = tiny_model(kind, intermediate_size=WIDTH)
    adapter = get_adapter(model)
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_input_stats(adapter, calib)
    perm = rank_channels(adapter, stats)
    space = adapter.mask_space(channel_block=BLOCK, channel_perm=perm)
    return model, adapter, stats, space


def test_block_costs_are_width_times_channel_cost():
    _, _, _, space = _blocked("llama")
    ch = space.unit_type == CHANNEL
    assert int(ch.sum()) == 2 * 25
    c = space.layers[0].channel_cost
    width = np.minimum(BLOCK, WIDTH - space.unit_index[ch] * BLOCK)
    np.testing.assert_array_equal(space.cost[ch], width * c)
    assert sorted(set(width.tolist())) == [2, 4] and int((width == 2).sum()) == 2  # one narrow block per layer
    assert int(space.cost[ch].sum()) == 2 * WIDTH * c
    assert space.prunable_params == int(space.cost.sum())


def test_blocks_hold_ranked_channels():
    _, adapter, stats, space = _blocked("llama")
    per_channel = channel_wanda_scores(adapter, stats)
    scores = wanda_sp_scores(adapter, space, stats)
    for li in range(space.num_layers):
        perm = space.channel_perm[li]
        assert np.all(np.diff(per_channel[li][perm]) <= 0)  # perm = descending single-channel score
        units = np.flatnonzero((space.unit_type == CHANNEL) & (space.unit_layer == li))
        assert np.all(np.diff(scores[units]) <= 0)  # so block scores descend with the block index
        # dropping block b zeroes exactly channels perm[4b : 4b + 4]
        for b in (0, 7, 24):
            mask = space.full_mask()
            mask[units[b]] = 0
            chans = space.expand(mask)["channels"][li]
            np.testing.assert_array_equal(
                np.flatnonzero(chans.numpy() < 0.5), np.sort(perm[b * BLOCK : (b + 1) * BLOCK])
            )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_blocked_mask_compacts_exactly_and_reloads(kind, tmp_path):
    model, adapter, _, space = _blocked(kind)
    rng = np.random.default_rng(1)
    mask = (rng.random(space.num_units) < 0.6).astype(np.float32)
    mask[space.type_slice(HEAD)][:1] = 1  # keep at least one head group somewhere
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    want = masked_logits(adapter, space, mask, x)
    small = compact(model, space, mask)
    got = small(input_ids=x).logits
    torch.testing.assert_close(got, want, **TOL)
    assert count_params(small) == space.total_params - (space.prunable_params - space.kept_params(mask))
    kept = space.expand(mask)["channels"]
    for li, layer in enumerate(small.model.layers):
        assert layer.mlp.down_proj.in_features == int((kept[li, :WIDTH] > 0.5).sum())
    path = save_pruned(small, tmp_path / "m")
    torch.testing.assert_close(load_pruned(path)(input_ids=x).logits, got, rtol=0, atol=0)
    stock = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    torch.testing.assert_close(stock(input_ids=x).logits, got, rtol=0, atol=0)
