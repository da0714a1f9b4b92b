"""Warm starts, the check-set guard, the KL objective and thin-or-drop masks (probprune.warmstart, fastpath, pipeline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probprune.allocation import AllocationPolicy
from probprune.baselines import baseline_mask
from probprune.compaction import compact, save_pruned
from probprune.config import apply_overrides, load_config
from probprune.engine.local import LocalEngine
from probprune.errors import ConfigError
from probprune.importance import collect_input_stats, wanda_sp_scores
from probprune.mask_space import CHANNEL, HEAD
from probprune.masked_forward import masked_logits
from probprune.models import get_adapter, tiny_model
from probprune.models.loading import load_pruned
from probprune.policy import Policy
from probprune.warmstart import candidate_masks, check_losses, choose_final, choose_start

ROOT = Path(__file__).resolve().parents[1]

SMOKE = ROOT / "configs" / "tiny" / "smoke.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    space = adapter.mask_space(channel_block=8)  # 4 layers x (2 KV groups, 4 blocks of 8 channels)
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    check = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    return model, adapter, space, blocks, check


# ----------------------------------------------------------------------------------------------- KL objective
def test_kl_objective_equals_a_hand_computation_and_is_zero_for_the_all_keep_mask(tiny) -> None:
    model, adapter, space, _, check = tiny
    x = check[:3]  # [B, T]
    rng = np.random.default_rng(0)
    masks = np.stack([space.full_mask(), *(rng.random((2, space.num_units)) < 0.6).astype(np.float32)])
    got = LocalEngine(model, space, objective="kl").losses(masks, x)  # [3]
    with torch.no_grad():
        p_log = F.log_softmax(model(x).logits[:, :-1].double(), dim=-1)  # [B, T-1, V] dense
        want = []
        for m in masks:
            q_log = F.log_softmax(masked_logits(adapter, space, m, x)[:, :-1].double(), dim=-1)
            kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # [B, T-1]
            want.append(float(kl.mean(dim=1).mean()))
    assert got[0] == 0.0  # the all-keep mask runs the teacher's own path: exactly zero
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert (got[1:] > 1e-3).all()
    ce = LocalEngine(model, space, objective="kl").losses(masks, x, objective="ce")  # per-call override
    np.testing.assert_allclose(ce, LocalEngine(model, space).losses(masks, x), rtol=0, atol=0)


def test_unknown_objective_or_scoring_path_is_refused(tiny) -> None:
    model, _, space, _, _ = tiny
    with pytest.raises(ValueError, match="scoring must be one of 'auto', 'gathered', 'batched', got 'fast'"):
        LocalEngine(model, space, scoring="fast")
    with pytest.raises(ValueError, match="objective must be one of 'ce', 'kl', got 'mse'"):
        LocalEngine(model, space, objective="mse")


# ---------------------------------------------------------------------------------------------- warm starts
def test_warm_start_begins_at_the_best_candidate_mask(tiny) -> None:
    model, adapter, space, blocks, check = tiny
    stats = collect_input_stats(adapter, blocks)
    init_mask = baseline_mask("wanda-sp", adapter, space, blocks, 0.5, stats=stats)
    cands = candidate_masks(adapter, space, blocks, stats, 0.5, "per_type", init_mask)
    assert list(cands) == ["init", "shortgpt", "sleb", "wanda-sp", "flap", "magnitude"]
    ev = LocalEngine(model, space)
    warm = choose_start(ev, cands, check, 2, space, mix=0.25, sparsity=0.5, budget="per_type")
    losses = check_losses(ev, np.stack(list(cands.values())), check, batch_size=3)  # other chunking, same value
    np.testing.assert_allclose(list(warm.check_losses.values()), losses, rtol=0, atol=1e-6)
    assert warm.check_losses[warm.name] == min(warm.check_losses.values())
    np.testing.assert_array_equal(warm.mask, cands[warm.name])
    # the policy starts at that mask: its deterministic final mask is the start, and every probability is inside
    policy = Policy(space, warm.probs, lr=0.05, total_steps=10, sparsity=0.5)
    np.testing.assert_array_equal(policy.final_mask(), warm.mask)
    assert float(policy.probs.min()) > 0.0 and float(policy.probs.max()) < 1.0
    np.testing.assert_allclose(sorted(set(np.round(warm.probs, 9))), [0.125, 0.875])  # (1-0.25)*{0,1} + 0.25*0.5


def test_a_start_candidate_scored_re_fit_can_win_and_its_refit_comes_with_it(tiny) -> None:
    """The ``refit_top`` best candidates (by their own loss) are also scored re-fit; the start is the mask of the best
    entry of either kind, and that candidate's re-fit travels with the start (the final choice reuses it)."""
    model, adapter, space, blocks, check = tiny
    stats = collect_input_stats(adapter, blocks)
    init_mask = baseline_mask("wanda-sp", adapter, space, blocks, 0.5, stats=stats)
    cands = candidate_masks(adapter, space, blocks, stats, 0.5, "per_type", init_mask)
    ev = LocalEngine(model, space)
    plain = choose_start(ev, cands, check, 2, space, mix=0.25, sparsity=0.5, budget="per_type")
    ranked = sorted(plain.check_losses, key=plain.check_losses.get)
    refitted = []

    def refit(mask, own):  # the second-best candidate becomes the best once "re-fit"; the best one gets worse
        name = next(n for n in cands if np.array_equal(cands[n], mask))
        refitted.append(name)
        return f"rec of {name}", plain.check_losses[name] + (-1.0 if name == ranked[1] else 1.0)

    warm = choose_start(ev, cands, check, 2, space, 0.25, 0.5, "per_type", refit=refit, refit_top=2)
    assert refitted == ranked[:2]  # only the two best, by their own loss
    assert set(warm.check_losses) == set(cands) | {f"{n}+rec" for n in ranked[:2]}
    assert warm.name == ranked[1] and warm.refit == (f"rec of {ranked[1]}", plain.check_losses[ranked[1]] - 1.0)
    np.testing.assert_array_equal(warm.mask, cands[ranked[1]])
    none = choose_start(ev, cands, check, 2, space, 0.25, 0.5, "per_type", refit=refit, refit_top=0)
    assert none.name == plain.name and none.refit is None
    # a candidate returned with weight changes of its own (FLAP's biases) is re-fit from them; the others from none
    owns = {}
    assert "flap" in cands
    returned = {"flap": (plain.check_losses["flap"], "flap's biases")}
    choose_start(
        ev,
        cands,
        check,
        2,
        space,
        0.25,
        0.5,
        "per_type",
        returned,
        refit=lambda mask, own: (owns.setdefault(next(n for n in cands if cands[n] is mask), own), 0.0),
        refit_top=len(cands),
    )
    assert owns == {n: "flap's biases" if n == "flap" else None for n in cands}


