"""Importance metrics: each checked against a hand computation on a tiny model with known weights and statistics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from probprune.importance import (
    block_influence_scores,
    channel_wanda_scores,
    collect_input_stats,
    flap_scores,
    magnitude_scores,
    rank_channels,
    taylor_scores,
    wanda_sp_scores,
)
from probprune.mask_space import CHANNEL, HEAD, LAYER
from probprune.models import get_adapter, tiny_model

torch.set_num_threads(1)

# tiny models: 2 layers, hidden 64, 8 query heads of dim 8 over 4 KV groups (group size 2), MLP 96
HIDDEN, GROUPS, GROUP_COLS, INTER = 64, 4, 16, 96


def blocks_for(n: int = 3, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def entry(mean: np.ndarray, var: np.ndarray, count: int = 4) -> dict:
    """Fake column statistics with the given per-column mean and population variance."""
    return {"sum": count * mean, "sumsq": count * (var + mean**2), "count": count}


def fake_stats(o_var, o_mean, d_var, d_mean, layers: int = 2) -> dict:
    return {
        "o_proj": [entry(np.asarray(o_mean, float), np.asarray(o_var, float)) for _ in range(layers)],
        "down_proj": [entry(np.asarray(d_mean, float), np.asarray(d_var, float)) for _ in range(layers)],
        "cos": np.zeros(layers),
        "tokens": 4,
    }


def set_weights(model, o=0.5, down=0.25) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            w = torch.full_like(layer.self_attn.o_proj.weight, o)
            w[1::2] *= -1  # signs must not matter: |W|
            layer.self_attn.o_proj.weight.copy_(w)
            layer.mlp.down_proj.weight.fill_(down)


# ------------------------------------------------------------------------------------------------- stats
def test_collect_input_stats_matches_captured_inputs() -> None:
    model = tiny_model("llama")
    adapter = get_adapter(model)
    x = blocks_for(3, 10)
    seen = {}
    h1 = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))
    h2 = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("d", a[0]))
    with torch.no_grad():
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states
    h1.remove(), h2.remove()
    mods = [m for layer in model.model.layers for m in (layer, layer.self_attn.o_proj, layer.mlp.down_proj)]
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods]
    stats = collect_input_stats(adapter, x, batch_size=2)  # two batches: 2 + 1 sequences
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods] == hooks_before  # hooks removed
    o = seen["o"].double().reshape(-1, 64)  # [30, C]
    d = seen["d"].double().reshape(-1, INTER)
    assert stats["o_proj"][1]["count"] == 30 and stats["tokens"] == 30
    np.testing.assert_allclose(stats["o_proj"][1]["sumsq"], (o**2).sum(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats["down_proj"][0]["sum"], d.sum(0).numpy(), rtol=1e-5, atol=1e-6)
    cos0 = torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=-1).mean()  # layer 0: in -> out
    assert stats["cos"][0] == pytest.approx(float(cos0), abs=1e-5)


# -------------------------------------------------------------------------------------------------- wanda
def test_wanda_sp_on_known_weights_and_norms() -> None:
    model = tiny_model("llama")
    set_weights(model, o=0.5, down=0.25)
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True, channel_block=8)
    o_var = np.ones(64)
    o_var[16:32] = 4.0  # ‖X_j‖ = sqrt(4·4) = 4 for KV group 1, 2 elsewhere (count 4, mean 0)
    d_var = (np.arange(INTER) ** 2) / 4.0  # ‖X_c‖ = c
    stats = fake_stats(o_var, np.zeros(64), d_var, np.zeros(INTER))
    s = wanda_sp_scores(adapter, space, stats)
    heads = s[space.unit_type == HEAD]
    # group score = 16 columns · (64 rows · 0.5) · ‖X_j‖
    assert heads.tolist() == pytest.approx([1024.0, 2048.0, 1024.0, 1024.0] * 2)
    blocks = s[space.unit_type == CHANNEL]  # channel score = 64 · 0.25 · c = 16c; block b sums c = 8b .. 8b+7
    want = [16.0 * (64 * b + 28) for b in range(12)]
    assert blocks.tolist() == pytest.approx(want * 2)
    layer = s[space.unit_type == LAYER]
    assert layer.tolist() == pytest.approx([5120.0 + 16.0 * sum(range(INTER))] * 2)


def test_wanda_sp_blocks_follow_channel_perm_and_rank_channels() -> None:
    model = tiny_model("llama")
    adapter = get_adapter(model)
    stats = collect_input_stats(adapter, blocks_for())
    per_channel = channel_wanda_scores(adapter, stats)
    w = model.model.layers[1].mlp.down_proj.weight.detach().double().numpy()
    want = np.abs(w).sum(0) * np.sqrt(stats["down_proj"][1]["sumsq"])  # Σ_i |W[i, c]| · ‖X_c‖
    np.testing.assert_allclose(per_channel[1], want, rtol=1e-12)
    perm = rank_channels(adapter, stats)
    assert [p.shape for p in perm] == [(INTER,), (INTER,)]
    assert sorted(perm[0].tolist()) == list(range(INTER))
    assert np.all(np.diff(per_channel[0][perm[0]]) <= 0)  # descending
    space = adapter.mask_space(heads=False, channel_block=32, channel_perm=perm)
    s = wanda_sp_scores(adapter, space, stats)
    top32 = np.sort(per_channel[1])[::-1][:32].sum()
    assert s[space.num_units // 2] == pytest.approx(top32)  # layer 1, block 0 = its 32 best channels
    assert s[0] > s[1] > s[2]
    assert [p.tolist() for p in rank_channels(adapter, per_channel)] == [p.tolist() for p in perm]
    with pytest.raises(ValueError, match="layer 0: got 3 channel scores"):
        rank_channels(adapter, [np.ones(3), np.ones(INTER)])


# ---------------------------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_magnitude_on_constant_weights(kind: str) -> None:
    model = tiny_model(kind)
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for proj, v in ((a.q_proj, 1.0), (a.k_proj, 2.0), (a.v_proj, 3.0), (a.o_proj, 0.5)):
                proj.weight.fill_(v)
                if proj.bias is not None:
                    proj.bias.fill_(1.0)
            for proj, v in ((m.gate_proj, 1.0), (m.up_proj, 2.0), (m.down_proj, 3.0)):
                proj.weight.fill_(v)
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True, channel_block=8)
    s = magnitude_scores(adapter, space)
    # q: 16 rows·64·1 + k: 8·64·4 + v: 8·64·9 + o: 64·16·0.25 = 7936; qwen2 adds q/k/v biases 16 + 8 + 8 = 32
    head_sq = 7936.0 + (32.0 if kind == "qwen2" else 0.0)
    assert s[space.unit_type == HEAD].tolist() == pytest.approx([np.sqrt(head_sq)] * 8)
    assert s[space.unit_type == CHANNEL].tolist() == pytest.approx([np.sqrt(8 * 64 * (1 + 4 + 9))] * 24)
    layer_sq = sum(float((p.detach().double() ** 2).sum()) for p in model.model.layers[0].parameters())
    assert layer_sq == pytest.approx(4 * head_sq + INTER * 896 + 128)  # + 2 norms of ones
    assert s[space.unit_type == LAYER].tolist() == pytest.approx([np.sqrt(layer_sq)] * 2)


# --------------------------------------------------------------------------------------------------- flap
def test_flap_fluctuation_standardised_per_type() -> None:
    model = tiny_model("llama")
    set_weights(model, o=0.5, down=0.25)
    adapter = get_adapter(model)
    space = adapter.mask_space(channel_block=48)
    o_var = np.full(64, 0.25)
    o_var[48:64] = 1.0
    d_var = np.zeros(INTER)
    d_var[:48] = 2.0
    o_mean, d_mean = np.linspace(-3.0, 3.0, 64), np.linspace(0.0, 5.0, INTER)  # means must not count, only spread
    stats = fake_stats(o_var, o_mean, d_var, d_mean)
    stats["o_proj"][1] = entry(o_mean, np.full(64, 0.5))
    s = flap_scores(adapter, space, stats)
    # heads: Σ_j Var_j · ‖W[:, j]‖² with ‖W[:, j]‖² = 64 · 0.25 = 16 over 16 columns
    raw_heads = np.array([64.0, 64.0, 64.0, 256.0, 128.0, 128.0, 128.0, 128.0])
    want_heads = (raw_heads - raw_heads.mean()) / raw_heads.std()
    np.testing.assert_allclose(s[space.unit_type == HEAD], want_heads, rtol=1e-9)
    # channel blocks: 48 channels · 2.0 · (64 · 0.0625) = 384, or 0; the same in both layers
    raw_ch = np.array([384.0, 0.0, 384.0, 0.0])
    np.testing.assert_allclose(s[space.unit_type == CHANNEL], (raw_ch - raw_ch.mean()) / raw_ch.std(), rtol=1e-9)
    assert s[space.unit_type == CHANNEL].tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0])


# ------------------------------------------------------------------------------------------ block influence
def test_block_influence_identity_layer_is_least_important() -> None:
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True)
    stats = collect_input_stats(adapter, blocks_for())
    s = block_influence_scores(space, stats)
    lay = s[space.unit_type == LAYER]
    assert lay[1] == pytest.approx(0.0, abs=1e-6)  # output == input: cos = 1
    assert lay[0] > 0.05 and lay[2] > 0.05
    assert np.all(np.isinf(s[space.unit_type != LAYER]))


# ------------------------------------------------------------------------------------------------- taylor
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_taylor_equals_manual_autograd_and_leaves_model_untouched(kind: str) -> None:
    model = tiny_model(kind)
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed requires_grad state must come back as it was
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True, channel_block=8)
    x = blocks_for(3, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    s = taylor_scores(adapter, space, x, batch_size=2)  # 2 batches: the gradient of the mean over all 3 blocks

    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(input_ids=x, labels=x).loss.backward()  # mean next-token CE over all tokens
    a, m = ref.model.layers[1].self_attn, ref.model.layers[1].mlp

    def wg(p, rows=None, cols=None):
        t = (p.detach().double() * p.grad.double()).abs()
        t = t[rows] if rows is not None else t
        return float((t[:, cols] if cols is not None else t).sum())

    g = 2  # KV group 2 of layer 1: query rows 32..47, k/v rows 16..23, o_proj columns 32..47
    want = wg(a.q_proj.weight, rows=slice(32, 48)) + wg(a.k_proj.weight, rows=slice(16, 24))
    want += wg(a.v_proj.weight, rows=slice(16, 24)) + wg(a.o_proj.weight, cols=slice(32, 48))
    if kind == "qwen2":
        want += wg(a.q_proj.bias, rows=slice(32, 48)) + wg(a.k_proj.bias, rows=slice(16, 24))
        want += wg(a.v_proj.bias, rows=slice(16, 24))
    head_units = np.flatnonzero(space.unit_type == HEAD)
    assert s[head_units[GROUPS + g]] == pytest.approx(want, rel=1e-4)
    want_block = wg(m.gate_proj.weight, rows=slice(8, 16)) + wg(m.up_proj.weight, rows=slice(8, 16))
    want_block += wg(m.down_proj.weight, cols=slice(8, 16))
    assert s[np.flatnonzero(space.unit_type == CHANNEL)[12 + 1]] == pytest.approx(want_block, rel=1e-4)
    want_layer = sum(wg(p) for p in ref.model.layers[0].parameters())
    assert s[np.flatnonzero(space.unit_type == LAYER)[0]] == pytest.approx(want_layer, rel=1e-4)
    assert want > 0 and want_block > 0

    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n
    assert flags["model.embed_tokens.weight"] is False and flags["lm_head.weight"] is True
