"""Allocation search: sampling structure, estimator numbers, budgets, a toy objective with a known optimum, resume."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from probprune.allocation import AllocationPolicy
from probprune.baselines import uniform_per_layer_mask
from probprune.data import CalibrationData
from probprune.engine.local import LocalEngine
from probprune.errors import ConfigError, UserError
from probprune.mask_space import CHANNEL, HEAD, LAYER, LayerShape, MaskSpace
from probprune.models import get_adapter, tiny_model
from probprune.policy import Policy, uniform_probs
from probprune.projection import expected_sparsity
from probprune.search import run_search

# 3 layers x (2 head groups, 10 channel blocks of 4); head group = 128 params, channel block = 96 params
SHAPE = LayerShape(num_kv_heads=2, group_size=1, head_dim=4, hidden_size=8, intermediate_size=40)
SCORES = np.random.default_rng(0).random(3 * (2 + 10 + 1))  # enough for every space below


def make_space(**kw) -> MaskSpace:
    return MaskSpace([SHAPE] * 3, channel_block=4, total_params=10_000, **kw)


def make_policy(space: MaskSpace | None = None, **kw) -> AllocationPolicy:
    space = space or make_space()
    settings = dict(lr=0.1, total_steps=200, sparsity=0.5, baseline="loo")
    settings.update(kw)
    return AllocationPolicy(space, SCORES[: space.num_units], **settings)


def assert_top_k(policy: AllocationPolicy, masks: torch.Tensor | np.ndarray) -> None:
    """Every group of every mask keeps exactly its best-scored units (a prefix in score order)."""
    m = np.atleast_2d(np.asarray(masks))
    for g in range(policy.num_groups):
        units = np.flatnonzero(policy.unit_group == g)
        best_first = units[np.argsort(-SCORES[units], kind="stable")]
        for row in m:
            k = int(row[units].sum())
            assert row[best_first[:k]].all() and not row[best_first[k:]].any()


# ------------------------------------------------------------------------------------------------- structure
def test_groups_follow_the_space():
    p = make_policy()
    assert p.num_groups == 6 and p.probs.dtype == torch.float64
    np.testing.assert_array_equal(p.group_type, [HEAD] * 3 + [CHANNEL] * 3)
    np.testing.assert_array_equal(p.group_layer, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(p.group_size, [2, 2, 2, 10, 10, 10])
    np.testing.assert_array_equal(p.group_cost, [256] * 3 + [960] * 3)
    assert p.group_names()[3] == "layer 0 channel"
    torch.testing.assert_close(p.probs, torch.full((6,), 0.5, dtype=torch.float64), rtol=0, atol=0)


def test_samples_are_top_k_per_group_and_counts_are_binomial():
    p = make_policy()
    p.probs = torch.tensor([0.5, 0.0, 1.0, 0.3, 0.8, 0.55], dtype=torch.float64)
    masks = p.sample(4000)  # [4000, 36]
    assert masks.shape == (4000, 36) and masks.dtype == torch.float32
    assert_top_k(p, masks[:200])
    counts = p.counts(masks)  # [4000, 6]
    n, a = torch.as_tensor(p.group_size, dtype=torch.float64), p.probs
    se = (n * a * (1 - a) / 4000).sqrt()
    assert ((counts.mean(0) - n * a).abs() <= 4 * se + 1e-12).all()
    var = counts.var(0)
    assert ((var - n * a * (1 - a)).abs() <= 0.15 * n * a * (1 - a) + 1e-12).all()
    assert torch.equal(counts[:, 1], torch.zeros(4000)) and torch.equal(counts[:, 2], torch.full((4000,), 2.0))


def test_unit_probs_are_binomial_tails():
    p = make_policy()
    p.probs = torch.tensor([0.5, 0.0, 1.0, 0.3, 0.8, 0.55], dtype=torch.float64)
    up = p.unit_probs()  # [N]
    # a group's marginals sum to E[k] = n·a; the best unit of a head group with a = 0.5 is kept w.p. 1 − 0.5²
    sums = torch.zeros(6, dtype=torch.float64).index_add_(0, torch.as_tensor(p.unit_group), up)
    torch.testing.assert_close(sums, torch.as_tensor(p.group_size, dtype=torch.float64) * p.probs)
    best0 = int(np.flatnonzero((p.unit_group == 0) & (p.unit_rank == 0))[0])
    assert float(up[best0]) == pytest.approx(0.75)
    mc = p.sample(4000).mean(0).double()
    assert float((mc - up).abs().max()) < 0.04


# ------------------------------------------------------------------------------------ hand-computed estimator
def test_gradient_matches_hand_computation():
    # 2 samples, per-group counts chosen by hand; a = 0.5 for heads (n = 2), 0.5 for channels (n = 10)
    p = make_policy(baseline="loo")
    counts = torch.tensor([[2, 1, 0, 5, 7, 3], [0, 1, 2, 5, 2, 9]], dtype=torch.float64)
    masks = p._masks_from_counts(counts)
    losses = torch.tensor([3.0, 1.0])
    # loo: b_1 = 1, b_2 = 3 -> (L − b) = (+2, −2); sqrt score = (k − n a)/sqrt(n a (1 − a))
    n = torch.tensor([2, 2, 2, 10, 10, 10], dtype=torch.float64)
    z = (counts - n * 0.5) / (n * 0.25 + 1e-7).sqrt()
    want = (2 * z[0] - 2 * z[1]) / 2
    torch.testing.assert_close(p.gradient(masks, losses), want)
    # exact score: (k − n a)/(a (1 − a)); ema: δ = first mean (2), divisor K − 1 = 1
    q = make_policy(baseline="ema", score_scaling="exact")
    e = (counts - n * 0.5) / (0.25 + 1e-7)
    torch.testing.assert_close(q.gradient(masks, losses), (1.0 * e[0] - 1.0 * e[1]) / 1)
    assert q.delta == pytest.approx(2.0)


def test_exact_score_is_unbiased():
    # E[(k − n a)/(a(1 − a)) · L(k)] = d E[L] / da; L = k² on one group: E[k²] = n a (1 − a) + n² a², derivative
    # n (1 − 2a) + 2 n² a. A single channel group (n = 10) at a = 0.3: 10·0.4 + 2·100·0.3 = 64.
    space = MaskSpace([SHAPE], channel_block=4, include_heads=False)
    p = AllocationPolicy(space, np.arange(10.0), lr=0.1, total_steps=10, sparsity=0.0, score_scaling="exact", seed=1)
    p.probs = torch.tensor([0.3], dtype=torch.float64)
    masks = p.sample(200_000)
    k = p.counts(masks)[:, 0]
    est = float(((k**2) * p.scores(masks)[:, 0]).mean())
    assert est == pytest.approx(64.0, rel=0.03)


# ------------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_per_type_final_mask_meets_exact_counts(sparsity):
    p = make_policy(sparsity=sparsity)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        p.probs = p._project(0.5 + torch.rand(6, generator=gen, dtype=torch.float64))  # projection active
        n_a = torch.as_tensor(p.group_size, dtype=torch.float64) * p.probs
        for t, n_t in ((HEAD, 6), (CHANNEL, 30)):
            assert float(n_a[torch.as_tensor(p.group_type == t)].sum()) == pytest.approx((1 - sparsity) * n_t)
        mask = p.final_mask()
        keep = 1 - sparsity
        assert int(mask[p.space.type_slice(HEAD)].sum()) == int(np.floor(keep * 6 + 0.5))
        assert int(mask[p.space.type_slice(CHANNEL)].sum()) == int(np.floor(keep * 30 + 0.5))
        assert_top_k(p, mask)
        # largest-remainder rounding of quotas that sum to the budget: every count is floor or ceil of n·a
        k = p.counts(mask)
        assert ((k >= n_a.floor()) & (k <= n_a.ceil())).all()


def test_params_final_mask_within_one_unit():
    space = make_space(include_layers=True)
    p = make_policy(space, budget="params", sparsity=0.6)
    gen = torch.Generator().manual_seed(4)
    limit = 0.4 * space.prunable_params
    for _ in range(5):
        p.probs = p._project(torch.rand(p.num_groups, generator=gen, dtype=torch.float64))
        assert p.expected_kept_params() <= limit * (1 + 1e-9)  # nested: a layer's fraction gates its contents
        mask = p.final_mask()
        kept = space.kept_params(mask)
        assert limit - space.cost.max() < kept <= limit
        assert_top_k(p, mask)


def test_uniform_init_gives_the_wanda_sp_uniform_per_layer_mask():
    model = tiny_model("llama")
    space = get_adapter(model).mask_space(channel_block=4)  # 2 layers x (4 groups, 24 blocks): ρ·n is whole
    scores = np.random.default_rng(5).standard_normal(space.num_units)
    p = AllocationPolicy(space, scores, lr=0.1, total_steps=10, sparsity=0.5)
    np.testing.assert_array_equal(p.final_mask(), uniform_per_layer_mask(space, scores, 0.5))


def test_init_from_unit_probs_takes_group_means():
    space = make_space()
    probs = np.r_[[0.2, 0.4, 0.5, 0.5, 0.8, 0.6], np.full(10, 0.3), np.full(10, 0.5), np.full(10, 0.7)]
    p = make_policy(space, probs=probs)
    torch.testing.assert_close(p.probs, torch.tensor([0.3, 0.5, 0.7, 0.3, 0.5, 0.7], dtype=torch.float64))


def test_bad_settings_are_listed_together():
    with pytest.raises(ConfigError) as err:
        make_policy(lr=-1, baseline="mean", budget="flops", score_scaling="log")
    assert len(err.value.errors) == 4
    with pytest.raises(ValueError, match="scores must have shape"):
        AllocationPolicy(make_space(), np.zeros(3), lr=0.1, total_steps=10, sparsity=0.5)


# ------------------------------------------------------------------------------------------- toy objective
W = np.array([12.0, 1.0, 4.0]) / 100  # layer 0 matters most, layer 1 least; E[L]-optimal n·a ≈ (9.03, 0, 5.97)


def toy_loss(policy: AllocationPolicy, masks: torch.Tensor) -> torch.Tensor:
    """L = Σ_l w_l·(10 − k_l)² over the channel-block counts; heads do not matter."""
    k = policy.counts(masks)[:, torch.as_tensor(policy.group_type == CHANNEL)].numpy()  # [K, 3]
    return torch.as_tensor(((10 - k) ** 2 * W).sum(-1))


def run_toy(policy: AllocationPolicy, steps: int = 200) -> None:
    for _ in range(steps):
        masks = policy.sample(4)
        policy.step(masks, toy_loss(policy, masks))


@pytest.mark.parametrize("seed,score_scaling,lr", [(0, "sqrt", 0.1), (1, "sqrt", 0.1), (2, "exact", 0.02)])
def test_toy_objective_per_type_finds_the_best_allocation(seed, score_scaling, lr):
    feasible = [k for k in itertools.product(range(11), repeat=3) if sum(k) == 15]  # ρ = 0.5 of 30 blocks
    best = min(feasible, key=lambda k: float(((10 - np.array(k)) ** 2 * W).sum()))
    assert best == (9, 0, 6)
    p = make_policy(seed=seed, score_scaling=score_scaling, lr=lr)
    run_toy(p)
    # the learned quotas n·a sit at the constrained optimum of E[L] (≈ 9.05, 0, 5.95), for either scaling
    quotas = (torch.as_tensor(p.group_size) * p.probs)[3:]
    torch.testing.assert_close(quotas, torch.tensor([9.05, 0.0, 5.95], dtype=torch.float64), rtol=0, atol=0.3)
    k = p.counts(p.final_mask()).numpy()
    assert tuple(k[3:].astype(int)) == best
    assert int(k[:3].sum()) == 3  # heads: still exactly half


def test_toy_objective_params_moves_budget_from_heads_to_channels():
    space = make_space()
    limit = 0.5 * space.prunable_params  # 1824 = 19 channel blocks when no head is kept
    feasible = [k for k in itertools.product(range(11), repeat=3) if 96 * sum(k) <= limit]
    best_loss = min(float(((10 - np.array(k)) ** 2 * W).sum()) for k in feasible)
    start = float(((10 - np.array([5, 5, 5])) ** 2 * W).sum())
    p = make_policy(space, budget="params", seed=0)
    run_toy(p)
    mask = p.final_mask()
    k = p.counts(mask).numpy()
    assert k[:3].sum() <= 1  # the heads are given up for channels
    final_loss = float(((10 - k[3:]) ** 2 * W).sum())
    assert final_loss <= best_loss + 0.2 < start
    assert space.kept_params(mask) <= limit


# ------------------------------------------------------------------------------------------------- resume
def test_state_dict_round_trip_continues_bit_identically():
    a = make_policy(seed=7, baseline="ema")
    run_toy(a, 5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = make_policy(seed=123, baseline="ema")
    b.load_state_dict(state)
    assert b.step_count == 5 and b.delta == a.delta
    for _ in range(5):
        ma, mb = a.sample(3), b.sample(3)
        assert torch.equal(ma, mb)
        sa, sb = a.step(ma, toy_loss(a, ma)), b.step(mb, toy_loss(b, mb))
        assert sa == sb
    assert torch.equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.final_mask(), b.final_mask())


def test_load_refuses_unit_policy_and_other_space_states():
    space = make_space()
    unit_state = Policy(space, uniform_probs(space, 0.5), lr=0.1, total_steps=5, sparsity=0.5).state_dict()
    with pytest.raises(UserError, match="not an allocation search"):
        make_policy(space).load_state_dict(unit_state)
    other = make_policy(MaskSpace([SHAPE] * 2, channel_block=4, total_params=10_000))
    with pytest.raises(UserError, match="another model or mask space"):
        make_policy(space).load_state_dict(other.state_dict())


def test_step_stats_have_the_unit_policy_keys_and_skip_non_finite():
    space = make_space()
    unit = Policy(space, uniform_probs(space, 0.5), lr=0.1, total_steps=5, sparsity=0.5)
    m = unit.sample(2)
    want_keys = set(unit.step(m, torch.tensor([1.0, 2.0])))
    p = make_policy(space)
    assert expected_sparsity(space, p.unit_probs()) == pytest.approx(0.5)  # a = ρ: exactly the budget
    masks = p.sample(3)
    stats = p.step(masks, torch.tensor([1.0, float("nan"), 2.0]))
    assert set(stats) == want_keys and stats["n_dropped"] == 1 and p.total_dropped == 1
    assert stats["expected_sparsity"] >= 0.5 - 1e-9  # per-type budgets are "at most ρ·N_t kept"
    before = p.probs.clone()
    stats = p.step(p.sample(2), torch.tensor([1e308, -1e308], dtype=torch.float64))
    assert stats["skipped"] and torch.equal(p.probs, before)


def test_run_search_drives_the_allocation_policy_and_resumes(tmp_path):
    model = tiny_model()
    space = get_adapter(model).mask_space(channel_block=8)
    data = CalibrationData(torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0)), seed=0)
    scores = np.random.default_rng(1).random(space.num_units)

    def run(out, **kw):
        p = AllocationPolicy(space, scores, lr=0.1, total_steps=6, sparsity=0.5, seed=2)
        ev = LocalEngine(model, space, fast_path=False)
        return run_search(
            p,
            ev,
            data,
            steps=6,
            num_samples=2,
            batch_size=2,
            checkpoint_dir=out,
            checkpoint_every=2,
            progress=False,
            fingerprint="fp",
            **kw,
        )

    full = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=3)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.resumed_from_step == 3
    assert torch.equal(resumed.policy.probs, full.policy.probs)
    np.testing.assert_array_equal(resumed.final_mask, full.final_mask)
    assert int(full.final_mask[space.type_slice(HEAD)].sum()) == 4
    assert int(full.final_mask[space.type_slice(CHANNEL)].sum()) == 12
    assert not (space.unit_type == LAYER).any()


def test_metric_projection_is_weighted_projection_at_unit_metric_and_meets_kkt():
    from probprune.allocation import _project_metric
    from probprune.projection import project_weighted

    gen = torch.Generator().manual_seed(8)
    y = torch.rand(12, generator=gen, dtype=torch.float64) * 1.4
    c = torch.randint(1, 5, (12,), generator=gen).double()
    budget = 0.5 * float(c.sum())
    torch.testing.assert_close(
        _project_metric(y, torch.ones(12, dtype=torch.float64), c, budget), project_weighted(y, c, budget)
    )
    d = torch.rand(12, generator=gen, dtype=torch.float64) + 0.1
    x = _project_metric(y, d, c, budget)
    assert float((c * x).sum()) == pytest.approx(budget)
    inner = (x > 1e-9) & (x < 1 - 1e-9)
    v = (y - x)[inner] / (d * c)[inner]  # one shared multiplier v for every group not at a bound
    assert float(v.max() - v.min()) < 1e-9 and float(v.min()) > 0


def test_prune_pipeline_runs_the_allocation_search_with_aligned_widths(tmp_path):
    import json
    from pathlib import Path

    from probprune.config import apply_overrides, load_config
    from probprune.pipeline import prune
    from probprune.widths import channel_widths

    smoke = Path(__file__).parents[1] / "configs" / "tiny" / "smoke.yaml"
    cfg = apply_overrides(
        load_config(smoke),
        [
            "search.method=allocation",
            "search.steps=3",
            "mask.channel_block=4",
            "mask.block_order=metric",
            "mask.align=16",
            "eval.seq_lens=[32]",
            "eval.max_tokens=256",
        ],
    )
    summary = prune(cfg, tmp_path / "run", progress=False)
    masks = torch.load(tmp_path / "run" / "masks.pt", weights_only=False)
    final, init = masks["final_mask"].numpy(), masks["init_mask"].numpy()
    assert masks["probs"].shape == masks["final_mask"].shape  # unit marginals, not the [G] allocation
    model = tiny_model()
    space = get_adapter(model).mask_space(channel_block=4)
    for m in (final, init):
        widths = channel_widths(space, m)
        assert all(w % 16 == 0 for w in widths) and 96 - 16 < sum(widths) <= 96
    assert summary["units"]["kept"]["head"] == 4
    state = torch.load(tmp_path / "run" / "search_checkpoint.pt", weights_only=False)["policy"]
    assert state["kind"] == "allocation" and state["probs"].shape == (4,)  # 2 layers x (heads, channels)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["search"]["steps"] == 3


def test_allocation_and_unit_policy_share_the_score_function_base():
    from probprune.policy import ScoreFunctionPolicy

    space = make_space()
    unit = Policy(space, uniform_probs(space, 0.5), lr=0.1, total_steps=200, sparsity=0.5, baseline="loo")
    alloc = make_policy(space)  # loo as well
    assert isinstance(unit, ScoreFunctionPolicy) and isinstance(alloc, ScoreFunctionPolicy)
    for name in ("gradient", "step", "load_state_dict"):
        assert getattr(AllocationPolicy, name) is getattr(Policy, name) is getattr(ScoreFunctionPolicy, name)
    # the same losses give the same loss and baseline stats whatever the parameterisation
    losses = torch.tensor([1.0, float("nan"), 4.0, 2.0])
    su, sa = unit.step(unit.sample(4), losses), alloc.step(alloc.sample(4), losses)
    for key in ("step", "lr", "loss_mean", "loss_min", "baseline", "n_dropped"):
        assert su[key] == sa[key]
    assert unit.total_dropped == alloc.total_dropped == 1
    with pytest.raises(ConfigError) as err:
        make_policy(
            space,
            lr=float("nan"),
            total_steps=0,
            sparsity=2,
            ema_window=0,
            lr_schedule="x",
            baseline="y",
            score_scaling="z",
            budget="v",
        )
    assert [e.split(" ")[0] for e in err.value.errors] == [
        "lr",
        "total_steps",
        "sparsity",
        "ema_window",
        "lr_schedule",
        "baseline",
        "score_scaling",
        "budget",
    ]
