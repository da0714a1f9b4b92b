"""The arithmetic of benchmarks/cost_model.py against hand-computed numbers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_model.py"


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("benchmarks_cost_model", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_parameter_counts_match_the_published_models(cm):
    # SmolLM2-135M: 134,515,008 parameters (tied embedding); LLaMA-2: 6,738,415,616 / 13,015,864,320 / 68,976,648,192
    assert cm.REFERENCE.total == 134_515_008
    assert cm.REFERENCE.matmul == 106_168_320 + 49152 * 576  # 30 layers x 3,538,944 + tied lm_head
    assert cm.MODELS["7B"].total == 6_738_415_616
    assert cm.MODELS["13B"].total == 13_015_864_320
    assert cm.MODELS["70B"].total == 68_976_648_192
    assert cm.MODELS["7B"].matmul == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096


def test_paper_budget_in_tokens(cm):
    assert cm.search_tokens(15000, 2, 8, 128) == 30_720_000


def test_hand_computed_hours(cm):
    # 1,000 tok/s on 100 M params -> 100 tok/s on 1 B; x1.5 fast path; 8 replicas:
    # 30.72e6 / (100 * 1.5 * 8) s = 25,600 s = 7.111 h
    tps = cm.scaled_tokens_per_second(1000.0, 100_000_000, 1_000_000_000)
    assert tps == pytest.approx(100.0)
    assert cm.search_hours(30_720_000, tps, 1.5, 8) == pytest.approx(25_600 / 3600)
    assert cm.search_hours(30_720_000, tps, 1.5, 0) == math.inf  # no replica fits


def test_flop_bound_and_speedup_modes(cm):
    assert cm.flop_bound(0.5, 1.0) == pytest.approx(2.0)
    assert cm.flop_bound(0.5, 0.8) == pytest.approx(1 / 0.6)
    shape = cm.MODELS["7B"]
    bound = cm.flop_bound(0.5, shape.prunable / shape.matmul)
    assert cm.model_speedup("bound", 0.5, None, 1.65, shape) == pytest.approx(bound)
    assert cm.model_speedup("measured", 0.5, 1.32, 1.65, shape) == pytest.approx(1.32)
    # scaled: efficiency 1.32 / 1.65 = 0.8 of the 7B bound
    assert cm.model_speedup("scaled", 0.5, 1.32, 1.65, shape) == pytest.approx(0.8 * bound)
    # measured above the reference's bound (dense-path overhead): efficiency capped at 1, so the 7B bound
    assert cm.model_speedup("scaled", 0.5, 1.74, 1.65, shape) == pytest.approx(bound)
    assert cm.model_speedup(1.7, 0.5, None, 1.65, shape) == 1.7
    with pytest.raises(ValueError, match="needs a measured speed-up"):
        cm.model_speedup("scaled", 0.5, None, 1.65, shape)


def test_replica_sizes_on_80gb_gpus(cm):
    # bf16: 7B ~ 13 GiB and 13B ~ 25 GiB fit one GPU; 70B ~ 130 GiB needs two of 72 usable GiB
    assert cm.replica_gpus(cm.MODELS["7B"], 80) == 1
    assert cm.replica_gpus(cm.MODELS["13B"], 80) == 1
    assert cm.replica_gpus(cm.MODELS["70B"], 80) == 2
    assert cm.replica_gpus(cm.MODELS["70B"], 40) == 4  # 134 GiB / 36 usable GiB -> 3.7 -> 4


def test_estimate_table(cm):
    ref = cm.REFERENCE.matmul
    rows = cm.estimate(
        ref_tps=1000.0,
        ref_params=ref,
        speedup_mode=2.0,
        sparsity=0.5,
        measured=None,
        ref_bound=1.65,
        gpus=[1, 8, 64],
        tokens=30_720_000,
        k=2,
        gpu_mem_gib=80,
        activation_gib=4,
        usable=0.9,
    )
    by = {r["model"]: r for r in rows}
    seven = by["7B"]
    tps = 1000.0 * ref / cm.MODELS["7B"].matmul
    assert seven["dense_tokens_per_s"] == pytest.approx(tps)
    assert seven["hours"][8] == pytest.approx(30_720_000 / (tps * 2.0 * 8) / 3600)
    assert seven["hours_k_capped"][64] == pytest.approx(30_720_000 / (tps * 2.0 * 2) / 3600)  # K=2 replicas busy
    assert by["70B"]["hours"][1] == math.inf  # one GPU cannot hold a 70B replica
    assert by["70B"]["hours"][64] == pytest.approx(by["70B"]["hours"][8] / 8)  # 32 vs 4 replicas
