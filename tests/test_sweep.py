"""Sweeps: trial configs, results table, Pareto front and best configs on hand-made tables; the Ray Tune smoke sweep
(4 trials of the tiny model on the shared 2-CPU Ray instance), its best config rerun, and an interrupted sweep resumed
from its trials' checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from probprune.config import SweepConfig, load_config
from probprune.errors import ConfigError, UserError
from probprune.sweep import (
    Grid,
    LogUniform,
    best_configs,
    best_per_sparsity,
    expand_grid,
    format_table,
    num_trials,
    pareto_front,
    plot_front,
    results_table,
    search_space,
    trial_config,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = ROOT / "configs" / "tiny" / "smoke_sweep.yaml"
PARAMS = ["search.lr", "search.sparsity", "search.masks_per_step"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- trial configs
def test_search_space_and_grid_expansion():
    sw = SweepConfig(lr=[0.01, 0.02], sparsity=[0.3, 0.5], grid={"search.masks_per_step": [2, 4, 8]}, num_samples=2)
    space = search_space(sw)
    assert space == {
        "search.lr": Grid((0.01, 0.02)),
        "search.sparsity": Grid((0.3, 0.5)),
        "search.masks_per_step": Grid((2, 4, 8)),
    }
    points = expand_grid(sw)
    assert len(points) == 12 and num_trials(sw) == 24
    assert points[0] == {"search.lr": 0.01, "search.sparsity": 0.3, "search.masks_per_step": 2}
    assert points[-1] == {"search.lr": 0.02, "search.sparsity": 0.5, "search.masks_per_step": 8}
    assert len({tuple(p.values()) for p in points}) == 12


def test_lr_range_is_log_uniform_and_counts_once():
    sw = SweepConfig(lr_range=[1e-3, 1e-1], sparsity=[0.3, 0.5, 0.7], num_samples=3)
    assert search_space(sw)["search.lr"] == LogUniform(1e-3, 1e-1)
    assert [p["search.sparsity"] for p in expand_grid(sw)] == [0.3, 0.5, 0.7]
    assert num_trials(sw) == 9
    assert num_trials(SweepConfig()) == 1  # nothing varied: one trial of the base config


def test_trial_config_fills_params_and_drops_sweep():
    base = load_config(SMOKE_SWEEP)
    cfg = trial_config(base, {"search.lr": 0.07, "search.sparsity": 0.25, "search.masks_per_step": 4, "seed": 3})
    assert (cfg.search.lr, cfg.search.sparsity, cfg.search.masks_per_step, cfg.seed) == (0.07, 0.25, 4, 3)
    assert cfg.sweep is None and base.sweep is not None and base.search.lr == 0.02
    with pytest.raises(UserError, match="sweep parameter 'search.lrr' is not a config key"):
        trial_config(base, {"search.lrr": 0.1})
    with pytest.raises(ConfigError, match="search.sparsity must be in \\(0, 1\\), got 1.5"):
        trial_config(base, {"search.sparsity": 1.5})


# ---------------------------------------------------------------------------------------------- the table
def _table() -> pd.DataFrame:
    """Eight trials; the front and the best trial per target are worked out by hand in the tests below."""
    rows = [  # trial, lr, target, num_samples, achieved prunable sparsity, held-out PPL, status
        ("t0", 0.01, 0.3, 2, 0.30, 50.0, "finished"),
        ("t1", 0.05, 0.3, 4, 0.30, 45.0, "finished"),
        ("t2", 0.01, 0.5, 2, 0.50, 120.0, "finished"),
        ("t3", 0.05, 0.5, 4, 0.49, 100.0, "finished"),
        ("t4", 0.02, 0.5, 2, 0.50, 130.0, "finished"),
        ("t5", 0.02, 0.4, 2, 0.40, 44.0, "finished"),
        ("t6", 0.02, 0.7, 2, math.nan, math.nan, "stopped"),
        ("t7", 0.05, 0.7, 2, 0.70, 10.0, "error"),  # not finished: never on the front, whatever its numbers
    ]
    df = pd.DataFrame(
        rows, columns=["trial_id", "lr", "sparsity", "search.masks_per_step", "prunable_sparsity", "ppl", "status"]
    )
    df["ppl_32"] = df["ppl"]
    df["total_sparsity"] = df["prunable_sparsity"] * 0.6
    df["dense_ppl"] = 30.0
    return df


def test_pareto_front_by_hand():
    # by prunable sparsity, highest first: .50 (t2 120, t4 130) -> t2; .49 t3 100 < 120 -> on; .40 t5 44 < 100 -> on;
    # .30 (t1 45, t0 50) >= 44 -> off (t5 prunes more and is better). t6 / t7 are not finished.
    front = pareto_front(_table())
    assert front["trial_id"].tolist() == ["t5", "t3", "t2"]
    assert front["prunable_sparsity"].tolist() == [0.40, 0.49, 0.50]
    assert front["ppl"].tolist() == [44.0, 100.0, 120.0]


def test_pareto_front_ties_and_empty():
    df = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c"],
            "prunable_sparsity": [0.5, 0.5, 0.3],
            "ppl": [10.0, 10.0, 10.0],
            "status": ["finished"] * 3,
        }
    )
    assert pareto_front(df)["trial_id"].tolist() == ["a"]  # b duplicates a; c prunes less at the same PPL
    assert pareto_front(df.assign(status="stopped")).empty


def test_best_per_sparsity_by_hand():
    best = best_per_sparsity(_table())
    assert best["sparsity"].tolist() == [0.3, 0.4, 0.5]  # 0.7: no finished trial
    assert best["trial_id"].tolist() == ["t1", "t5", "t3"]


def test_best_configs_load_with_load_config(tmp_path):
    base = load_config(SMOKE_SWEEP)
    paths = best_configs(_table(), base, PARAMS, tmp_path / "best")
    assert sorted(paths) == [0.3, 0.4, 0.5]
    assert paths[0.3].name == "sparsity_0.30.yaml"
    expect = {0.3: (0.05, 4), 0.4: (0.02, 2), 0.5: (0.05, 4)}  # t1, t5, t3
    for target, path in paths.items():
        cfg = load_config(path)
        assert (cfg.search.lr, cfg.search.sparsity, cfg.search.masks_per_step) == (
            *expect[target][:1],
            target,
            expect[target][1],
        )
        assert cfg.sweep is None
        assert (cfg.model, cfg.data, cfg.eval) == (base.model, base.data, base.eval)
        assert isinstance(cfg.search.masks_per_step, int)
        assert "probprune prune --config" in path.read_text().splitlines()[4]


def test_results_table_from_records():
    records = [
        {
            "trial_id": "b",
            "status": "finished",
            "params": {"search.lr": 0.1, "search.sparsity": 0.5},
            "metrics": {
                "final": True,
                "ppl": 12.0,
                "ppl_64": 9.0,
                "ppl_32": 12.0,
                "prunable_sparsity": 0.5,
                "total_sparsity": 0.3,
                "dense_ppl": 8.0,
                "init_ppl": 15.0,
                "params_total": 100,
                "step": 6,
                "calib_loss": 2.5,
                "wall_seconds": 3.0,
            },
        },
        # stopped early (ASHA): its last "ppl" is exp(calibration loss), not a held-out perplexity
        {
            "trial_id": "a",
            "status": "finished",
            "params": {"search.lr": 0.1, "search.sparsity": 0.3},
            "metrics": {"final": False, "ppl": 11.0, "step": 2, "calib_loss": 2.4},
        },
        {"trial_id": "c", "status": "error", "params": {"search.lr": 0.2, "search.sparsity": 0.3}, "metrics": {}},
    ]
    df = results_table(records, ["search.lr", "search.sparsity"])
    assert df.columns[:7].tolist() == ["trial_id", "status", "lr", "sparsity", "ppl", "ppl_32", "ppl_64"]
    assert df["trial_id"].tolist() == ["a", "b", "c"]  # sorted by lr, then sparsity
    assert df["status"].tolist() == ["stopped", "finished", "error"]
    b = df.set_index("trial_id").loc["b"]
    assert (b["ppl"], b["ppl_32"], b["ppl_64"], b["prunable_sparsity"], b["dense_ppl"]) == (12.0, 12.0, 9.0, 0.5, 8.0)
    assert math.isnan(df.set_index("trial_id").loc["a", "ppl"])
    assert pareto_front(df)["trial_id"].tolist() == ["b"]


def test_write_results(tmp_path):
    df = _table()
    out = write_results(df, load_config(SMOKE_SWEEP), PARAMS, tmp_path / "out", experiment_path="/x/y")
    assert pd.read_csv(out.csv)["trial_id"].tolist() == df["trial_id"].tolist()
    assert out.png.read_bytes()[:8] == PNG_MAGIC
    md = out.markdown.read_text()
    assert "| t5 | 0.02 | 0.4 | 2 | 40.0% | 24.0% | 44.00 |" in md
    assert md.index("## Pareto front") < md.index("| t5 |") < md.index("## All trials")
    assert "non-overlapping windows" in md and "Dense model: PPL 30.00" in md
    assert sorted(out.best) == [0.3, 0.4, 0.5]
    assert format_table(df.iloc[:0], PARAMS).count("\n") == 1  # header only
    assert plot_front(df.iloc[:0], df.iloc[:0], tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------- Ray Tune
def _assert_is_front(df: pd.DataFrame, front: pd.DataFrame) -> None:
    """Independent check: no finished trial beats a front row on both counts; every other one is beaten by one."""
    done = df[df["status"] == "finished"]

    def beats(a, b) -> bool:
        return (
            a["prunable_sparsity"] >= b["prunable_sparsity"]
            and a["ppl"] <= b["ppl"]
            and (a["prunable_sparsity"] > b["prunable_sparsity"] or a["ppl"] < b["ppl"])
        )

    on = set(front["trial_id"])
    assert on
    for _, f in front.iterrows():
        assert not any(beats(r, f) for _, r in done.iterrows())
    for _, r in done[~done["trial_id"].isin(on)].iterrows():
        assert any(
            beats(f, r) or (f["prunable_sparsity"], f["ppl"]) == (r["prunable_sparsity"], r["ppl"])
            for _, f in front.iterrows()
        )


@pytest.fixture(scope="module")
def smoke_sweep(ray_cluster, tmp_path_factory):
    """The --smoke-test sweep (2 lrs x 2 sparsities) on the shared Ray instance, run as ``probprune sweep``:
    (config, output folder, table)."""
    import contextlib
    import io

    from probprune.cli import main

    tmp = tmp_path_factory.mktemp("sweep")
    overrides = [f"sweep.storage_path={tmp / 'tune'}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["sweep", "--config", str(SMOKE_SWEEP), "--output", str(tmp / "out"), "--smoke-test", *overrides])
    assert rc == 0, printed.getvalue()
    assert "Pareto front" in printed.getvalue() and "4 trials (4 finished)" in printed.getvalue()
    return load_config(SMOKE_SWEEP, overrides), tmp / "out", pd.read_csv(tmp / "out" / "results.csv")


@pytest.mark.ray
def test_smoke_sweep_results(smoke_sweep):
    cfg, out, df = smoke_sweep
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 4 and (csv["status"] == "finished").all()
    for col in (
        "lr",
        "sparsity",
        "ppl",
        "ppl_32",
        "ppl_64",
        "prunable_sparsity",
        "total_sparsity",
        "dense_ppl",
        "checkpoint",
    ):
        assert col in csv.columns, col
    assert sorted(zip(csv["lr"], csv["sparsity"])) == [(0.01, 0.3), (0.01, 0.5), (0.05, 0.3), (0.05, 0.5)]
    assert (csv["ppl"] == csv["ppl_32"]).all() and (csv["steps"] == cfg.search.steps).all()
    assert csv["ppl"].between(1, 1e5).all() and csv["dense_ppl"].nunique() == 1
    for target, achieved in zip(csv["sparsity"], csv["prunable_sparsity"]):
        assert abs(achieved - target) < 0.05  # per-type budget on the tiny model: within one unit of the target
    # each finished trial's Tune checkpoint holds its run's summary, with the numbers the table reports
    for _, row in csv.iterrows():
        summary = json.loads((Path(row["checkpoint"]) / "summary.json").read_text())
        assert summary["pruned_ppl"]["32"] == pytest.approx(row["ppl"], rel=1e-9)
        assert summary["search"]["lr"] == row["lr"] and (Path(row["checkpoint"]) / "masks.pt").exists()
    front = pareto_front(csv)
    _assert_is_front(csv, front)
    md = (out / "pareto.md").read_text()
    for tid in front["trial_id"]:
        assert f"| {tid} |" in md.split("## All trials")[0]
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.ray
def test_smoke_sweep_best_config_loads_and_runs(smoke_sweep, tmp_path):
    from probprune.pipeline import prune

    cfg, out, df = smoke_sweep
    best = best_per_sparsity(df)
    paths = sorted((out / "best").glob("sparsity_*.yaml"))
    assert [p.name for p in paths] == ["sparsity_0.30.yaml", "sparsity_0.50.yaml"]
    row = best[best["sparsity"] == 0.5].iloc[0]
    best_cfg = load_config(out / "best" / "sparsity_0.50.yaml")
    assert (best_cfg.search.lr, best_cfg.search.sparsity, best_cfg.sweep) == (row["lr"], 0.5, None)
    summary = prune(best_cfg, tmp_path / "rerun", progress=False)
    assert (tmp_path / "rerun" / "model" / "config.json").exists()
    assert summary["sparsity"]["prunable"] == pytest.approx(row["prunable_sparsity"])
    assert summary["pruned_ppl"]["32"] == pytest.approx(row["ppl"], rel=1e-4)  # the same search, rerun as is


@pytest.mark.ray
def test_interrupted_sweep_resumes_from_checkpoints(smoke_sweep, tmp_path, capfd):
    from probprune.engine.ray.tune import run_sweep

    _, _, smoke_df = smoke_sweep
    cfg = load_config(
        SMOKE_SWEEP, [f"sweep.storage_path={tmp_path / 'tune'}", "sweep.lr=[0.05]", "sweep.sparsity=[0.5]"]
    )
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no sweep to resume at"):
        run_sweep(cfg, out, resume=True, smoke=True)
    first = run_sweep(cfg, out, smoke=True, stop_after=3)  # every trial fails after checkpointing step 3
    assert first["status"].tolist() == ["error"] and first["steps"].tolist() == [3]
    with pytest.raises(UserError, match="exists already; pass --resume"):
        run_sweep(cfg, tmp_path / "out", smoke=True)
    with pytest.raises(UserError, match="the config differs from the one this sweep started with"):
        run_sweep(
            load_config(
                SMOKE_SWEEP,
                [
                    f"sweep.storage_path={tmp_path / 'tune'}",
                    "sweep.lr=[0.05]",
                    "sweep.sparsity=[0.5]",
                    "search.steps=7",
                ],
            ),
            out,
            resume=True,
            smoke=True,
        )
    capfd.readouterr()
    resumed = run_sweep(cfg, out, resume=True, smoke=True)
    printed = "".join(capfd.readouterr())
    assert "FileNotFoundError" not in printed and "Traceback" not in printed, printed[-3000:]  # a clean resume
    assert resumed["status"].tolist() == ["finished"]
    summary = json.loads((Path(resumed["checkpoint"][0]) / "summary.json").read_text())
    assert summary["search"]["resumed_from_step"] == 3
    reference = smoke_df[(smoke_df["lr"] == 0.05) & (smoke_df["sparsity"] == 0.5)].iloc[0]
    assert resumed["ppl"][0] == pytest.approx(reference["ppl"], rel=1e-6)  # resumed == uninterrupted search


def test_sweep_user_errors(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import importlib.util

    from probprune.engine.ray.tune import run_sweep

    with pytest.raises(UserError, match="the config has no 'sweep' section"):
        run_sweep(load_config(ROOT / "configs" / "tiny" / "smoke.yaml"), tmp_path / "a")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(UserError, match=r"sweep.search_alg='optuna' needs Optuna: pip install 'probprune\[optuna\]'"):
        run_sweep(load_config(SMOKE_SWEEP, ["sweep.search_alg=optuna"]), tmp_path / "b")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="search.baseline='loo' requires search.masks_per_step >= 2, got 1"):
        run_sweep(
            load_config(SMOKE_SWEEP, ["search.baseline=loo", "sweep.grid={search.masks_per_step: [1, 2]}"]),
            tmp_path / "c",
        )


def test_sweep_job_cli_errors(capsys):
    import importlib

    job = importlib.import_module("ray_jobs.sweep") if (ROOT / "ray_jobs" / "__init__.py").exists() else None
    if job is None:
        import importlib.util as iu

        spec = iu.spec_from_file_location("sweep_job", ROOT / "ray_jobs" / "sweep.py")
        job = iu.module_from_spec(spec)
        spec.loader.exec_module(job)
    assert job.main(["--config", str(ROOT / "configs" / "tiny" / "smoke.yaml"), "--output", "/nonexistent/x"]) == 2
    assert "probprune: error: the config has no 'sweep' section" in capsys.readouterr().err
    assert job.main(["--config", str(SMOKE_SWEEP), "--output", "/tmp/x", "sweep.lrr=[1]"]) == 2
    assert "unknown config key 'sweep.lrr' (did you mean 'sweep.lr'?)" in capsys.readouterr().err
