"""`probprune plan`: memory terms by hand, the plan against a measured run's peak memory, and `prune` refusing a
configuration that does not fit before it reads a weight."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probprune.cli import main
from probprune.config import load_config
from probprune.models.loading import load_skeleton
from probprune.plan import GIB, Rate, calibrate, make_plan, model_shape, step_seconds

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


def test_a_cpu_plan_counts_the_heap_fragmentation_of_the_pruned_models_evaluation():
    plan, model = _plan(["search.sparsity=0.5"], gpu_memory_gib=64)  # smoke.yaml runs on the CPU
    shape = model_shape(model)
    cfg = load_config(SMOKE, [])
    length = max(cfg.eval.seq_lens)
    rows = max(1, min(cfg.eval.batch_size, cfg.eval.max_tokens // length))
    assert plan.memory["eval_heap_fragmentation"] == 2 * shape.layers * rows * length * shape.hidden * 4
    dense_eval = plan.phases["evaluation"] - plan.memory["eval_heap_fragmentation"]
    assert dense_eval == sum(plan.memory[k] for k in ("runtime", "weights", "eval_pruned_weights", "eval_activations"))
    gpu, _ = _plan(["search.sparsity=0.5", "model.device=cuda"], gpu_memory_gib=64)
    assert gpu.memory["eval_heap_fragmentation"] == 0  # the CUDA caching allocator reuses blocks of any size


@pytest.mark.parametrize("target", ["local", "dense"])
def test_reconstruction_is_a_phase_of_its_own(target):
    """The widest output projection's products on the device (float32), and on a CPU their float64 sums and the
    calibration blocks' residual stream(s)."""
    over = ["reconstruct.enabled=true", f"reconstruct.target={target}", "reconstruct.blocks=10", "eval.batch_size=2"]
    plan, model = _plan(over, gpu_memory_gib=64)
    off, _ = _plan([], gpu_memory_gib=64)
    assert "reconstruction" not in off.phases and "reconstruct_products" not in off.memory
    k, h, t = 96, 64, load_config(SMOKE, []).data.block_len  # intermediate, hidden, tokens per block
    assert plan.memory["reconstruct_products"] == (k * k + k * h) * 4 + 2 * t * (k * (4 + 4) + h * 8)
    streams = 2 if target == "dense" else 1
    assert plan.memory["reconstruct_host"] == (k * k + k * h) * 8 + streams * 10 * t * h * 4
    assert plan.phases["reconstruction"] == sum(
        plan.memory[x] for x in ("runtime", "weights", "reconstruct_products", "reconstruct_host")
    )
    gpu, _ = _plan([*over, "model.device=cuda"], gpu_memory_gib=64)
    assert gpu.memory["reconstruct_host"] == 0


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
def test_plan_matches_the_peak_memory_of_a_smollm2_run(tmp_path):
    cfg = str(ROOT / "configs" / "smollm2" / "135m_paper.yaml")
    measured, planned = _measured_vs_planned(
        cfg, tmp_path / "run", ["search.steps=2", "engine.threads=1", "data.calib_blocks=64", "eval.max_tokens=8192"]
    )
    assert abs(planned / measured - 1) <= 0.10, (planned / 2**20, measured / 2**20)


def test_calibration_measures_the_gathered_path_and_the_head_on_the_models_own_shape():
    cfg = load_config(SMOKE, [])
    model, _ = load_skeleton(cfg.model.name_or_path, cfg.model.dtype)
    shape = model_shape(model)
    rate = calibrate("cpu", "float32", tokens=64, shape=shape, channel_block=2, repeats=1)
    assert f"x {shape.hidden}," in rate.source and "gathered path on the model's layer shape" in rate.source
    measured = (
        rate.gathered_layer_overhead_s,
        rate.gathered_mask_overhead_s,
        rate.gathered_rate_param_tokens_per_s,
        rate.head_ce_s_per_token,
        rate.head_kl_s_per_token,
        rate.teacher_head_s_per_token,
    )
    assert all(v is not None and math.isfinite(v) and v >= 0 for v in measured), measured
    assert rate.copy_bytes_per_s == math.inf  # the gathers are inside the gathered path's own timings
    generic = calibrate("cpu", "float32", tokens=64, repeats=1)  # no shape: the dense constants and the copy rate
    assert generic.gathered_rate_param_tokens_per_s is None and generic.head_ce_s_per_token is None
    assert math.isfinite(generic.copy_bytes_per_s)


def test_step_time_with_a_calibrated_gathered_path_and_head():
    plan, model = _plan(["search.sparsity=0.5"])
    shape = model_shape(model)
    rate = Rate(0.001, 1e10, math.inf, "cpu", "test", math.inf, 0.002, 0.01, 5e9, 1e-6, 3e-6, 2e-6)
    kw = dict(batch=2, seq_len=32, num_samples=3, sparsity=0.5, replicas=1, nbytes=4)
    per_mask, step = step_seconds(shape, rate, scoring="gathered", objective="kl", **kw)
    expected = 0.01 + shape.layers * 0.002 + 0.5 * shape.prunable * 64 / 5e9 + 2 * 31 * 3e-6
    assert per_mask == pytest.approx(expected, rel=1e-12)
    teacher = shape.layers * 0.001 + shape.prunable * 64 / 1e10 + 2 * 31 * 2e-6
    assert step == pytest.approx(3 * expected + teacher, rel=1e-12)
    per_mask_ce, _ = step_seconds(shape, rate, scoring="gathered", objective="ce", **kw)
    assert per_mask - per_mask_ce == pytest.approx(2 * 31 * (3e-6 - 1e-6), rel=1e-9)