def test_the_returned_mask_is_never_worse_than_the_start_on_the_check_set(tiny) -> None:
    model, adapter, space, blocks, check = tiny
    ev = LocalEngine(model, space)
    good = baseline_mask("wanda-sp", adapter, space, blocks, 0.5)
    bad = baseline_mask("random", adapter, space, blocks, 0.5, seed=3)
    l_good, l_bad = check_losses(ev, np.stack([good, bad]), check, 2)
    assert l_good < l_bad
    mask, rec = choose_final(ev, bad, good, check, 2)  # the search ended worse: the start comes back
    np.testing.assert_array_equal(mask, good)
    assert rec == {"search_loss": pytest.approx(l_bad), "start_loss": pytest.approx(l_good), "returned": "start"}
    mask, rec = choose_final(ev, good, bad, check, 2)
    np.testing.assert_array_equal(mask, good)
    assert rec["returned"] == "search"


def test_pipeline_warm_start_and_guard_end_to_end(tmp_path) -> None:
    from probprune.pipeline import prepare, prune

    # lr 5 on 6 steps: the search wanders far from its start; the guard must still return the better of the two
    cfg = load_config(
        SMOKE,
        ["search.init=best", "search.check_blocks=8", "search.method=allocation", "search.lr=5", "search.objective=kl"],
    )
    summary = prune(cfg, tmp_path / "run", progress=False)
    ws, chk = summary["warm_start"], summary["check"]
    assert ws["chosen"] in ws["check_losses"] and ws["check_losses"][ws["chosen"]] == min(ws["check_losses"].values())
    assert summary["init"] == f"best: {ws['chosen']}"
    assert chk["start_loss"] == pytest.approx(ws["check_losses"][ws["chosen"]], abs=1e-6)  # the start's loss
    rec = torch.load(tmp_path / "run" / "masks.pt", weights_only=True)
    s = prepare(cfg)
    _, check = s.calib.hold_out(8)
    ev = LocalEngine(s.model, s.space)
    final_loss, start_loss = check_losses(ev, np.stack([rec["final_mask"].numpy(), rec["init_mask"].numpy()]), check, 2)
    assert final_loss <= start_loss + 1e-9
    assert chk["returned"] == ("search" if chk["search_loss"] <= chk["start_loss"] else "start")
    assert summary["search"]["objective"] == "kl"


