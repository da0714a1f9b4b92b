"""The local engine: fast path = reference, the KL objective and its cached teacher, the factory, weight tasks."""

from pathlib import Path

import numpy as np
import pytest
import torch

from probprune.config import load_config
from probprune.engine import build_engine
from probprune.engine.local import LocalEngine
from probprune.models import get_adapter, tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _setup(kind="llama"):
    model = tiny_model(kind)
    space = get_adapter(model).mask_space(channel_block=8)
    g = np.random.default_rng(0)
    masks = (g.random((3, space.num_units)) < 0.6).astype(np.float32)
    masks[0] = 1.0
    batch = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, space, masks, batch


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_fast_path_and_reference_give_the_same_losses(kind):
    model, space, masks, batch = _setup(kind)
    fast = LocalEngine(model, space, fast_path=True).losses(masks, batch)
    ref = LocalEngine(model, space, fast_path=False, max_rows=2).losses(masks, batch)
    assert fast.dtype == np.float64 and fast.shape == (3,)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


def test_kl_objective_is_zero_for_the_dense_mask_and_its_teacher_is_cached_per_batch():
    model, space, masks, batch = _setup()
    ev = LocalEngine(model, space, objective="kl")
    kl = ev.losses(masks, batch)
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and np.all(kl[1:] > 1e-4)
    first = ev.teacher(batch)
    assert ev.teacher(batch) is first  # the same batch: computed once
    assert ev.teacher(batch[:, :8]) is not first  # another batch: recomputed
    ce = ev.losses(masks, batch, objective="ce")  # a per-call override
    np.testing.assert_allclose(ce, LocalEngine(model, space).losses(masks, batch), rtol=0, atol=0)
    ev.close()
    assert ev._teacher is None


def test_bad_objectives_are_refused():
    model, space, masks, batch = _setup()
    with pytest.raises(ValueError, match="objective must be one of 'ce', 'kl', got 'mse'"):
        LocalEngine(model, space, objective="mse")
    with pytest.raises(ValueError, match="objective must be one of 'ce', 'kl', got 'mse'"):
        LocalEngine(model, space, fast_path=False).losses(masks, batch, objective="mse")


def test_build_engine_follows_the_engine_config():
    cfg = load_config(ROOT / "configs" / "tiny" / "smoke.yaml")
    model, space, masks, batch = _setup()
    ev = build_engine(cfg, model, space)
    assert type(ev) is LocalEngine and ev.holds_weights and ev.num_replicas == 1
    assert ev.fast_path is cfg.engine.fast_path and ev.objective == cfg.search.objective
    assert ev.busy_seconds == 0.0
    np.testing.assert_array_equal(
        ev.losses(masks, batch),
        LocalEngine(model, space, fast_path=cfg.engine.fast_path, objective=cfg.search.objective).losses(masks, batch),
    )
    assert ev.busy_seconds > 0.0


def test_weight_tasks_run_on_this_process_model():
    from probprune.engine.tasks import input_stats, merge_stats, split_shares

    model, space, _, batch = _setup()
    engine = LocalEngine(model, space)
    blocks = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(7))
    whole = engine.run(input_stats, blocks, 2)
    parts = merge_stats(engine.map(input_stats, [(blocks[lo:hi], 2) for lo, hi in split_shares(5, 3)]))
    assert parts["tokens"] == whole["tokens"] == 5 * 16
    for li, entry in enumerate(whole["down_proj"]):  # shares combine exactly into the statistics of all blocks
        torch.testing.assert_close(parts["down_proj"][li]["sumsq"], entry["sumsq"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["cos"], whole["cos"], rtol=1e-5)


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_batched_scoring_gives_the_gathered_losses_for_both_objectives(objective):
    model, space, masks, batch = _setup()
    gathered = LocalEngine(model, space, scoring="gathered", objective=objective).losses(masks, batch)
    batched = LocalEngine(model, space, fast_path=False, objective=objective)  # fast_path=false means batched
    assert batched.scoring == "batched" and not batched.fast_path
    np.testing.assert_allclose(batched.losses(masks, batch), gathered, rtol=0, atol=2e-5)
    if objective == "kl":
        assert batched.losses(masks[:1], batch)[0] == 0.0 and gathered[0] == pytest.approx(0.0, abs=1e-6)


def test_auto_scoring_measures_both_paths_once_and_keeps_the_faster(monkeypatch):
    import probprune.engine.local as local

    model, space, masks, batch = _setup()
    ev = LocalEngine(model, space, scoring="auto")
    calls = []
    slow = {"gathered": 0.02, "batched": 0.0}  # make the gathered path look slower: the batched one must win
    real = ev._losses

    def timed(path, *a):
        calls.append(path)
        import time

        time.sleep(slow[path])
        return real(path, *a)

    monkeypatch.setattr(ev, "_losses", timed)
    first = ev.losses(masks, batch)
    assert calls == ["gathered", "gathered", "batched", "batched"]  # a warm-up and a timed call of each
    rec = ev.scoring_record
    assert ev.scoring == rec["path"] == "batched" and rec["chosen_by"] == "measured on the first call"
    assert rec["seconds_per_mask"]["gathered"] > rec["seconds_per_mask"]["batched"] + 0.02 / len(masks) * 0.9
    assert rec["masks"] == 3 and rec["batch"] == [2, 10]
    np.testing.assert_allclose(first, LocalEngine(model, space).losses(masks, batch), rtol=0, atol=2e-5)
    ev.losses(masks, batch)
    assert calls[4:] == ["batched"]  # later calls use the chosen path only
    assert local.SCORING == ("auto", "gathered", "batched")


def test_engine_scoring_setting_reaches_the_local_engine():
    model, space, _, _ = _setup()
    for overrides, path in (
        (["engine.scoring=batched"], "batched"),
        (["engine.fast_path=false"], "batched"),
        ([], "gathered"),
        (["engine.scoring=auto"], "auto"),
    ):
        cfg = load_config(None, ["engine.kind=local", *overrides])
        ev = build_engine(cfg, model, space)
        assert ev.scoring == path and ev.scoring_record == {"path": path, "chosen_by": "config"}
