import json
import os

import numpy as np
import pytest
import torch

from probprune.data import CalibrationData
from probprune.engine.local import LocalEngine
from probprune.errors import UserError
from probprune.models import get_adapter, tiny_model
from probprune.policy import Policy, uniform_probs
from probprune.run_folder import CHECKPOINT as CHECKPOINT_NAME
from probprune.search import run_search


def _setup(seed=0):
    model = tiny_model()
    space = get_adapter(model).mask_space()
    blocks = torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(0))
    data = CalibrationData(blocks, seed=0)
    policy = Policy(space, uniform_probs(space, 0.5), lr=0.05, total_steps=8, sparsity=0.5, baseline="loo", seed=seed)
    return model, space, data, policy


def _run(tmp, **kw):
    model, space, data, policy = _setup()
    ev = LocalEngine(model, space, fast_path=False)
    return run_search(
        policy,
        ev,
        data,
        steps=8,
        num_samples=3,
        batch_size=2,
        checkpoint_dir=tmp,
        checkpoint_every=2,
        progress=False,
        fingerprint="fp",
        **kw,
    )


def test_resume_equals_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "a")
    part = _run(tmp_path / "b", stop_after=5)  # checkpoint at 4 and at the stop (5)
    assert part.policy.step_count == 5
    resumed = _run(tmp_path / "b", resume=True)
    assert resumed.resumed_from_step == 5
    assert torch.equal(resumed.policy.probs, full.policy.probs)
    np.testing.assert_array_equal(resumed.final_mask, full.final_mask)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    full_lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["losses"] for x in lines] == [x["losses"] for x in full_lines]


def test_resume_refuses_a_checkpoint_of_another_search(tmp_path):
    _run(tmp_path, stop_after=2)
    model, space, data, policy = _setup()
    with pytest.raises(UserError, match="belongs to a different search"):
        run_search(
            policy,
            LocalEngine(model, space, fast_path=False),
            data,
            steps=8,
            num_samples=3,
            batch_size=2,
            checkpoint_dir=tmp_path,
            resume=True,
            fingerprint="other",
            progress=False,
        )


def test_checkpoint_written_atomically(tmp_path):
    _run(tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    assert not list(tmp_path.glob(".*.tmp"))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert state["extra"]["step"] == 8 and state["policy"]["step_count"] == 8


class _FlakyEvaluator:
    """Returns NaN for the first mask of every step."""

    def __init__(self, inner):
        self.inner = inner

    def losses(self, masks, batch):
        out = self.inner.losses(masks, batch)
        out[0] = float("nan")
        return out

    def close(self):
        pass


def test_non_finite_losses_are_dropped_and_counted():
    model, space, data, policy = _setup()
    res = run_search(
        policy,
        _FlakyEvaluator(LocalEngine(model, space, fast_path=False)),
        data,
        steps=4,
        num_samples=3,
        batch_size=2,
        progress=False,
    )
    assert res.dropped_samples == 4
    assert torch.isfinite(res.policy.probs).all()
    assert all(h["n_dropped"] == 1 for h in res.history)


class _LinearLossEvaluator:
    """loss(m) = sum_u w_u m_u with w < 0: the optimum keeps the units with the most negative w, per type."""

    def __init__(self, w):
        self.w = w

    def losses(self, masks, batch):
        return masks.astype(np.float64) @ self.w

    def close(self):
        pass


def test_search_loop_finds_the_optimum_of_a_known_objective():
    _, space, data, _ = _setup()
    rng = np.random.default_rng(0)
    w = np.full(space.num_units, -0.1)
    for t in (0, 1):  # a random half of each type matters ten times more
        sl = space.type_slice(t)
        w[sl.start + rng.permutation(sl.stop - sl.start)[: (sl.stop - sl.start) // 2]] = -1.0
    policy = Policy(space, uniform_probs(space, 0.5), lr=0.02, total_steps=400, sparsity=0.5, baseline="loo", seed=1)
    res = run_search(policy, _LinearLossEvaluator(w), data, steps=400, num_samples=8, batch_size=1, progress=False)
    want = (w == -1.0).astype(np.float32)  # the optimum under the per-type budget; its loss is -100
    assert (res.final_mask != want).sum() <= 4  # 200 units, a few boundary swaps at most
    assert res.history[0]["loss_mean"] > -60 and res.history[-1]["loss_mean"] < -90


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create the marker file if unpickled

    out = tmp_path / "run"
    out.mkdir()
    with (out / CHECKPOINT_NAME).open("wb") as f:
        pickle.dump({"policy": Payload(), "extra": {}}, f)
    with pytest.raises(UserError, match=r"--resume: cannot read the search checkpoint .*corrupt or not a probprune"):
        _run(out, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, b"PK\x03\x04 not a zip"])
def test_a_corrupt_checkpoint_gives_one_clear_message(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(content)
    with pytest.raises(UserError, match="--resume: cannot read the search checkpoint"):
        _run(out, resume=True)


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    part = _run(tmp_path / "b", stop_after=4)
    assert part.policy.step_count == 4
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss_me')  # the disk filled up mid-append
    resumed = _run(tmp_path / "b", resume=True)
    full = _run(tmp_path / "a")
    assert torch.equal(resumed.policy.probs, full.policy.probs)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))


def test_stale_tune_checkpoint_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from probprune.engine.ray.tune import _remove_stale_checkpoint_dirs

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"probprune-ckpt-{int(dead.stdout)}-abc"
    alive = tmp_path / f"probprune-ckpt-{os.getppid()}-def"
    other = tmp_path / "probprune-ckpt-notapid-x"
    for d in (stale, alive, other):
        d.mkdir()
    _remove_stale_checkpoint_dirs()
    assert not stale.exists() and alive.exists() and other.exists()
