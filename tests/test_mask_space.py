import numpy as np
import pytest
import torch

from probprune.mask_space import CHANNEL, HEAD, LAYER, LayerShape, MaskSpace

SHAPE = LayerShape(num_kv_heads=2, group_size=3, head_dim=4, hidden_size=8, intermediate_size=10, norm_params=16)


def test_costs_by_hand():
    # head group: 3 q heads + 1 k + 1 v rows of 4x8, plus 3 o_proj column blocks of 8x4
    assert SHAPE.head_unit_cost == (3 + 2) * 4 * 8 + 3 * 4 * 8 == 256
    assert SHAPE.channel_cost == 24
    assert SHAPE.layer_params == 2 * 256 + 10 * 24 + 16


def test_layout_and_blocks():
    sp = MaskSpace([SHAPE, SHAPE], channel_block=4, include_layers=True, total_params=5000)
    assert sp.type_counts() == {"head": 4, "channel": 6, "layer": 2}  # 10 channels -> blocks of 4, 4, 2
    assert sp.type_slice(HEAD) == slice(0, 4) and sp.type_slice(CHANNEL) == slice(4, 10)
    assert sp.type_slice(LAYER) == slice(10, 12)
    assert sp.cost[sp.type_slice(CHANNEL)].tolist() == [96, 96, 48] * 2
    assert sp.prunable_params == 2 * SHAPE.layer_params


def test_expand_maps_blocks_to_channels_through_permutation():
    perm = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    sp = MaskSpace([SHAPE], channel_block=4, channel_perm=[perm])
    m = np.ones(sp.num_units, dtype=np.float32)
    m[sp.type_slice(CHANNEL).start] = 0  # first block = channels 9, 8, 7, 6
    m[0] = 0  # first KV group
    e = sp.expand(m)
    assert e["channels"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert e["heads"][0].tolist() == [0, 1]
    assert e["layers"].tolist() == [1]


def test_kept_params_counts_nested_units_once():
    sp = MaskSpace([SHAPE, SHAPE], include_layers=True, total_params=5000)
    m = np.ones(sp.num_units, dtype=np.float32)
    m[0] = 0  # one head group of layer 0
    m[sp.type_slice(LAYER).start + 1] = 0  # drop layer 1: its heads and channels must not count again
    m[2] = 0  # a head group of layer 1 (inside the dropped layer)
    assert sp.kept_params(m) == SHAPE.layer_params - 256
    s = sp.sparsity(m)
    assert s["prunable"] == pytest.approx((SHAPE.layer_params + 256) / (2 * SHAPE.layer_params))
    assert s["total"] == pytest.approx((SHAPE.layer_params + 256) / 5000)


def test_bad_mask_shape():
    sp = MaskSpace([SHAPE])
    with pytest.raises(ValueError, match="mask has 3 units, the mask space has 12"):
        sp.expand(torch.ones(3))


def test_expand_scatters_each_block_to_its_permuted_channels_and_pickles_without_its_cache():
    import pickle

    wide = LayerShape(num_kv_heads=2, group_size=3, head_dim=4, hidden_size=8, intermediate_size=12, norm_params=16)
    perm = [np.array([3, 0, 7, 1, 9, 2, 4, 8, 5, 6]), np.random.default_rng(1).permutation(12)]
    sp = MaskSpace([SHAPE, wide], channel_block=4, channel_perm=perm)
    blocks = np.flatnonzero(sp.unit_type == CHANNEL)  # layer 0: 3 blocks (4, 4, 2 channels), layer 1: 3 blocks
    mask = sp.full_mask()
    mask[blocks[[1, 3]]] = 0  # layer 0's second block, layer 1's first block
    ch = sp.expand(mask)["channels"]  # [L, 12], padded with 1
    want0, want1 = np.ones(12), np.ones(12)
    want0[perm[0][4:8]] = 0
    want1[perm[1][0:4]] = 0
    assert ch[0].tolist() == want0.tolist() and ch[1].tolist() == want1.tolist()
    assert sp.plan(mask)[0].channels.tolist() == sorted(set(range(10)) - set(perm[0][4:8].tolist()))
    again = pickle.loads(pickle.dumps(sp))
    assert "_scatter" not in again.__dict__
    assert torch.equal(again.expand(mask)["channels"], ch)
