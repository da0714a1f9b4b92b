"""The policy: estimator numbers, baselines, sampling, update, resume, init probabilities, schedules."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from probprune.errors import ConfigError, UserError
from probprune.mask_space import CHANNEL, HEAD, LAYER, LayerShape, MaskSpace
from probprune.policy import Policy, cosine_lr, lr_at, random_probs, scores_to_probs, uniform_probs
from probprune.projection import expected_sparsity

torch.set_num_threads(1)

SHAPE = LayerShape(num_kv_heads=2, group_size=2, head_dim=4, hidden_size=8, intermediate_size=6, norm_params=16)


def make_space(include_layers: bool = False, **kw) -> MaskSpace:
    return MaskSpace(layers=[SHAPE] * 3, total_params=10_000, channel_block=2, include_layers=include_layers, **kw)


def make_policy(space: MaskSpace, probs: np.ndarray | None = None, **kw) -> Policy:
    settings = dict(lr=0.1, total_steps=10, sparsity=0.5)
    settings.update(kw)
    return Policy(space, uniform_probs(space, 0.5) if probs is None else probs, **settings)


# ------------------------------------------------------------------------------------- hand-computed estimator
# 15 units (6 heads, 9 channel blocks). s = 0.5 everywhere except s_1 = 0.2, s_2 = 0.9. Only units 0..3 vary in the
# masks below; units 3..14 are always kept. Scores, ignoring the 1e-7 (tolerances cover it):
#   sqrt:  s=0.5: m=1 -> +1, m=0 -> -1;  s=0.2: m=1 -> 0.8/0.4 = 2,  m=0 -> -0.5;   s=0.9: m=1 -> 1/3,   m=0 -> -3
#   exact: s=0.5: m=1 -> +2, m=0 -> -2;  s=0.2: m=1 -> 0.8/0.16 = 5, m=0 -> -1.25;  s=0.9: m=1 -> 10/9,  m=0 -> -10
PROBS = np.full(15, 0.5)
PROBS[1], PROBS[2] = 0.2, 0.9
MASKS_A = [[1, 0, 1], [0, 1, 1]]  # K = 2, units 0..2
MASKS_B = [[1, 0, 1], [1, 1, 0], [0, 1, 1]]  # K = 3, units 0..2


def masks(rows: list[list[int]]) -> torch.Tensor:
    m = torch.ones(len(rows), 15)
    m[:, :3] = torch.tensor(rows, dtype=torch.float32)
    return m


def close(got: torch.Tensor, want: list[float]) -> None:
    np.testing.assert_allclose(got.numpy()[: len(want)], want, rtol=5e-6, atol=1e-12)


@pytest.mark.parametrize("baseline", ["ema", "loo"])
def test_estimator_k2_by_hand(baseline: str) -> None:
    # losses [2, 3]. ema: δ = first mean 2.5, L − δ = [-0.5, 0.5], divide by K − 1 = 1.
    #                loo: b = [3, 2], L − b = [-1, 1], divide by K = 2.  Both give the same numbers for K = 2.
    # sqrt:  u0 = -0.5·1 + 0.5·(-1) = -1;  u1 = -0.5·(-0.5) + 0.5·2 = 1.25;  u2 = 0 (same mask twice);  u3 = 0
    # exact: u0 = -0.5·2 + 0.5·(-2) = -2;  u1 = -0.5·(-1.25) + 0.5·5 = 3.125;  u2 = 0;  u3 = 0
    space = make_space()
    g = make_policy(space, PROBS, baseline=baseline, score_scaling="sqrt").gradient(masks(MASKS_A), [2.0, 3.0])
    close(g, [-1.0, 1.25, 0.0, 0.0])
    g = make_policy(space, PROBS, baseline=baseline, score_scaling="exact").gradient(masks(MASKS_A), [2.0, 3.0])
    close(g, [-2.0, 3.125, 0.0, 0.0])


def test_estimator_loo_k3_by_hand() -> None:
    # losses [1, 2, 4]: b = [6/2, 5/2, 3/2] = [3, 2.5, 1.5], L − b = [-2, -0.5, 2.5], divide by K = 3.
    # sqrt:  u0 (m = 1,1,0): (-2 - 0.5 - 2.5)/3 = -5/3
    #        u1 (m = 0,1,1): (-2·(-0.5) - 0.5·2 + 2.5·2)/3 = 5/3
    #        u2 (m = 1,0,1): (-2/3 - 0.5·(-3) + 2.5/3)/3 = 5/9
    #        u3 (always 1):  Σ (L − b) = 0
    # exact: u0: (-4 - 1 - 5)/3 = -10/3;  u1: (2.5 - 2.5 + 12.5)/3 = 25/6;  u2: (-20/9 + 5 + 25/9)/3 = 50/27
    space = make_space()
    g = make_policy(space, PROBS, baseline="loo", score_scaling="sqrt").gradient(masks(MASKS_B), [1.0, 2.0, 4.0])
    close(g, [-5 / 3, 5 / 3, 5 / 9, 0.0])
    g = make_policy(space, PROBS, baseline="loo", score_scaling="exact").gradient(masks(MASKS_B), [1.0, 2.0, 4.0])
    close(g, [-10 / 3, 25 / 6, 50 / 27, 0.0])


def test_estimator_ema_sequence_over_three_steps() -> None:
    # window 5, λ = 0.2. Probabilities fixed (gradient() does not update s).
    # step 1: K=2, losses [2, 3]: δ := 2.5 (first mean), g as in the K=2 test; δ <- 0.8·2.5 + 0.2·2.5 = 2.5
    # step 2: K=3, losses [1, 2, 4]: L − δ = [-1.5, -0.5, 1.5], divide by 2
    #   sqrt:  u0 = (-1.5 - 0.5 - 1.5)/2 = -1.75;  u1 = (0.75 - 1 + 3)/2 = 1.375;  u2 = (-0.5 + 1.5 + 0.5)/2 = 0.75
    #          u3 = (-1.5 - 0.5 + 1.5)/2 = -0.25
    #   exact: u0 = -3.5;  u1 = (1.875 - 2.5 + 7.5)/2 = 3.4375;  u2 = (-15/9 + 5 + 15/9)/2 = 2.5;  u3 = -0.5
    #   δ <- 0.8·2.5 + 0.2·(7/3) = 37/15
    # step 3: K=3, losses [3, 1, 2]: L − δ = [8/15, -22/15, -7/15], divide by 2
    #   sqrt:  u0 = (8 - 22 + 7)/15/2 = -7/30;  u1 = (-4 - 44 - 14)/15/2 = -31/15;  u2 = (8/3 + 66 - 7/3)/15/2 = 199/90
    #          u3 = (8 - 22 - 7)/15/2 = -0.7
    #   δ <- 0.8·37/15 + 0.2·2 = 2.37333…
    space = make_space()
    p = make_policy(space, PROBS, baseline="ema", ema_window=5, score_scaling="sqrt")
    close(p.gradient(masks(MASKS_A), [2.0, 3.0]), [-1.0, 1.25, 0.0, 0.0])
    assert p.delta == pytest.approx(2.5, abs=1e-15)
    close(p.gradient(masks(MASKS_B), [1.0, 2.0, 4.0]), [-1.75, 1.375, 0.75, -0.25])
    assert p.delta == pytest.approx(37 / 15, abs=1e-14)
    close(p.gradient(masks(MASKS_B), [3.0, 1.0, 2.0]), [-7 / 30, -31 / 15, 199 / 90, -0.7])
    assert p.delta == pytest.approx(0.8 * 37 / 15 + 0.4, abs=1e-14)

    p = make_policy(space, PROBS, baseline="ema", ema_window=5, score_scaling="exact")
    p.gradient(masks(MASKS_A), [2.0, 3.0])
    close(p.gradient(masks(MASKS_B), [1.0, 2.0, 4.0]), [-3.5, 3.4375, 2.5, -0.5])


# ---------------------------------------------------------------------------------------------- non-finite losses
def test_non_finite_losses_are_dropped_and_counted() -> None:
    space = make_space()
    m = torch.cat([masks(MASKS_A)[:1], masks([[0, 0, 0]]), masks(MASKS_A)[1:], masks([[1, 1, 1]])])  # [4, 15]
    p = make_policy(space, PROBS, baseline="ema")
    close(p.gradient(m, [2.0, float("nan"), 3.0, float("inf")]), [-1.0, 1.25, 0.0, 0.0])  # == the K=2 case
    assert p.last_dropped == 2 and p.total_dropped == 2 and p.delta == 2.5
    # nothing valid: zero gradient, δ unchanged
    g = p.gradient(m[:2], [float("nan"), float("-inf")])
    assert torch.equal(g, torch.zeros(15, dtype=torch.float64))
    assert p.delta == 2.5 and p.total_dropped == 4
    # loo with one valid sample: zero gradient
    q = make_policy(space, PROBS, baseline="loo")
    assert torch.equal(q.gradient(m[:2], [1.0, float("nan")]), torch.zeros(15, dtype=torch.float64))


def test_step_keeps_s_finite_and_reports_stats() -> None:
    space = make_space()
    # sparsity 0.4: PROBS is inside the budget (heads 3.1 <= 3.6, blocks 4.5 <= 5.4), so a zero step leaves s as is
    p = make_policy(space, PROBS, baseline="ema", lr=0.1, total_steps=10, lr_schedule="cosine", sparsity=0.4)
    stats = p.step(masks(MASKS_A), [float("nan"), float("nan")])  # nothing valid yet: δ not initialised
    assert stats["n_dropped"] == 2 and math.isnan(stats["loss_mean"]) and math.isnan(stats["baseline"])
    assert stats["grad_norm"] == 0.0 and not p.delta_initialised
    assert torch.equal(p.probs, torch.as_tensor(PROBS))
    stats = p.step(masks(MASKS_A), [2.0, 3.0])
    assert stats["step"] == 2 and p.step_count == 2 and p.total_dropped == 2 and stats["n_dropped"] == 0
    assert stats["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 1 / 10)))
    assert stats["loss_mean"] == 2.5 and stats["loss_min"] == 2.0 and stats["baseline"] == 2.5
    assert stats["grad_norm"] == pytest.approx(math.hypot(1.0, 1.25), rel=1e-6)
    assert stats["expected_sparsity"] == pytest.approx(expected_sparsity(space, p.probs))
    for _ in range(5):
        before = p.probs.clone()
        stats = p.step(masks(MASKS_B), [1e308, -1e308, float("nan")])  # overflowing gradient: update skipped
        assert stats["skipped"] and torch.equal(p.probs, before) and not math.isfinite(stats["grad_norm"])
    stats = p.step(masks(MASKS_B), [1e308, 1e308, 1.0])  # the mean overflows: skipped, δ stays finite
    assert stats["skipped"] and math.isfinite(p.delta) and torch.isfinite(p.probs).all()
    assert p.total_dropped == 7


def test_step_update_is_projected_gradient_step() -> None:
    space = make_space()
    p = make_policy(space, PROBS, baseline="loo", lr=0.05, lr_schedule="constant", sparsity=0.5)
    before = p.probs.clone()
    g_ref = make_policy(space, PROBS, baseline="loo").gradient(masks(MASKS_B), [1.0, 2.0, 4.0])
    p.step(masks(MASKS_B), [1.0, 2.0, 4.0])
    from probprune.projection import project

    assert torch.equal(p.probs, project(space, before - 0.05 * g_ref, 0.5, "per_type"))
    for t in (HEAD, CHANNEL):
        sl = space.type_slice(t)
        assert float(p.probs[sl].sum()) <= 0.5 * (sl.stop - sl.start) + 1e-12


# ------------------------------------------------------------------------------------------- unbiasedness / toy
def toy_loss(m: torch.Tensor, w: torch.Tensor, gen: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """loss(m) = Σ_u w_u m_u + N(0, noise²), ``[K]``."""
    return m.double() @ w + noise * torch.randn(m.shape[0], generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("scaling", ["sqrt", "exact"])
def test_loo_gradient_is_unbiased(scaling: str) -> None:
    space = make_space()
    n = space.num_units
    probs = np.linspace(0.2, 0.8, n)
    w = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    p = make_policy(space, probs, baseline="loo", score_scaling=scaling, seed=3)
    gen = torch.Generator().manual_seed(7)
    grads = torch.stack([p.gradient(m, toy_loss(m, w, gen)) for m in (p.sample(8) for _ in range(3000))])  # [R, N]
    var = torch.as_tensor(probs * (1 - probs))
    # E[(m − s)·L] = w·s(1−s)  ->  E[g] = w·s(1−s)/√(s(1−s)+ε)  (sqrt)  or  w·s(1−s)/(s(1−s)+ε)  (exact)
    true = w * var / ((var + 1e-7).sqrt() if scaling == "sqrt" else (var + 1e-7))
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    assert ((mean - true).abs() <= 4 * se + 1e-3).all(), (mean - true) / se
    # and the test has power: a wrong scaling would be far outside the band
    wrong = w * var / (var + 1e-7) if scaling == "sqrt" else w * var / (var + 1e-7).sqrt()
    assert ((mean - wrong).abs() > 4 * se).sum() >= n // 2


def test_loo_search_finds_the_known_optimum() -> None:
    space = make_space()  # 6 heads, 9 channel blocks; sparsity 2/3 keeps 2 heads and 3 blocks
    n = space.num_units
    rng = np.random.default_rng(0)
    # every unit lowers the loss (w < 0), so the budget binds; the best mask keeps the most negative w per type
    heads = rng.permutation([-1.0, -0.9, -0.3, -0.25, -0.2, -0.15])
    blocks = rng.permutation([-1.0, -0.95, -0.9, -0.3, -0.25, -0.2, -0.15, -0.1, -0.05])
    w = torch.as_tensor(np.concatenate([heads, blocks]))
    p = make_policy(space, uniform_probs(space, 1 / 3), lr=0.1, total_steps=300, sparsity=2 / 3, baseline="loo")
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        m = p.sample(8)
        p.step(m, toy_loss(m, w, gen))
    want = np.zeros(n, dtype=np.float32)
    for t, keep in ((HEAD, 2), (CHANNEL, 3)):
        idx = np.flatnonzero(space.unit_type == t)
        want[idx[np.argsort(w.numpy()[idx])[:keep]]] = 1.0  # smallest w per type
    assert np.array_equal(p.final_mask(), want)
    assert p.probs[want == 1].min() > 0.8 and p.probs[want == 0].max() < 0.2  # converged, not just ranked


# ------------------------------------------------------------------------------------------------------ sampling
def test_antithetic_pairs_and_marginals() -> None:
    space = make_space()
    probs = np.linspace(0.05, 0.95, space.num_units)
    p = make_policy(space, probs, sampling="antithetic", seed=5)
    m = p.sample(4000)  # [4000, N]
    assert m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
    pair_sum = m[0::2] + m[1::2]  # [2000, N]
    low, high = probs < 0.5, probs > 0.5
    # u < s and 1 − u < s cannot both hold when s <= 0.5, and one of them must when s >= 0.5
    assert (pair_sum[:, low] <= 1).all() and (pair_sum[:, high] >= 1).all()
    # P(pair sum == 1) = 2s for s <= 0.5 and 2(1 − s) above
    frac_one = (pair_sum == 1).double().mean(0).numpy()
    np.testing.assert_allclose(frac_one, 2 * np.minimum(probs, 1 - probs), atol=0.04)
    np.testing.assert_allclose(m.double().mean(0).numpy(), probs, atol=0.03)
    assert p.sample(3).shape == (3, space.num_units)


def test_independent_sampling_is_seeded_and_has_right_marginals() -> None:
    space = make_space()
    probs = np.linspace(0.05, 0.95, space.num_units)
    a, b = make_policy(space, probs, seed=11), make_policy(space, probs, seed=11)
    ma, mb = a.sample(4000), b.sample(4000)
    assert torch.equal(ma, mb)
    assert not torch.equal(ma, make_policy(space, probs, seed=12).sample(4000))
    np.testing.assert_allclose(ma.double().mean(0).numpy(), probs, atol=0.03)
    # independent rows are not antithetic: some pairs at s < 0.5 are both 1
    assert ((ma[0::2] + ma[1::2])[:, probs < 0.3] == 2).any()
    with pytest.raises(ValueError, match="k must be >= 1"):
        a.sample(0)


# -------------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("baseline", ["ema", "loo"])
def test_state_dict_round_trip_is_bit_exact(baseline: str) -> None:
    space = make_space(include_layers=True)
    w = torch.linspace(0.1, 1.0, space.num_units, dtype=torch.float64)

    def loss(m: torch.Tensor) -> torch.Tensor:  # deterministic in the masks, with a non-finite sample now and then
        out = m.double() @ w + 0.1 * torch.sin(7.0 * (m.double() @ w.flip(0)))
        out[0] = float("nan") if int(m[0].sum()) % 5 == 0 else out[0]
        return out

    settings = dict(baseline=baseline, lr=0.2, total_steps=10, sampling="antithetic", budget="params", seed=4)
    ref = make_policy(space, **settings)
    for i in range(10):
        m = ref.sample(4)
        ref.step(m, loss(m))
        if i == 4:
            buf = io.BytesIO()
            torch.save(ref.state_dict(), buf)
    first = make_policy(space, **settings)
    buf.seek(0)
    first.load_state_dict(torch.load(buf, weights_only=True))
    assert first.step_count == 5
    for _ in range(5):
        m = first.sample(4)
        first.step(m, loss(m))
    assert torch.equal(first.probs, ref.probs)
    assert first.delta == ref.delta and first.total_dropped == ref.total_dropped and first.step_count == 10
    assert torch.equal(first.sample(4), ref.sample(4))
    assert not torch.equal(ref.probs, torch.as_tensor(uniform_probs(space, 0.5)))  # the run moved s

    with pytest.raises(UserError, match="units"):
        make_policy(make_space()).load_state_dict(ref.state_dict())


# ------------------------------------------------------------------------------------------------- init / config
def test_scores_to_probs_known_values_and_invariances() -> None:
    space = make_space(include_channels=False)  # 3 layers × 2 heads
    # per layer z: [1, 3] -> [-1, 1]; [5, 5] -> [0, 0] (zero variance); [0, 10] -> [-1, 1]
    probs = scores_to_probs(space, np.array([1.0, 3.0, 5.0, 5.0, 0.0, 10.0]), 0.5)
    lo, hi = 1 / (1 + math.e), 1 / (1 + math.exp(-1))  # sigmoid(-1), sigmoid(1); mean of all six is 0.5
    np.testing.assert_allclose(probs, [lo, hi, 0.5, 0.5, lo, hi], atol=1e-12)
    shifted = scores_to_probs(space, np.array([1.0, 3.0, 5.0, 5.0, 0.0, 10.0]), 0.6)  # every unit + 0.1
    np.testing.assert_allclose(shifted, [lo + 0.1, hi + 0.1, 0.6, 0.6, lo + 0.1, hi + 0.1], atol=1e-12)


def test_scores_to_probs_mean_per_type_and_order() -> None:
    space = make_space(include_layers=True)
    rng = np.random.default_rng(0)
    scores = rng.lognormal(size=space.num_units)
    probs = scores_to_probs(space, scores, 0.4)
    assert 0 < probs.min() and probs.max() < 1  # no clamping at this ratio
    for t in (HEAD, CHANNEL, LAYER):
        sel = space.unit_type == t
        assert probs[sel].mean() == pytest.approx(0.4, abs=1e-12)
        for li in range(space.num_layers):
            lsel = sel & (space.unit_layer == li) if t != LAYER else sel
            assert np.array_equal(np.argsort(probs[lsel]), np.argsort(scores[lsel]))
    # z-scored per layer: scaling one layer's channel scores changes nothing
    scaled = scores.copy()
    scaled[(space.unit_type == CHANNEL) & (space.unit_layer == 1)] *= 1000.0
    np.testing.assert_allclose(scores_to_probs(space, scaled, 0.4), probs, atol=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        scores_to_probs(space, np.full(space.num_units, np.nan), 0.4)


def test_uniform_and_random_probs() -> None:
    space = make_space(include_layers=True)
    np.testing.assert_array_equal(uniform_probs(space, 0.3), np.full(space.num_units, 0.3))
    a = random_probs(space, 0.5, torch.Generator().manual_seed(0))
    b = random_probs(space, 0.5, torch.Generator().manual_seed(0))
    assert np.array_equal(a, b) and 0 <= a.min() and a.max() <= 1 and np.unique(a).size > space.num_units // 2
    c = random_probs(space, 0.5, np.random.default_rng(0))
    for probs in (a, c):
        for t in (HEAD, CHANNEL, LAYER):
            sel = space.unit_type == t
            if 0 < probs[sel].min() and probs[sel].max() < 1:
                assert probs[sel].mean() == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(UserError, match="keep_ratio"):
        uniform_probs(space, 1.2)


def test_lr_schedules() -> None:
    assert cosine_lr(0.02, 0, 100) == pytest.approx(0.02)
    assert cosine_lr(0.02, 50, 100) == pytest.approx(0.01)
    assert cosine_lr(0.02, 25, 100) == pytest.approx(0.01 * (1 + math.sqrt(0.5)))
    assert cosine_lr(0.02, 100, 100) == pytest.approx(0.0, abs=1e-18)
    assert cosine_lr(0.02, 150, 100) == pytest.approx(0.0, abs=1e-18)
    assert lr_at("constant", 0.02, 70, 100) == 0.02
    assert lr_at("cosine", 0.02, 50, 100) == pytest.approx(0.01)
    with pytest.raises(UserError, match="lr_schedule"):
        lr_at("linear", 0.02, 0, 100)


def test_policy_settings_are_validated_together() -> None:
    space = make_space()
    with pytest.raises(ConfigError) as err:
        Policy(space, uniform_probs(space, 0.5), lr=-1.0, total_steps=0, sparsity=0.5, baseline="mean", sampling="qmc")
    assert len(err.value.errors) == 4
    assert "baseline must be one of 'ema', 'loo', got 'mean'" in str(err.value)
    with pytest.raises(ValueError, match="probs must have shape"):
        Policy(space, np.ones(3), lr=0.1, total_steps=10, sparsity=0.5)


def test_settings_errors_are_listed_in_a_fixed_order() -> None:
    # the shared base validates; Policy's "sampling" choice is listed before "budget"
    space = make_space()
    bad = dict(
        lr=float("nan"),
        total_steps=1.5,
        sparsity=2,
        ema_window=0,
        lr_schedule="x",
        baseline="y",
        score_scaling="z",
        budget="v",
    )
    with pytest.raises(ConfigError) as err:
        Policy(space, uniform_probs(space, 0.5), sampling="w", **bad)
    assert [e.split(" ")[0] for e in err.value.errors] == [
        "lr",
        "total_steps",
        "sparsity",
        "ema_window",
        "lr_schedule",
        "baseline",
        "score_scaling",
        "sampling",
        "budget",
    ]
    assert err.value.errors[-2] == "sampling must be one of 'independent', 'antithetic', got 'w'"
