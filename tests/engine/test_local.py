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
    with pytest.raises(ValueError, match="fast path"):
        LocalEngine(model, space, fast_path=False, objective="kl")
    with pytest.raises(ValueError, match="fast path"):
        LocalEngine(model, space, fast_path=False).losses(masks, batch, objective="kl")


def test_build_engine_follows_the_engine_config():
    cfg = load_config(ROOT / "configs" / "tiny" / "smoke.yaml")
    model, space, masks, batch = _setup()
    ev = build_engine(cfg, model, space)
    assert type(ev) is LocalEngine and ev.holds_weights and ev.num_replicas == 1
    assert ev.fast_path is cfg.engine.fast_path and ev.objective == cfg.search.objective
    assert ev.busy_seconds == 0.0
    np.testing.assert_array_equal(ev.losses(masks, batch), LocalEngine(model, space, fast_path=cfg.engine.fast_path,
                                                                      objective=cfg.search.objective).losses(masks, batch))
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
