"""The Ray engine: same losses and same search result as the local evaluator, in mask order, through actor deaths.

All Ray tests share one local instance (``ray_cluster``, 2 CPUs) and, where they can, one 2-actor evaluator; actors
ask for half a CPU each so that a second evaluator fits next to it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probprune.config import EngineConfig, ModelConfig, load_config
from probprune.data import CalibrationData
from probprune.engine import build_engine
from probprune.engine.local import LocalEngine
from probprune.errors import UserError
from probprune.models.loading import load_model
from probprune.models.registry import get_adapter
from probprune.policy import Policy, uniform_probs
from probprune.search import run_search

ROOT = Path(__file__).resolve().parents[2]
STEPS, K, B = 6, 4, 2
# every module of tiny:llama on the CPU, as accelerate's device_map would place the pieces of a big replica
TINY_DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def engine(**kw) -> EngineConfig:
    base = dict(kind="ray", num_actors=2, cpus_per_actor=0.5, threads=1, fast_path=False, max_retries=2)
    return EngineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny():
    """(model, space, calibration data) of tiny:llama; random blocks, no corpus needed."""
    model, _ = load_model("tiny:llama")
    space = get_adapter(model).mask_space()
    blocks = torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(0))  # [n, T]
    return model, space, CalibrationData(blocks, seed=0)


@pytest.fixture(scope="module")
def local(tiny):
    model, space, _ = tiny
    return LocalEngine(model, space, fast_path=False)


@pytest.fixture(scope="module")
def ray_ev(ray_cluster, tiny):
    from probprune.engine.ray import RayEngine

    _, space, _ = tiny
    ev = RayEngine(ModelConfig(name_or_path="tiny:llama"), space, engine())
    yield ev
    ev.close()


def random_masks(space, k: int, seed: int, p: float = 0.6) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, space.num_units, generator=g) < p).float().numpy()  # [K, N]


def masks_and_batch(space, k: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """``k`` random masks and a random [B, 16] batch, both from ``seed``."""
    batch = torch.randint(0, 256, (B, 16), generator=torch.Generator().manual_seed(seed))  # [B, T]
    return random_masks(space, k, seed=seed), batch


def search(evaluator, tiny) -> Policy:
    _, space, data = tiny
    policy = Policy(space, uniform_probs(space, 0.5), lr=0.05, total_steps=STEPS, sparsity=0.5, seed=0)
    run_search(policy, evaluator, data, steps=STEPS, num_samples=K, batch_size=B, progress=False)
    return policy


@pytest.fixture(scope="module")
def local_probs(tiny, local) -> np.ndarray:
    return search(local, tiny).probs.numpy()


class KillBeforeCall:
    """Evaluator wrapper: kills one actor of a RayEngine just before its ``at_call``-th call."""

    def __init__(self, inner, at_call: int, slot: int = 0, no_restart: bool = False):
        self.inner, self.at_call, self.slot, self.no_restart = inner, at_call, slot, no_restart
        self.calls = 0

    def losses(self, masks, batch):
        import ray

        self.calls += 1
        if self.calls == self.at_call:
            ray.kill(self.inner._pool._actors[self.slot], no_restart=self.no_restart)
        return self.inner.losses(masks, batch)

    def close(self):
        pass


# ------------------------------------------------------------------------------------------------ no cluster needed
def test_split_work_keeps_every_actor_busy():
    from probprune.engine.ray import split_work

    assert split_work(8, 4, 4) == [(2 * i, 2 * i + 2, 0, 4) for i in range(4)]  # K >= actors: masks split
    assert split_work(2, 8, 8) == [(j, j + 1, 2 * r, 2 * r + 2) for j in range(2) for r in range(4)]  # K=2 on 8
    assert split_work(1, 4, 3) == [(0, 1, 0, 2), (0, 1, 2, 3), (0, 1, 3, 4)]
    assert split_work(3, 2, 4) == [(0, 1, 0, 1), (0, 1, 1, 2), (1, 2, 0, 2), (2, 3, 0, 2)]
    assert split_work(2, 1, 4) == [(0, 1, 0, 1), (1, 2, 0, 1)]  # one row: nothing to split
    for k, b, n in [(1, 4, 3), (2, 8, 8), (3, 2, 4), (5, 3, 2)]:  # every (mask, row) pair covered exactly once
        cover = np.zeros((k, b), dtype=int)
        for lo, hi, r0, r1 in split_work(k, b, n):
            cover[lo:hi, r0:r1] += 1
        assert (cover == 1).all()


def test_split_shares():
    from probprune.engine.tasks import split_shares

    assert split_shares(3, 2) == [(0, 2), (2, 3)]
    assert split_shares(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert split_shares(1, 4) == [(0, 1)]
    assert split_shares(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_missing_ray_gives_clear_message(monkeypatch, tiny):
    model, space, _ = tiny
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    for name in [m for m in sys.modules if m.startswith("probprune.engine.ray")]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("probprune.engine.ray")
    cfg = load_config(None, ["preset=paper", "engine.kind=ray"])
    with pytest.raises(
        UserError, match=r"engine.kind=ray needs Ray: pip install 'probprune\[ray\]'.*engine.kind=local"
    ):
        build_engine(cfg, model, space)
    # the local engine and the rest of the library do not need Ray
    cfg = load_config(None, ["preset=paper", "engine.kind=local", "engine.fast_path=false"])
    assert isinstance(build_engine(cfg, model, space), LocalEngine)


def test_only_the_ray_engine_imports_ray():
    offenders = []
    for path in sorted((ROOT / "probprune").rglob("*.py")):
        if path.parent == ROOT / "probprune" / "engine" / "ray":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_actors_do_not_import_the_pipeline_or_tune():
    """The actor pool is the bottom layer: importing it loads neither the pipeline nor Tune (no import cycle)."""
    code = (
        "import sys, probprune.engine.ray.engine; "
        "print(sorted(m for m in sys.modules if m in ('probprune.pipeline', 'probprune.engine.ray.tune', "
        "'ray.tune')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_device_map_replica_local(tiny, local):
    _, space, _ = tiny
    split, _ = load_model("tiny:llama", device_map=TINY_DEVICE_MAP)
    assert split.hf_device_map == TINY_DEVICE_MAP
    masks = random_masks(space, 3, seed=3)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(
        LocalEngine(split, space, fast_path=False).losses(masks, batch), local.losses(masks, batch), rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------------- Ray actors
@pytest.mark.ray
def test_cpu_actors_see_no_gpu_and_use_their_threads(ray_ev):
    info = ray_ev.actor_info()
    assert len(info) == 2 and len({i["pid"] for i in info}) == 2
    for i in info:
        assert i["cuda_visible_devices"] == ""  # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1
        assert i["cuda_device_count"] == 0 and i["gpu_ids"] == []
        assert i["device"] == "cpu" and i["threads"] == 1


@pytest.mark.ray
def test_gpu_request_on_cpu_cluster_is_rejected(ray_cluster, tiny):
    from probprune.engine.ray import RayEngine

    _, space, _ = tiny
    with pytest.raises(UserError, match=r"engine.gpus_per_actor=1: no node of the Ray cluster has that much"):
        RayEngine(ModelConfig(name_or_path="tiny:llama", device="cuda"), space, engine(gpus_per_actor=1))
    with pytest.raises(UserError, match=r"model.device='cuda' but engine.gpus_per_actor=0"):
        RayEngine(ModelConfig(name_or_path="tiny:llama", device="cuda"), space, engine())


@pytest.mark.ray
def test_uneven_shares_keep_mask_order(ray_ev, local, tiny):
    _, space, _ = tiny
    masks, batch = masks_and_batch(space, 3, seed=1)
    want = local.losses(masks, batch)
    got = ray_ev.losses(masks, batch)
    assert ray_ev.last_shares == [(0, 2, 0, B), (2, 3, 0, B)]
    assert len(ray_ev.last_busy_seconds) == 2 and min(ray_ev.last_busy_seconds) > 0
    assert ray_ev.last_wall_seconds >= max(ray_ev.last_busy_seconds)  # an actor's compute lies inside the call
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(set(np.round(want, 4))) == 3  # distinct losses, so order is really checked
    perm = [2, 0, 1]
    np.testing.assert_allclose(ray_ev.losses(masks[perm], batch), want[perm], rtol=0, atol=1e-6)
    # fewer masks than actors: the mask's batch rows are split over both actors, the loss is unchanged
    np.testing.assert_allclose(ray_ev.losses(masks[:1], batch), want[:1], rtol=0, atol=1e-6)
    assert ray_ev.last_shares == [(0, 1, 0, 1), (0, 1, 1, 2)]
    assert len(ray_ev.last_busy_seconds) == 2 and min(ray_ev.last_busy_seconds) > 0  # both actors worked


@pytest.mark.ray
def test_search_on_two_actors_equals_local(ray_ev, tiny, local_probs):
    _, space, _ = tiny
    probs = search(ray_ev, tiny).probs.numpy()
    assert np.abs(local_probs - uniform_probs(space, 0.5)).max() > 1e-2  # the search moved
    np.testing.assert_allclose(probs, local_probs, rtol=0, atol=1e-6)


@pytest.mark.ray
def test_search_survives_a_killed_actor(ray_ev, tiny, local_probs):
    retries, replaced = ray_ev.retries, ray_ev.replacements
    probs = search(KillBeforeCall(ray_ev, at_call=3, slot=0), tiny).probs.numpy()
    assert ray_ev.retries > retries and ray_ev.replacements > replaced
    np.testing.assert_allclose(probs, local_probs, rtol=0, atol=1e-6)


@pytest.mark.ray
def test_retries_are_bounded(ray_ev, local, tiny):
    import ray

    _, space, _ = tiny
    masks, batch = masks_and_batch(space, 2, seed=2)
    want = local.losses(masks, batch)
    ray_ev.max_retries = 0
    try:
        victim = ray_ev._pool._actors[ray_ev._pool.live_slots()[0]]
        ray.kill(victim, no_restart=True)
        # the share sent to the dead actor fails and may not be retried
        with pytest.raises(
            RuntimeError, match=r"failed 1 time\(s\), each on an actor that died \(engine.max_retries=0\)"
        ):
            for _ in range(3):  # whichever share lands on the dead actor
                ray_ev.losses(masks, batch)
    finally:
        ray_ev.max_retries = 2
    np.testing.assert_allclose(ray_ev.losses(masks, batch), want, rtol=0, atol=1e-6)  # a replacement took over


@pytest.mark.ray
def test_device_map_replica_on_actor(ray_cluster, tiny, local):
    from probprune.engine.ray import RayEngine

    _, space, _ = tiny
    masks = random_masks(space, 3, seed=4)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with RayEngine(
        ModelConfig(name_or_path="tiny:llama", device_map=TINY_DEVICE_MAP), space, engine(num_actors=1)
    ) as ev:
        assert ev.actor_info()[0]["device_map"] == TINY_DEVICE_MAP
        np.testing.assert_allclose(ev.losses(masks, batch), local.losses(masks, batch), rtol=0, atol=1e-6)
        est = ev.estimate(batch, steps=100, num_samples=3)
        assert est.actors == 1 and est.forwards_per_step == 3 and est.step_seconds > 0
        assert est.search_seconds == pytest.approx(100 * est.step_seconds)
        assert "estimated search time: 100 steps" in str(est)


@pytest.mark.ray
def test_bad_model_path_on_actor_is_a_user_error(ray_cluster, tiny):
    from probprune.engine.ray import RayEngine

    _, space, _ = tiny
    with pytest.raises(UserError, match="model.name_or_path: unknown tiny model 'tiny:nope'"):
        RayEngine(ModelConfig(name_or_path="tiny:nope"), space, engine(num_actors=1))


@pytest.mark.ray
def test_ray_job_smoke_test(ray_cluster, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("ray_jobs_prune", ROOT / "ray_jobs" / "prune.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    address = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "run"
    rc = job.main(
        ["--smoke-test", "--output", str(out), "--address", address, "--no-progress", "engine.cpus_per_actor=0.5"]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "estimated search time: 5 more steps x" in captured.out
    assert "| probprune search |" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["search"]["engine"] == "ray"
    assert summary["search"]["steps"] == 6 and summary["search"]["forwards"] == 12
    assert summary["sparsity"]["prunable"] == pytest.approx(0.5, abs=0.02)
    assert all(np.isfinite(v) for v in summary["pruned_ppl"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    # a bad override is reported on one line, exit code 2
    rc = job.main(["--smoke-test", "--output", str(tmp_path / "bad"), "search.lrr=1"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("probprune: error: invalid config: unknown config key 'search.lrr'")


@pytest.mark.ray
def test_kl_objective_and_check_set_losses_on_actors_equal_local(ray_cluster, tiny):
    from probprune.engine.ray import RayEngine

    model, space, _ = tiny
    masks = random_masks(space, 3, seed=2)
    masks[0] = space.full_mask()
    batch = torch.randint(0, 256, (B, 16), generator=torch.Generator().manual_seed(3))
    local_kl = LocalEngine(model, space, fast_path=True, objective="kl")
    with RayEngine(ModelConfig(name_or_path="tiny:llama"), space, engine(fast_path=True), objective="kl") as ev:
        got = ev.losses(masks, batch)  # each actor computes the dense log-probs of the batch once
        np.testing.assert_allclose(got, local_kl.losses(masks, batch), rtol=0, atol=1e-6)
        assert got[0] == 0.0 and (got[1:] > 0).all()
        # the check set is scored by cross-entropy whatever the search's objective
        np.testing.assert_allclose(
            ev.losses(masks, batch, objective="ce"),
            LocalEngine(model, space, fast_path=True).losses(masks, batch),
            rtol=0,
            atol=1e-6,
        )


@pytest.mark.ray
@pytest.mark.parametrize(
    "overrides",
    [
        ["search.init=best", "mask.layers=true", "search.budget=params", "search.check_blocks=4"],
        ["search.method=allocation", "mask.channel_block=4", "mask.block_order=metric"],
    ],
    ids=["best-start-layers", "allocation-metric-blocks"],
)
def test_prune_on_actors_loads_no_model_on_the_driver(ray_cluster, tmp_path, monkeypatch, overrides):
    """``probprune prune`` with engine.kind=ray: the driver holds only a meta-device skeleton (loading a model on it is
    an error here), the actors compute the statistics, the warm start, every perplexity and the search, and the output
    folder is compacted layer by layer from the checkpoint. Everything equals the same run in one process."""
    from probprune import pipeline
    from probprune.config import apply_overrides
    from probprune.models.loading import load_pruned

    base = apply_overrides(load_config(ROOT / "configs" / "tiny" / "smoke.yaml"), overrides)
    local_summary = pipeline.prune(base, tmp_path / "local", progress=False)

    def no_weights_on_the_driver(*args, **kwargs):
        raise AssertionError("the driver loaded a model")

    from probprune.models import loading

    monkeypatch.setattr(loading, "load_model", no_weights_on_the_driver)  # nothing in this process may load weights
    ray_cfg = apply_overrides(
        base, ["engine.kind=ray", "engine.num_actors=2", "engine.cpus_per_actor=0.5", "engine.threads=1"]
    )
    ray_summary = pipeline.prune(ray_cfg, tmp_path / "ray", progress=False)

    local_masks = torch.load(tmp_path / "local" / "masks.pt")
    ray_masks = torch.load(tmp_path / "ray" / "masks.pt")
    assert torch.equal(local_masks["final_mask"], ray_masks["final_mask"])
    for key in ("dense_ppl", "init_ppl", "pruned_ppl"):  # compacted model here, masked fast path on the actors
        for seq_len, value in local_summary[key].items():
            assert ray_summary[key][seq_len] == pytest.approx(value, rel=1e-5), (key, seq_len)
    assert ray_summary["params"] == local_summary["params"]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = load_pruned(tmp_path / "local" / "model")(ids).logits
        got = load_pruned(tmp_path / "ray" / "model")(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.ray
def test_batched_scoring_reaches_the_actors(ray_cluster, tiny):
    from probprune.engine.ray import RayEngine

    model, space, _ = tiny
    masks = random_masks(space, 3, seed=4)
    masks[0] = space.full_mask()
    masks[2] = 0.5 * masks[2] + 0.25  # a soft mask: only the batched path scores it (the gathered one refuses)
    batch = torch.randint(0, 256, (B, 16), generator=torch.Generator().manual_seed(5))
    want = LocalEngine(model, space, scoring="batched", objective="kl").losses(masks, batch)
    with RayEngine(ModelConfig(name_or_path="tiny:llama"), space, engine(scoring="batched"), objective="kl") as ev:
        got = ev.losses(masks, batch)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got[0] == 0.0 and (got[1:] > 0).all()