def test_flap_is_scored_and_returned_with_its_bias_compensation(tmp_path, monkeypatch) -> None:
    """The warm start scores FLAP as ``baseline --method flap`` returns it (biases added at compaction); a FLAP
    start that wins the final check is saved with those biases."""
    import probprune.steps as steps
    from probprune.baselines import flap_bias_compensation
    from probprune.pipeline import prepare, prune
    from probprune.reconstruct import Reconstruction, reconstructed_loss

    cfg = load_config(SMOKE, ["search.init=best", "search.check_blocks=8", "search.steps=2"])
    summary = prune(cfg, tmp_path / "run", progress=False)
    s = prepare(cfg)
    _, check = s.calib.hold_out(8)
    flap = baseline_mask("flap", s.adapter, s.space, s.init_blocks(), 0.5, budget="per_type", stats=s.stats)
    rec = Reconstruction(biases=flap_bias_compensation(s.adapter, s.space, flap, s.stats))
    engine = LocalEngine(s.model, s.space)
    with_bias = reconstructed_loss(engine, s.space, flap, rec, check, 2)
    (plain,) = check_losses(engine, flap[None], check, 2)
    assert summary["warm_start"]["check_losses"]["flap"] == pytest.approx(with_bias, rel=1e-6)
    assert abs(with_bias - plain) > 1e-4  # the biases change the model that is scored

    captured = {}

    def flap_wins(sess, mask, chk):  # FLAP as returned, made the best start and better than any search result
        loss, r = real(sess, mask, chk)
        captured["rec"], captured["mask"] = r, mask
        return -1.0, r

    real = steps.flap_as_returned
    monkeypatch.setattr(steps, "flap_as_returned", flap_wins)
    summary = prune(cfg, tmp_path / "flap", progress=False)
    assert summary["init"] == "best: flap" and summary["check"]["returned"] == "start"
    expected = compact(s.model, s.space, captured["mask"], override=captured["rec"].override())
    saved = load_pruned(tmp_path / "flap" / "model")
    ids = check[:2]
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert summary["init_ppl"] == summary["pruned_ppl"]  # the init-only row is the returned model, biases included
    # with reconstruction on, the same FLAP start, un-reconstructed, is still the model with its biases
    on = prune(apply_overrides(cfg, ["reconstruct.enabled=true"]), tmp_path / "flap-rec", progress=False)
    assert on["check"]["returned"] == on["check"]["without_reconstruction"] == "start"
    assert not on["check"]["reconstructed"] and "reconstruct" not in on
    assert on["pruned_ppl"] == pytest.approx(summary["pruned_ppl"], rel=1e-6)
    assert on["without_reconstruction"]["same_model"]


