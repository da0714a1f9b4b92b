"""Projections onto the sparsity budget, the deterministic final mask, expected sparsity."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from probprune import projection
from probprune.errors import UserError
from probprune.mask_space import CHANNEL, HEAD, LAYER, LayerShape, MaskSpace
from probprune.projection import (
    _final_mask_params,
    expected_kept_params,
    expected_sparsity,
    final_mask,
    project,
    project_keep_ratio,
    project_weighted,
)

torch.set_num_threads(1)

SHAPE = LayerShape(num_kv_heads=2, group_size=2, head_dim=4, hidden_size=8, intermediate_size=6, norm_params=16)
HEAD_COST, BLOCK_COST, LAYER_COST = 192, 48, 544  # (2+2)*4*8 + 2*4*8; 2 * 3*8; 2*192 + 6*24 + 16


def make_space(include_layers: bool = False, **kw) -> MaskSpace:
    return MaskSpace(layers=[SHAPE] * 3, total_params=10_000, channel_block=2, include_layers=include_layers, **kw)


def test_space_costs_are_what_the_tests_assume() -> None:
    space = make_space(include_layers=True)
    assert space.type_counts() == {"head": 6, "channel": 9, "layer": 3}
    assert space.cost.tolist() == [HEAD_COST] * 6 + [BLOCK_COST] * 9 + [LAYER_COST] * 3
    assert space.prunable_params == 3 * LAYER_COST
    assert make_space().prunable_params == 3 * (2 * HEAD_COST + 3 * BLOCK_COST)


# ------------------------------------------------------------------------------------------- keep-ratio projection
def grid_projection(x: np.ndarray, c: np.ndarray, budget: float, n: int = 200_001) -> tuple[np.ndarray, float]:
    """Brute force: the smallest v on a fine grid with Σ c·clamp(x − v·c) ≤ budget. Returns (y, grid step)."""
    vs = np.linspace(0.0, (x[c > 0] / c[c > 0]).max(), n)
    ys = np.clip(x[None, :] - vs[:, None] * c[None, :], 0.0, 1.0)  # [n, N]
    ok = np.flatnonzero((ys * c).sum(1) <= budget)
    return ys[ok[0]], float(vs[1] - vs[0])


def check_euclidean(x: np.ndarray, y: np.ndarray, c: np.ndarray, budget: float, rng: np.random.Generator) -> None:
    """Projection optimality: (x − y)·(z − y) ≤ 0 for every feasible z (sampled), and ‖x − y‖ ≤ ‖x − z‖."""
    for _ in range(200):
        z = rng.random(x.size)
        total = (c * z).sum()
        if total > budget:
            z *= budget / total * rng.random()
        assert (c * z).sum() <= budget + 1e-9
        assert float((x - y) @ (z - y)) <= 1e-9
        assert np.linalg.norm(x - y) <= np.linalg.norm(x - z) + 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep_ratio", [0.1, 0.3, 0.5, 0.8])
def test_keep_ratio_projection_meets_budget_and_is_euclidean(seed: int, keep_ratio: float) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.3, 1.3, size=40)
    if np.clip(x, 0, 1).sum() <= keep_ratio * x.size:
        x = x + 0.5  # make sure the budget binds
    y = project_keep_ratio(torch.as_tensor(x), keep_ratio).numpy()
    target = keep_ratio * x.size
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert target - 1e-6 <= y.sum() <= target + 1e-12
    y_grid, dv = grid_projection(x, np.ones_like(x), target)
    assert np.abs(y - y_grid).max() <= dv + 1e-12
    check_euclidean(x, y, np.ones_like(x), target, rng)


def test_keep_ratio_projection_only_clamps_when_inside() -> None:
    x = torch.tensor([-0.5, 0.2, 1.7, 0.1, 0.0], dtype=torch.float64)  # clamped sum 1.3 <= 0.4 * 5 = 2
    assert torch.equal(project_keep_ratio(x, 0.4), torch.tensor([0.0, 0.2, 1.0, 0.1, 0.0], dtype=torch.float64))
    # a known binding case: Σ clamp(x − v) = 1 at v = 0.3 -> [0.6, 0.4, 0]
    y = project_keep_ratio(torch.tensor([0.9, 0.7, 0.1], dtype=torch.float64), 1 / 3)
    torch.testing.assert_close(y, torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    # dtype is kept
    assert project_keep_ratio(torch.tensor([0.9, 0.7, 0.1]), 1 / 3).dtype == torch.float32
    with pytest.raises(ValueError, match="keep_ratio"):
        project_keep_ratio(x, 1.5)


# ---------------------------------------------------------------------------------------------- weighted projection
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_weighted_projection_meets_budget_and_is_euclidean(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.2, 1.2, size=30)
    c = rng.integers(1, 1000, size=30).astype(np.float64)
    budget = 0.4 * c.sum()
    y = project_weighted(torch.as_tensor(x), torch.as_tensor(c), budget).numpy()
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert budget * (1 - 1e-9) <= (c * y).sum() <= budget * (1 + 1e-12)
    # KKT form: y = clamp(x − v·c) with one v >= 0 shared by all units in the open interval (0, 1)
    free = (y > 1e-9) & (y < 1 - 1e-9)
    v = (x[free] - y[free]) / c[free]
    assert v.min() >= 0 and np.ptp(v) <= 1e-9 * v.mean()
    y_grid, dv = grid_projection(x, c, budget)
    assert np.abs(y - y_grid).max() <= dv * c.max() + 1e-12
    check_euclidean(x, y, c, budget, rng)


def test_weighted_projection_inside_and_errors() -> None:
    x = torch.tensor([0.5, -0.1, 1.2], dtype=torch.float64)
    c = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    # clamp gives [0.5, 0, 1] -> 5 + 30 = 35 <= 40: only clamp
    assert torch.equal(project_weighted(x, c, 40.0), torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    # budget 20 with x=[1,1], c=[1,3]: clamp(1 − v, 0, 1) + 3·clamp(1 − 3v, 0, 1) = 2 -> 4 − 10v = 2, v = 0.2
    y = project_weighted(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 3.0]), 2.0)
    torch.testing.assert_close(y, torch.tensor([0.8, 0.4], dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        project_weighted(x, c, -1.0)
    with pytest.raises(ValueError, match="non-negative"):
        project_weighted(x, -c, 1.0)


# -------------------------------------------------------------------------------------------------------- project()
def test_project_per_type_and_params() -> None:
    space = make_space(include_layers=True)
    rng = np.random.default_rng(0)
    s = torch.as_tensor(rng.uniform(0.3, 1.0, size=space.num_units))
    y = project(space, s, 0.5, "per_type")
    for t in (HEAD, CHANNEL, LAYER):
        sl = space.type_slice(t)
        n = sl.stop - sl.start
        assert 0.5 * n - 1e-6 <= float(y[sl].sum()) <= 0.5 * n + 1e-12
        torch.testing.assert_close(y[sl], project_keep_ratio(s[sl], 0.5), atol=0, rtol=0)
    # with layer units the params budget holds the expected kept parameters, nesting counted once
    y = project(space, s, 0.6, "params")
    budget = 0.4 * space.prunable_params
    assert budget * (1 - 1e-9) <= expected_kept_params(space, y) <= budget * (1 + 1e-12)
    flat = make_space(include_layers=False)  # without them it is the linear budget Σ c·s over the units
    s_flat = torch.as_tensor(rng.uniform(0.3, 1.0, size=flat.num_units))
    cost = torch.as_tensor(flat.cost, dtype=torch.float64)
    y = project(flat, s_flat, 0.6, "params")
    budget = 0.4 * float(cost.sum())
    assert budget * (1 - 1e-9) <= float((cost * y).sum()) <= budget * (1 + 1e-12)
    with pytest.raises(UserError, match="budget must be one of"):
        project(space, s, 0.5, "flops")
    with pytest.raises(UserError, match="sparsity must be"):
        project(space, s, 1.5, "per_type")


# ------------------------------------------------------------------------------------------------------- final mask
def test_final_mask_per_type_exact_counts_top_units_and_ties() -> None:
    space = make_space(include_layers=True)
    rng = np.random.default_rng(0)
    s = rng.random(space.num_units)
    for sparsity, counts in ((0.5, (3, 5, 2)), (0.3, (4, 6, 2)), (0.0, (6, 9, 3)), (1.0, (0, 0, 0))):
        mask = final_mask(space, s, sparsity, "per_type")
        assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        for t, want in zip((HEAD, CHANNEL, LAYER), counts):
            sel = space.unit_type == t
            assert int(mask[sel].sum()) == want
            if 0 < want < sel.sum():
                assert s[sel][mask[sel] == 1].min() > s[sel][mask[sel] == 0].max()
    # ties: lower index wins
    mask = final_mask(space, np.full(space.num_units, 0.5), 0.5, "per_type")
    assert mask[space.type_slice(HEAD)].tolist() == [1, 1, 1, 0, 0, 0]
    assert mask[space.type_slice(CHANNEL)].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]
    # deterministic, input untouched
    s_copy = s.copy()
    assert np.array_equal(final_mask(space, s, 0.5, "per_type"), final_mask(space, s, 0.5, "per_type"))
    assert np.array_equal(s, s_copy)


@pytest.mark.parametrize("include_layers", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_final_mask_params_meets_budget_within_one_unit(include_layers: bool, seed: int) -> None:
    space = make_space(include_layers=include_layers)
    s = np.random.default_rng(seed).random(space.num_units)
    for sparsity in (0.2, 0.5, 0.7):
        mask, kept = _final_mask_params(space, s, 1 - sparsity)
        assert kept == space.kept_params(mask)  # incremental accounting == the mask space's own count
        assert np.array_equal(mask, final_mask(space, s, sparsity, "params"))
        budget = (1 - sparsity) * space.prunable_params
        assert kept <= budget
        # the last removal crossed the budget: undoing it would exceed the budget
        removed = np.flatnonzero(mask == 0)
        last = removed[np.argmax(s[removed])]
        undo = mask.copy()
        undo[last] = 1
        assert space.kept_params(undo) > budget
        # removal follows ascending s: every removed unit has s <= every still-counted unit not inside a dropped layer
        gone_layers = set(space.unit_layer[(space.unit_type == LAYER) & (mask == 0)].tolist())
        counted = (mask == 1) & ~np.isin(space.unit_layer, list(gone_layers))
        if counted.any():
            assert s[removed].max() <= s[counted].min()


def test_final_mask_params_uniform_costs_cheapest_unit_bound() -> None:
    space = make_space(include_channels=False)  # 6 heads of 192 params each; channels always kept
    s = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    mask = final_mask(space, s, 0.3, "params")
    budget = 0.7 * space.prunable_params  # 0.7 * (1152 + 432) = 1108.8
    kept = space.kept_params(mask)
    assert kept <= budget < kept + HEAD_COST
    # 1584 − 192 = 1392, − 192 = 1200 (> 1108.8), − 192 = 1008 (<= 1108.8): drop s = 0.1, 0.2, 0.3
    assert mask.tolist() == [1, 0, 1, 0, 1, 0]
    assert kept == 1584 - 3 * HEAD_COST


def test_final_mask_params_nested_layer_not_double_counted() -> None:
    space = make_space(include_layers=True)
    s = np.full(space.num_units, 0.9)
    head0, head1 = 0, 1  # both heads of layer 0
    layer0 = space.num_units - 3
    s[[head0, head1]] = [0.01, 0.02]
    s[layer0] = 0.03
    s[6] = 0.04  # channel block 0 of layer 0: already gone with the layer, must be skipped
    s[9] = 0.05  # channel block 0 of layer 1
    budget_kept = 3 * LAYER_COST - LAYER_COST - BLOCK_COST  # 1040: remove layer 0 (all 544) and one block of layer 1
    sparsity = 1 - budget_kept / space.prunable_params
    mask, kept = _final_mask_params(space, s, 1 - sparsity)
    assert kept == space.kept_params(mask) == budget_kept
    assert mask[[head0, head1, layer0]].tolist() == [0, 0, 0]
    assert mask[6] == 1 and mask[9] == 0  # unit 6 skipped (inside a dropped layer), unit 9 removed
    assert int((mask == 0).sum()) == 4


def test_final_mask_params_is_fast_on_a_50k_unit_space() -> None:
    shape = LayerShape(num_kv_heads=3, group_size=3, head_dim=64, hidden_size=576, intermediate_size=1536)
    space = MaskSpace(layers=[shape] * 30, include_layers=True, channel_block=1)
    assert space.num_units > 46_000
    s = np.random.default_rng(0).random(space.num_units)
    t0 = time.perf_counter()
    mask, kept = _final_mask_params(space, s, 0.5)
    assert time.perf_counter() - t0 < 3.0
    assert kept == space.kept_params(mask)
    assert kept <= 0.5 * space.prunable_params


# --------------------------------------------------------------------------------------------- expected sparsity
@pytest.mark.parametrize("include_layers", [False, True])
def test_expected_sparsity_matches_exact_sparsity_on_binary_masks(include_layers: bool) -> None:
    space = make_space(include_layers=include_layers)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random(space.num_units) < 0.6).astype(np.float32)
        assert expected_kept_params(space, mask) == pytest.approx(space.kept_params(mask), abs=1e-9)
        assert expected_sparsity(space, mask) == pytest.approx(space.sparsity(mask)["prunable"], abs=1e-12)


def test_expected_sparsity_values() -> None:
    space = make_space()
    s = np.full(space.num_units, 0.25)
    assert expected_kept_params(space, s) == pytest.approx(0.25 * 1584)
    assert expected_sparsity(space, s) == pytest.approx(0.75)
    # with layer units, a layer at 0.5 halves the expectation of everything inside it (norms included)
    space = make_space(include_layers=True)
    s = np.ones(space.num_units)
    s[space.type_slice(LAYER)] = [0.5, 1.0, 1.0]
    assert expected_kept_params(space, s) == pytest.approx(2.5 * LAYER_COST)
    s[0] = 0.0  # one head of layer 0 off as well
    assert expected_kept_params(space, s) == pytest.approx(2 * LAYER_COST + 0.5 * (LAYER_COST - HEAD_COST))


# ------------------------------------------------------------------------------ nested budget (layer units)
@pytest.mark.parametrize("policy_kind", ["units", "allocation"])
def test_params_budget_with_layer_units_counts_nesting_once(policy_kind) -> None:
    from probprune.allocation import AllocationPolicy
    from probprune.models import get_adapter, tiny_model
    from probprune.policy import Policy, uniform_probs

    adapter = get_adapter(tiny_model("llama", num_hidden_layers=4))
    space = adapter.mask_space(layers=True, channel_block=8)
    budget = 0.5 * space.prunable_params
    if policy_kind == "units":
        start = projection.project(space, torch.as_tensor(uniform_probs(space, 0.5)), 0.5, "params", fill=True)
        assert projection.expected_kept_params(space, uniform_probs(space, 0.5)) < 0.3 * space.prunable_params
        policy = Policy(space, start, lr=0.1, total_steps=10, sparsity=0.5, budget="params")
        expected = projection.expected_kept_params(space, policy.probs)
    else:
        scores = np.random.default_rng(0).random(space.num_units)
        policy = AllocationPolicy(space, scores, lr=0.1, total_steps=10, sparsity=0.5, budget="params")
        expected = policy.expected_kept_params()
        # the unit marginals give the same expectation as the groups' fractions
        assert projection.expected_kept_params(space, policy.unit_probs()) == pytest.approx(expected, rel=1e-9)
    # the projection holds the expected kept parameters at the budget: not 25 % kept (layer cost counted on top)
    assert expected == pytest.approx(budget, rel=1e-6)
    masks = policy.sample(3000).numpy()  # [K, N]
    kept = np.array([space.kept_params(m) for m in masks])
    assert kept.mean() == pytest.approx(expected, rel=0.02)  # what sampled masks keep is what the budget counts
    final = policy.final_mask()
    assert space.kept_params(final) <= budget + space.cost.max()
    assert space.kept_params(final) >= budget - space.cost.max()


def test_nested_projection_is_the_weighted_projection_without_layer_entries() -> None:
    from probprune.mask_space import CHANNEL

    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.random(12) * 1.4 - 0.2)
    types = np.array([HEAD] * 4 + [CHANNEL] * 8)
    layers = np.array([0, 0, 1, 1] + [0] * 4 + [1] * 4)
    cost = rng.integers(1, 9, 12).astype(np.float64)
    got = projection.project_nested(x, types, layers, cost, np.zeros(2), 0.4 * cost.sum())
    want = projection.project_weighted(x, torch.as_tensor(cost), 0.4 * cost.sum())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
