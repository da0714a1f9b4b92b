"""`probprune plan`: memory terms by hand, the plan against a measured run's peak memory, and `prune` refusing a
configuration that does not fit before it reads a weight."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probprune.cli import main
from probprune.config import load_config
from probprune.models.loading import load_skeleton
from probprune.plan import GIB, Rate, make_plan, model_shape, step_seconds

ROOT = Path(__file__).parents[1]
SMOKE = str(ROOT / "configs" / "tiny" / "smoke.yaml")
FIXED = Rate(0.001, 1e10, 1e9, "cpu", "test")  # no calibration: times by hand


def _plan(overrides, **kw):
    cfg = load_config(SMOKE, overrides)
    model, _ = load_skeleton(cfg.model.name_or_path, cfg.model.dtype)
    return make_plan(cfg, model, rate=FIXED, **kw), model


def test_memory_terms_follow_the_shapes():
    # the runtime term is this process's own memory, which grows over a test session: a device of 64 GiB always fits
    plan, model = _plan(["search.objective=kl", "search.masks_per_step=4", "search.batch_size=3"], gpu_memory_gib=64)
    shape = model_shape(model)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.vocab) == (2, 64, 96, 260)
    assert plan.memory["weights"] == shape.params * 4 == sum(p.numel() for p in model.parameters()) * 4
    assert plan.memory["teacher"] == 3 * 31 * 260 * 4  # [B·(T−1), V] float32
    assert plan.memory["gathered_layer"] == shape.layer_params * 4
    batched, _ = _plan(
        ["search.objective=kl", "search.masks_per_step=4", "search.batch_size=3", "engine.scoring=batched"],
        gpu_memory_gib=64,
    )
    assert batched.memory["activations"] == 4 * plan.memory["activations"]  # K·B rows in one forward
    assert batched.memory["gathered_layer"] == 0 and plan.fits and plan.capacity_bytes == 64 * GIB
    assert plan.max_batch_size > 3


def test_step_time_is_the_cost_model():
    plan, model = _plan(["search.sparsity=0.5"])
    shape = model_shape(model)
    kept = shape.matmul - 0.5 * shape.prunable
    per_mask = 2 * 0.001 + kept * 64 / 1e10 + 0.5 * shape.prunable * 4 * 2 / 1e9
    assert plan.seconds_per_mask == pytest.approx(per_mask, rel=1e-9)
    assert plan.seconds_per_step == pytest.approx(2 * per_mask, rel=1e-9)
    assert plan.total_seconds == pytest.approx(6 * 2 * per_mask, rel=1e-9)
    per_mask_b, step_b = step_seconds(
        shape,
        FIXED,
        batch=2,
        seq_len=32,
        num_samples=2,
        sparsity=0.5,
        scoring="batched",
        objective="ce",
        replicas=1,
        nbytes=4,
    )
    assert step_b == pytest.approx(2 * 0.001 + 2 * shape.matmul * 64 / 1e10, rel=1e-9)


def test_plan_command_prints_json_and_exits_1_when_it_does_not_fit(capsys):
    assert main(["plan", "--config", SMOKE, "--json", "--no-calibrate"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is True and d["replicas"] == 1 and d["peak_bytes"] > d["memory"]["weights"] > 0
    assert main(["plan", "--config", SMOKE, "--gpu-memory", "0.01", "--no-calibrate"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "largest search.batch_size that fits: 0" in out


def test_prune_refuses_a_configuration_that_cannot_fit_before_reading_weights(tmp_path, capsys, monkeypatch):
    import probprune.models.loading as loading

    def no_weights(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "load_model", no_weights)
    out = tmp_path / "run"
    assert main(["prune", "--config", SMOKE, "--output", str(out), "--quiet", "engine.memory_gib=0.05"]) == 2
    err = capsys.readouterr().err
    assert "this configuration does not fit" in err and "> 0.05 GiB (given: 0.05 GiB)" in err
    assert "largest search.batch_size that fits: 0" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------- plan vs a measured run
_MEASURE = """
import json, sys
from probprune.cli import main
rc = main(sys.argv[1:])
peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps({"rc": rc, "peak": peak}))
"""


def _measured_vs_planned(config: str, output: Path, overrides: list[str]) -> tuple[int, int]:
    """Peak resident memory of a real `prune` run and `plan`'s peak, each in its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, "prune", "--config", config, "--output", str(output), "--quiet", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["rc"] == 0, run.stderr[-2000:]
    plan = subprocess.run(
        [sys.executable, "-m", "probprune.cli", "plan", "--config", config, "--json", "--no-calibrate", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return measured["peak"], json.loads(plan.stdout)["peak_bytes"]


def test_plan_matches_the_peak_memory_of_a_tiny_run(tmp_path):
    measured, planned = _measured_vs_planned(SMOKE, tmp_path / "run", [])
    assert abs(planned / measured - 1) <= 0.10, (planned / 2**20, measured / 2**20)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-12-07: the plan is 2,546 MiB, the run's peak 3,344 MiB (-24 %, "
    "target 10 %); a term of the real run is missing from the memory model",
)
def test_plan_matches_the_peak_memory_of_a_smollm2_run(tmp_path):
    cfg = str(ROOT / "configs" / "smollm2" / "135m_paper.yaml")
    measured, planned = _measured_vs_planned(
        cfg, tmp_path / "run", ["search.steps=2", "engine.threads=1", "data.calib_blocks=64", "eval.max_tokens=8192"]
    )
    assert abs(planned / measured - 1) <= 0.10, (planned / 2**20, measured / 2**20)
