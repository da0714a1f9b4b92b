"""Baseline masks: budgets met exactly, the selection rule of each method, FLAP bias compensation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probprune.baselines import (
    BASELINES,
    USES_GRADIENTS,
    baseline_mask,
    flap_bias_compensation,
    shortgpt_mask,
    sleb_mask,
    uniform_per_layer_mask,
)
from probprune.compaction import compact, save_pruned
from probprune.errors import UserError
from probprune.importance import collect_input_stats, flap_scores, magnitude_scores, wanda_sp_scores
from probprune.mask_space import CHANNEL, HEAD, LAYER, LayerShape, MaskSpace
from probprune.models import get_adapter, tiny_model
from probprune.models.loading import load_pruned
from probprune.reconstruct import Reconstruction

torch.set_num_threads(1)

BLOCKS = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request):
    model = tiny_model(request.param, num_hidden_layers=3)
    return model, get_adapter(model)


def per_layer_counts(space: MaskSpace, mask: np.ndarray, t: int) -> list[int]:
    return [int(mask[(space.unit_type == t) & (space.unit_layer == li)].sum()) for li in range(space.num_layers)]


# -------------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("method", [m for m in BASELINES if m not in ("shortgpt", "sleb")])
def test_per_type_budget_is_exact_binary_and_deterministic(setup, method: str) -> None:
    model, adapter = setup
    space = adapter.mask_space(channel_block=8)  # 3 layers x (4 groups, 12 blocks)
    mask = baseline_mask(method, adapter, space, BLOCKS, sparsity=0.4)
    assert mask.shape == (space.num_units,) and set(np.unique(mask)) <= {0.0, 1.0}
    assert int(mask[space.unit_type == HEAD].sum()) == 7  # round(0.6 * 12) = 7.2 -> 7
    assert int(mask[space.unit_type == CHANNEL].sum()) == 22  # round(0.6 * 36) = 21.6 -> 22
    np.testing.assert_array_equal(baseline_mask(method, adapter, space, BLOCKS, sparsity=0.4), mask)
    if method != "flap" and method != "random":  # uniform per layer: counts differ by at most one
        for t, total in ((HEAD, 7), (CHANNEL, 22)):
            counts = per_layer_counts(space, mask, t)
            assert sum(counts) == total and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("method", BASELINES)
def test_params_budget_met_within_one_unit(setup, method: str) -> None:
    model, adapter = setup
    space = adapter.mask_space(layers=True, channel_block=8)
    mask = baseline_mask(method, adapter, space, BLOCKS, sparsity=0.3, budget="params")
    assert set(np.unique(mask)) <= {0.0, 1.0}
    limit = 0.7 * space.prunable_params
    kept = space.kept_params(mask)
    assert kept <= limit
    assert kept > limit - space.cost[mask == 0].max()  # the last removed unit crossed the limit
    np.testing.assert_array_equal(baseline_mask(method, adapter, space, BLOCKS, 0.3, budget="params"), mask)


def test_random_depends_only_on_the_seed(setup) -> None:
    model, adapter = setup
    space = adapter.mask_space(channel_block=4)
    a = baseline_mask("random", adapter, space, None, 0.5, seed=1)
    np.testing.assert_array_equal(baseline_mask("random", adapter, space, None, 0.5, seed=1), a)
    b = baseline_mask("random", adapter, space, None, 0.5, seed=2)
    assert not np.array_equal(a, b)
    assert a[space.unit_type == CHANNEL].sum() == b[space.unit_type == CHANNEL].sum() == 36


def test_gradient_baselines_are_declared() -> None:
    assert USES_GRADIENTS == {"taylor"} and USES_GRADIENTS <= set(BASELINES)


def test_bad_arguments_raise_user_errors(setup) -> None:
    model, adapter = setup
    space = adapter.mask_space()
    with pytest.raises(UserError, match="unknown baseline 'sparsegpt'.*magnitude, wanda-sp, flap, random, shortgpt"):
        baseline_mask("sparsegpt", adapter, space, BLOCKS, 0.5)
    for method in ("shortgpt", "sleb"):
        with pytest.raises(UserError, match=f"the {method} baseline removes whole layers.*set mask.layers=true"):
            baseline_mask(method, adapter, adapter.mask_space(channels=False), BLOCKS, 0.5)
    with pytest.raises(UserError, match=r"sparsity must be a number in \[0, 1\], got 1.5"):
        baseline_mask("magnitude", adapter, space, BLOCKS, 1.5)
    with pytest.raises(UserError, match="budget must be one of"):
        baseline_mask("magnitude", adapter, space, BLOCKS, 0.5, budget="flops")
    for method in ("wanda-sp", "sleb"):
        with pytest.raises(UserError, match=f"baseline '{method}' needs calibration blocks"):
            baseline_mask(method, adapter, space, None, 0.5)


# ------------------------------------------------------------------------------------------- selection rules
def test_uniform_per_layer_largest_remainder_by_next_best_score() -> None:
    shape = LayerShape(num_kv_heads=4, group_size=1, head_dim=2, hidden_size=4, intermediate_size=2)
    space = MaskSpace(layers=[shape] * 3, include_channels=False, total_params=1000)
    scores = np.array(
        [
            9,
            8,
            1,
            0,  # layer 0: third best 1
            5,
            4,
            3,
            2,  # layer 1: third best 3
            7,
            6,
            2.5,
            9.5,
        ],
        dtype=float,
    )  # layer 2: third best 6 <- gets the extra unit
    mask = uniform_per_layer_mask(space, scores, sparsity=0.4)  # keep round(0.6 * 12) = 7 = 2 + 2 + 2 + 1
    assert mask.tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1]  # layer 2 keeps 9.5, 7, 6
    mask = uniform_per_layer_mask(space, scores, sparsity=0.0)
    assert mask.sum() == 12
    assert uniform_per_layer_mask(space, scores, sparsity=1.0).sum() == 0
    mask = uniform_per_layer_mask(space, scores, sparsity=0.25)  # keep 9 = 3 + 3 + 3
    assert per_layer_counts(space, mask, HEAD) == [3, 3, 3]


def test_uniform_per_layer_unequal_layers_in_proportion() -> None:
    small = LayerShape(num_kv_heads=2, group_size=1, head_dim=2, hidden_size=4, intermediate_size=2)
    big = LayerShape(num_kv_heads=6, group_size=1, head_dim=2, hidden_size=4, intermediate_size=2)
    space = MaskSpace(layers=[small, big], include_channels=False, total_params=1000)
    mask = uniform_per_layer_mask(space, np.arange(8.0), sparsity=0.5)  # keep 4 = 1 + 3
    assert per_layer_counts(space, mask, HEAD) == [1, 3]
    assert mask.tolist() == [0, 1, 0, 0, 0, 1, 1, 1]


def test_wanda_and_magnitude_keep_each_layers_top_units(setup) -> None:
    model, adapter = setup
    space = adapter.mask_space(channel_block=8)
    stats = collect_input_stats(adapter, BLOCKS)
    for method, scores in (
        ("wanda-sp", wanda_sp_scores(adapter, space, stats)),
        ("magnitude", magnitude_scores(adapter, space)),
    ):
        mask = baseline_mask(method, adapter, space, BLOCKS, sparsity=0.5)
        for t in (HEAD, CHANNEL):
            for li in range(3):
                sel = np.flatnonzero((space.unit_type == t) & (space.unit_layer == li))
                kept, dropped = scores[sel][mask[sel] == 1], scores[sel][mask[sel] == 0]
                assert kept.size in (sel.size // 2, sel.size // 2 + 1)
                assert kept.min() >= dropped.max(), (method, t, li)


def test_flap_selects_global_top_standardised_scores(setup) -> None:
    model, adapter = setup
    space = adapter.mask_space(channel_block=4)
    scores = flap_scores(adapter, space, collect_input_stats(adapter, BLOCKS))
    mask = baseline_mask("flap", adapter, space, BLOCKS, sparsity=0.5)
    for t, n_keep in ((HEAD, 6), (CHANNEL, 36)):
        sel = np.flatnonzero(space.unit_type == t)
        top = sel[np.argsort(-scores[sel], kind="stable")[:n_keep]]
        assert sorted(np.flatnonzero(mask[sel])) == sorted(top - sel[0])


def test_shortgpt_removes_lowest_influence_layers_first() -> None:
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # layer 2 becomes the identity: influence 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True)
    mask = baseline_mask("shortgpt", adapter, space, BLOCKS, sparsity=0.2)  # one layer (25 %) is enough
    assert mask[space.unit_type == LAYER].tolist() == [1, 1, 0, 1]
    assert mask[space.unit_type != LAYER].min() == 1.0
    influence = np.full(space.num_units, np.inf)
    influence[space.unit_type == LAYER] = [0.3, 0.1, 0.4, 0.2]
    assert shortgpt_mask(space, influence, 0.5)[space.unit_type == LAYER].tolist() == [1, 0, 1, 0]
    assert shortgpt_mask(space, influence, 0.51)[space.unit_type == LAYER].tolist() == [0, 0, 1, 0]
    assert shortgpt_mask(space, influence, 0.0).min() == 1.0


def test_shortgpt_without_layer_units_drops_the_same_layers_with_the_same_function() -> None:
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    with_layers = adapter.mask_space(layers=True)
    thin = adapter.mask_space()  # heads and channels only: a layer is dropped by switching all its units off
    a = baseline_mask("shortgpt", adapter, with_layers, BLOCKS, sparsity=0.5, budget="params")
    b = baseline_mask("shortgpt", adapter, thin, BLOCKS, sparsity=0.5)
    dropped = sorted(with_layers.unit_layer[(with_layers.unit_type == LAYER) & (a == 0)].tolist())
    assert len(dropped) == 2
    for li in range(4):
        units = b[thin.unit_layer == li]
        assert units.min() == units.max() == (0.0 if li in dropped else 1.0)
    assert thin.sparsity(b)["prunable"] == 0.5  # two whole layers of four: exactly half of every unit type
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    la = compact(model, with_layers, a)(x).logits
    lb = compact(model, thin, b)(x).logits
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-5)


def _brute_force_losses(model, space: MaskSpace, mask: np.ndarray, blocks: torch.Tensor) -> dict[int, float]:
    """Mean next-token cross-entropy of the compacted model without each kept layer, from stock HF logits."""
    out = {}
    torch.set_grad_enabled(False)
    for li in range(space.num_layers):
        units = (space.unit_type == LAYER) & (space.unit_layer == li)
        if mask[units].min() == 0:
            continue
        trial = mask.copy()
        trial[units] = 0.0
        logits = compact(model, space, trial)(blocks).logits.float()  # [n, T, V]
        out[li] = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()))
    torch.set_grad_enabled(True)
    return out


def test_sleb_removes_the_layer_a_brute_force_perplexity_check_names_and_meets_the_budget() -> None:
    model = tiny_model("llama", num_hidden_layers=5)
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True)
    blocks = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(3))
    first = _brute_force_losses(model, space, space.full_mask(), blocks)
    assert min(first, key=first.get) == 0
    one = sleb_mask(adapter, space, blocks, sparsity=0.2, batch_size=4)  # one layer of five meets 20 %
    assert mask_layers(space, one) == [0, 1, 1, 1, 1]
    second = _brute_force_losses(model, space, one, blocks)  # greedy step two, from the model without layer 0
    assert min(second, key=second.get) == 2
    two = baseline_mask("sleb", adapter, space, blocks, sparsity=0.4, budget="params")
    assert mask_layers(space, two) == [0, 1, 0, 1, 1]
    assert space.kept_params(two) <= 0.6 * space.prunable_params < space.kept_params(one)
    assert two[space.unit_type != LAYER].min() == 1.0
    # without layer units the same layers go, by switching all their heads and channels off
    thin = adapter.mask_space()
    m = sleb_mask(adapter, thin, blocks, sparsity=0.4)
    assert [int(m[thin.unit_layer == li].max()) for li in range(5)] == [0, 1, 0, 1, 1]
    assert thin.sparsity(m)["prunable"] == 0.4


def mask_layers(space: MaskSpace, mask: np.ndarray) -> list[int]:
    return mask[space.unit_type == LAYER].astype(int).tolist()


# ------------------------------------------------------------------------------------- bias compensation
def test_flap_bias_compensation_keeps_removed_columns_mean(tmp_path) -> None:
    model = tiny_model("llama")
    adapter = get_adapter(model)
    space = adapter.mask_space(channel_block=8)
    stats = collect_input_stats(adapter, BLOCKS)
    mask = baseline_mask("flap", adapter, space, BLOCKS, sparsity=0.5)
    comp = flap_bias_compensation(adapter, space, mask, stats)
    e = space.expand(mask)
    removed_cols = {li: np.flatnonzero(np.repeat(e["heads"][li, :4].numpy(), 16) < 0.5) for li in range(2)}
    removed_ch = {li: np.flatnonzero(e["channels"][li].numpy() < 0.5) for li in range(2)}
    for li in range(2):  # hand computation: Σ_j W[:, j] · mean(X_j) over the removed columns
        w = model.model.layers[li].mlp.down_proj.weight.detach().double().numpy()
        mean = stats["down_proj"][li]["sum"] / stats["down_proj"][li]["count"]
        want = sum(w[:, c] * mean[c] for c in removed_ch[li])
        np.testing.assert_allclose(comp[li]["down_proj"].numpy(), want, rtol=1e-5, atol=1e-6)
        assert comp[li]["o_proj"].shape == (64,)

    # reference: the dense model with the removed inputs of o_proj / down_proj replaced by their calibration means
    hooks = []
    for li, layer in enumerate(model.model.layers):
        for mod, key, cols in (
            (layer.self_attn.o_proj, "o_proj", removed_cols[li]),
            (layer.mlp.down_proj, "down_proj", removed_ch[li]),
        ):
            mean = torch.tensor(stats[key][li]["sum"] / stats[key][li]["count"], dtype=torch.float32)

            def pre(m, args, cols=torch.as_tensor(cols), mean=mean):
                x = args[0].clone()
                x[..., cols] = mean[cols]
                return (x,)

            hooks.append(mod.register_forward_pre_hook(pre))
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=x).logits
    for h in hooks:
        h.remove()

    small = compact(model, space, mask, override=Reconstruction(biases=comp).override())  # the biases, added
    with torch.no_grad():
        got = small(input_ids=x).logits
        plain = compact(model, space, mask)(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the compensation made a difference
    # the added biases are recorded in the layout: saved and reloaded (probprune's loader, no folder code), and
    # compacting the compensated model again keeps them
    assert all(e.get("o_bias") and e.get("down_bias") for e in small.config.probprune_layout)
    save_pruned(small, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "m")(input_ids=x).logits, got, rtol=0, atol=0)
        space2 = get_adapter(small).mask_space()
        again = compact(small, space2, space2.full_mask())
        torch.testing.assert_close(again(input_ids=x).logits, got, rtol=0, atol=0)
    assert all(e.get("o_bias") and e.get("down_bias") for e in again.config.probprune_layout)