# ---------------------------------------------------------------------------------------------- thin-or-drop
def test_allocation_search_can_drop_a_whole_layer_and_the_model_reloads_exactly(tiny, tmp_path) -> None:
    model, adapter, space, blocks, _ = tiny
    stats = collect_input_stats(adapter, blocks)
    policy = AllocationPolicy(
        space, wanda_sp_scores(adapter, space, stats), lr=0.5, total_steps=80, sparsity=0.5, baseline="loo", seed=0
    )
    weight = np.where(space.unit_layer == 1, 1.0, -0.3)  # [N] units of layer 1 cost loss, every other unit helps

    def losses(masks):  # a loss that wants layer 1 gone and the budget spent elsewhere, plus noise
        return masks.numpy() @ weight + np.random.default_rng(policy.step_count).normal(0, 0.1, masks.shape[0])

    for _ in range(80):
        masks = policy.sample(4)
        policy.step(masks, losses(masks))
    final = policy.final_mask()
    assert final[space.unit_layer == 1].sum() == 0  # attention-free and MLP-free: the layer is gone
    for t in (HEAD, CHANNEL):
        assert final[space.unit_type == t].sum() == round(0.5 * (space.unit_type == t).sum())  # budget still exact
    pruned = compact(model, space, final)
    save_pruned(pruned, tmp_path / "m")
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    want = masked_logits(adapter, space, final, x)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, want, rtol=0, atol=1e-4)
        torch.testing.assert_close(load_pruned(tmp_path / "m")(x).logits, pruned(x).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ blocks and config
def test_baselines_and_search_build_identical_blocks(tmp_path) -> None:
    from probprune.pipeline import prune, run_baseline

    over = ["mask.channel_block=8", "mask.block_order=metric", "search.steps=2"]
    prune(load_config(SMOKE, over), tmp_path / "search", progress=False)
    run_baseline(load_config(SMOKE, over), "wanda-sp", tmp_path / "base", progress=False)
    a = torch.load(tmp_path / "search" / "masks.pt", weights_only=True)["channel_perm"]
    b = torch.load(tmp_path / "base" / "masks.pt", weights_only=True)["channel_perm"]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, torch.arange(x.numel())) for x in a)  # metric order, not the identity


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["search.init=best"],
            "search.init='best' chooses its start on the check set and requires search.check_blocks >= 1, got 0",
        ),
        (
            ["engine.scoring=gathered", "engine.fast_path=false"],
            "engine.scoring='gathered' is the fast path and contradicts engine.fast_path=false",
        ),
        (["engine.scoring=fast"], "engine.scoring.*must be one of 'auto', 'gathered', 'batched'"),
        (
            ["search.check_blocks=63"],
            r"search.batch_size \(2\) \+ search.check_blocks \(63\) must be <= "
            r"data.calib_blocks \(64\)",
        ),
        (
            ["search.batch_size=100"],
            r"search.batch_size \(100\) \+ search.check_blocks \(0\) must be <= "
            r"data.calib_blocks \(64\)",
        ),
        (["search.init_blocks=65"], r"search.init_blocks \(65\) must be <= data.calib_blocks \(64\)"),
        (["search.init_mix=1.0"], r"search.init_mix.*must be in \(0, 1\)"),
        (["search.objective=mse"], "search.objective.*must be one of 'ce', 'kl'"),
    ],
)
def test_bad_warm_start_settings_are_refused_at_load(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, overrides)


@pytest.mark.slow
def test_the_default_on_smollm2_starts_at_the_best_layer_removal_and_never_returns_worse(tmp_path) -> None:
    """The quickstart config, end to end on the real SmolLM2-135M and Brown text, with a short search."""
    from probprune.pipeline import prune

    cfg = load_config(
        ROOT / "configs" / "smollm2" / "135m_quickstart.yaml",
        ["search.steps=3", "search.check_blocks=8", "eval.max_tokens=2048", "eval.seq_lens=[128]"],
    )
    summary = prune(cfg, tmp_path / "run", progress=False)
    scored = summary["warm_start"]["check_losses"]
    losses = {k: v for k, v in scored.items() if not k.endswith("+rec")}  # each candidate as it is
    assert set(losses) == {"init", "shortgpt", "sleb", "wanda-sp", "flap", "magnitude"}
    # at 50 % dropping whole layers is by far the best start (measured: SLEB 6.0, ShortGPT 6.3, the rest >= 7.0 nats)
    assert min(losses, key=losses.get) == "sleb"
    rest = min(losses[k] for k in ("init", "wanda-sp", "flap", "magnitude"))
    assert max(losses["sleb"], losses["shortgpt"]) < rest - 0.5
    # the two best are also scored re-fit, and the start is the best entry of either kind
    assert {k for k in scored if k.endswith("+rec")} == {"sleb+rec", "shortgpt+rec"}
    assert summary["warm_start"]["chosen"] == min(scored, key=scored.get).removesuffix("+rec")
    chk = summary["check"]  # the default re-fits the kept weights: four models compared on the check set
    losses = {
        (name, rec): chk[f"{name}_loss" + ("_reconstructed" if rec else "")]
        for name in ("search", "start")
        for rec in (True, False)
    }
    assert losses[(chk["returned"], chk["reconstructed"])] == min(losses.values())
    plain = min(("search", "start"), key=lambda n: losses[(n, False)])
    assert chk["without_reconstruction"] == plain
    assert summary["sparsity"]["prunable"] == pytest.approx(0.5, abs=1e-9)
    without = summary["without_reconstruction"]["pruned_ppl"]["128"]
    assert without < 0.9 * summary["init_ppl"]["128"] or plain == "start"
    if chk["reconstructed"]:  # the re-fit lowered the check-set loss; held-out perplexity follows (measured: -15 %)
        assert summary["pruned_ppl"]["128"] < without
