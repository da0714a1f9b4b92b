"""Ray Tune sweeps: one trial is one whole search (:func:`probprune.pipeline.prune` in the trial's own folder).

  run_sweep(cfg) ──> Tuner(with_resources(trial, PlacementGroupFactory), TuneConfig(metric="ppl", mode="min"), …)
      trial(params): pipeline.prune(base + params) in the trial's own folder
          every sweep.report_every steps: tune.report({calib_loss, ppl = exp(calib_loss), …}, checkpoint=search ckpt)
          at the end:                    tune.report({ppl = held-out PPL, ppl_<len>, sparsities, …, final=True})
  results ──> sweep.results_table / write_results: results.csv, pareto.md, pareto.png, best/sparsity_<t>.yaml

The Ray-free half (the grid, trial configs, the results table, the Pareto front) is :mod:`probprune.sweep`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from ... import pipeline
from ... import sweep as sweeps
from ...config import Config, SweepConfig, config_from_dict, config_to_dict, load_config, save_config
from ...errors import UserError
from ...run_folder import SMALL_FILES, SUMMARY
from ...sweep import Grid, num_trials, shown_path, trial_config
from .cluster import connect, is_local_instance

if TYPE_CHECKING:
    import pandas as pd
    from ray.tune import PlacementGroupFactory

__all__ = ["run_sweep", "trial_resources"]

log = logging.getLogger(__name__)

_RUN_DIR = "run"  # the trial's pipeline.prune output, inside the trial's own folder


def trial_resources(cfg: Config, sw: SweepConfig) -> PlacementGroupFactory:
    """The placement group of one trial: ``{CPU: trial_cpus, GPU: trial_gpus}`` for the search itself, plus one
    ``{CPU: cpus_per_actor, GPU: gpus_per_actor}`` bundle per actor when the trial scores masks on Ray actors
    (``engine.kind=ray``); the actors it starts are placed in those bundles (Tune captures child tasks)."""
    from ray import tune

    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0} or {"CPU": 0.01}

    bundles = [bundle(sw.trial_cpus, sw.trial_gpus)]
    if cfg.engine.kind == "ray":
        e = cfg.engine
        bundles += [bundle(e.cpus_per_actor, e.gpus_per_actor) for _ in range(e.num_actors)]
    return tune.PlacementGroupFactory(bundles)


class _TuneReporter:
    """``on_step`` hook of a trial: every ``report_every`` steps, ``tune.report`` the mean calibration loss of the
    steps since the last report (and ``ppl`` = its exp, the metric Tune and ASHA compare mid-search), with the
    search's checkpoint attached when a newer one was written since the last attached one."""

    def __init__(self, run_dir: Path, steps: int, checkpoint_every: int, report_every: int, t0: float):
        self.run_dir, self.steps, self.ckpt_every, self.every, self.t0 = (
            run_dir,
            steps,
            checkpoint_every,
            report_every,
            t0,
        )
        self.window: list[float] = []
        self.fresh = False
        self.stats: dict[str, Any] = {}
        self.last: dict[str, Any] = {}

    def __call__(self, stats: dict[str, Any]) -> None:
        step = int(stats["step"])
        self.stats = stats
        if math.isfinite(stats["loss_mean"]):
            self.window.append(float(stats["loss_mean"]))
        if step % self.ckpt_every == 0 or step == self.steps:  # run_search has just written its checkpoint
            self.fresh = True
        if step % self.every == 0:
            self.report(stats)

    def report(self, stats: dict[str, Any], force_checkpoint: bool = False) -> None:
        """Report the steps since the last report (the last reported loss again if there were none)."""
        loss = float(np.mean(self.window)) if self.window else self.last.get("calib_loss", float("nan"))
        self.window = []
        self.last = {
            "step": int(stats["step"]),
            "calib_loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "baseline": float(stats["baseline"]),
            "expected_sparsity": float(stats["expected_sparsity"]),
            "lr_now": float(stats["lr"]),
            "final": False,
            "wall_seconds": time.perf_counter() - self.t0,
        }
        _report(self.last, self.run_dir if self.fresh or force_checkpoint else None)
        self.fresh = False


def _remove_stale_checkpoint_dirs() -> None:
    """Delete ``$TMPDIR/probprune-ckpt-<pid>-*`` folders whose process is gone (a trial killed while reporting)."""
    for p in Path(tempfile.gettempdir()).glob("probprune-ckpt-*-*"):
        pid = p.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def _report(metrics: dict[str, Any], run_dir: Path | None) -> None:
    """``tune.report`` with, if ``run_dir`` is given, its small files as the checkpoint (Tune copies them to storage)."""
    from ray import tune

    if run_dir is None:
        tune.report(metrics)
        return
    _remove_stale_checkpoint_dirs()
    with tempfile.TemporaryDirectory(prefix=f"probprune-ckpt-{os.getpid()}-") as tmp:
        for name in SMALL_FILES:  # a trial's Tune checkpoint: never the pruned model's weights
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, Path(tmp) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _final_metrics(summary: dict[str, Any], t0: float, calib_loss: float) -> dict[str, Any]:
    by_len = {int(k): float(v) for k, v in summary["pruned_ppl"].items()}
    short = min(by_len)
    return {
        "step": int(summary["search"]["steps"]),
        "calib_loss": calib_loss,
        "ppl": by_len[short],
        **{f"ppl_{n}": v for n, v in sorted(by_len.items())},
        "prunable_sparsity": float(summary["sparsity"]["prunable"]),
        "total_sparsity": float(summary["sparsity"]["total"]),
        "dense_ppl": float(summary["dense_ppl"][str(short)]),
        "init_ppl": float(summary["init_ppl"][str(short)]) if summary.get("init_ppl") else float("nan"),
        "params_total": int(summary["params"]["pruned_total"]),
        "final": True,
        "wall_seconds": time.perf_counter() - t0,
    }


def _trial_work_dir() -> Path:
    """The trial's own working folder on the node it runs on (where Tune chdirs a trial to).

    Not ``tune.get_context().get_trial_dir()``: on the driver's node that folder is synced to the storage with the
    experiment state, and the pruned weights written there would be copied (and raced) for nothing; what a trial
    keeps goes through its :class:`tune.Checkpoint` instead.
    """
    try:
        from ray.train._internal.session import get_session  # Ray 2.x: no public accessor of the working dir

        return Path(get_session().storage.trial_working_directory)
    except Exception:
        return Path(tempfile.mkdtemp(prefix="probprune-trial-"))


def _make_trainable(base: dict[str, Any], sw: SweepConfig, stop_after: int | None):
    """The function trainable of a sweep: one ``pipeline.prune`` of ``base`` + the trial's parameters."""

    def probprune_trial(config: dict[str, Any]) -> None:
        from ray import tune

        t0 = time.perf_counter()
        cfg = trial_config(config_from_dict(base), config)
        # one torch thread per CPU of the trial: more threads than cores stalls forwards on a busy node
        torch.set_num_threads(max(1, int(sw.trial_cpus)))
        run_dir = _trial_work_dir() / _RUN_DIR
        shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of a failed attempt; the checkpoint is the truth
        checkpoint = tune.get_checkpoint()
        resume = checkpoint is not None
        if resume:
            with checkpoint.as_directory() as d:
                shutil.copytree(d, run_dir)
        if resume and (run_dir / SUMMARY).exists():  # finished before the interruption: report it again
            summary = json.loads((run_dir / SUMMARY).read_text())
            _report(_final_metrics(summary, t0, float("nan")), None)
            return
        reporter = _TuneReporter(run_dir, cfg.search.steps, cfg.search.checkpoint_every, sw.report_every, t0)
        summary = pipeline.prune(
            cfg, run_dir, resume=resume, progress=False, on_step=reporter, stop_after=None if resume else stop_after
        )
        if "interrupted_at_step" in summary:  # simulated interruption (tests): checkpoint, then fail the trial
            step = summary["interrupted_at_step"]
            if reporter.stats:
                reporter.report(reporter.stats, force_checkpoint=True)
            raise RuntimeError(f"trial stopped after step {step} (run_sweep(stop_after={stop_after}))")
        _report(_final_metrics(summary, t0, reporter.last.get("calib_loss", float("nan"))), run_dir)
        shutil.rmtree(run_dir / "model", ignore_errors=True)  # weights: rerun the best config to keep a model

    return probprune_trial


def _tune_space(space: Mapping[str, Any], search_alg: str) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, dom in space.items():
        if isinstance(dom, Grid):
            if search_alg == "optuna":
                bad = [v for v in dom.values if not isinstance(v, (bool, int, float, str, type(None)))]
                if bad:
                    raise UserError(
                        f"sweep.search_alg='optuna' needs scalar values, but {key} has {bad!r}; "
                        "use sweep.search_alg=grid"
                    )
                out[key] = tune.choice(list(dom.values))
            else:
                out[key] = tune.grid_search(list(dom.values))
        else:
            out[key] = tune.loguniform(dom.low, dom.high)
    return out


def _storage(sw: SweepConfig) -> str:
    return sw.storage_path if "://" in sw.storage_path else str(Path(sw.storage_path).expanduser().resolve())


def _records(results) -> list[dict[str, Any]]:

    records = []
    for r in results:
        m = dict(r.metrics or {})
        status = "error" if r.error is not None else ("finished" if m.get("final") else "stopped")
        records.append(
            {
                "trial_id": m.get("trial_id") or Path(r.path).name,
                "status": status,
                "params": dict(r.config or {}),
                "metrics": m,
                "checkpoint": shown_path(r.checkpoint.path) if r.checkpoint is not None else None,
            }
        )
    return records


def run_sweep(
    cfg: Config,
    output_dir: str | Path,
    address: str | None = None,
    smoke: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
) -> pd.DataFrame:
    """Run (or resume) a Ray Tune sweep of ``cfg.sweep`` and write its results under ``output_dir``.

    Each trial is one :func:`probprune.pipeline.prune` of ``cfg`` (``sweep`` section removed) with the trial's
    parameters (:func:`probprune.sweep.search_space`: ``search.lr``, ``search.sparsity``, ``sweep.grid`` keys), run in
    the trial's own folder (``<trial dir>/run``). Every ``sweep.report_every`` steps it reports ``calib_loss`` (mean
    calibration loss since the last report), ``ppl`` = exp(calib_loss), ``step``, ``expected_sparsity``, with the
    search's checkpoint attached as a :class:`ray.tune.Checkpoint`; its final report carries the held-out ``ppl``
    (shortest window), ``ppl_<len>``, ``prunable_sparsity``, ``total_sparsity``, ``dense_ppl``, ``init_ppl`` and
    ``final=True``, with ``summary.json`` and ``masks.pt`` in its checkpoint (the pruned weights are not kept: rerun
    the best config for them).

    Tune: ``TuneConfig(metric="ppl", mode="min", num_samples, max_concurrent_trials)``; ``search_alg=grid`` runs the
    grid ``num_samples`` times, ``optuna`` lets Optuna (TPE, seeded with ``cfg.seed``) pick as many trials
    (:func:`~probprune.sweep.num_trials`); ``scheduler=asha`` stops trials early on their calibration loss (it
    compares all running trials, so sweep one sparsity at a time with it). Resources per trial:
    :func:`trial_resources`. Experiment: ``<sweep.storage_path>/<output_dir name>`` (``tune.RunConfig``).

    Args:
        cfg: a config with a ``sweep`` section.
        output_dir: where ``results.csv``, ``pareto.md``, ``pareto.png``, ``best/sparsity_<t>.yaml`` and
            ``sweep_config.yaml`` (the config as given) go; its folder name names the Tune experiment.
        address: Ray to join (``"auto"``, ``"host:port"``); None: ``RAY_ADDRESS``, else a new local instance (shut
            down at the end). An already connected process keeps its connection.
        smoke: quiet Tune output (tests, ``--smoke-test``).
        resume: continue the interrupted sweep of the same output folder (``Tuner.restore``): unfinished and
            errored trials restart from their last checkpoint, finished ones are kept.
        stop_after: make every trial that does not resume from a checkpoint fail right after checkpointing this
            many steps (simulates an interrupted sweep; tests only).

    Returns:
        The results table (:func:`probprune.sweep.results_table`): one row per trial.

    Raises:
        UserError: no ``sweep`` section; ``search_alg=optuna`` without Optuna installed; the experiment folder
            exists already (without ``resume``), holds nothing to resume or was started with another config (with
            it).
        ConfigError: a grid point makes an invalid config (checked for every point before Ray starts).
    """
    from ray import tune

    sw = sweeps._require(cfg.sweep)
    output_dir = Path(output_dir).resolve()
    base = sweeps.absolute_paths(cfg)
    space = sweeps.search_space(sw)
    if sw.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise UserError(
            "sweep.search_alg='optuna' needs Optuna: pip install 'probprune[optuna]' (or set sweep.search_alg=grid)"
        )
    if sw.scheduler == "asha" and len(sw.sparsity) > 1:
        log.warning(
            "sweep.scheduler='asha' compares the calibration loss of all running trials: it will stop trials "
            "with higher sparsity targets first; sweep one sparsity at a time to compare learning rates"
        )
    for point in sweeps.expand_grid(sw):  # every grid point must make a valid config before anything starts
        sweeps.trial_config(base, {k: (v.low if isinstance(v, sweeps.LogUniform) else v) for k, v in point.items()})
    name = output_dir.name
    storage = _storage(sw)
    exp_path = f"{storage.rstrip('/')}/{name}"
    if not resume and "://" not in storage and Path(exp_path).exists() and any(Path(exp_path).iterdir()):
        raise UserError(
            f"sweep experiment {exp_path} exists already; pass --resume to continue it, or choose "
            "another --output (its folder name names the experiment) or sweep.storage_path"
        )
    if resume and not tune.Tuner.can_restore(exp_path):
        raise UserError(f"--resume: no sweep to resume at {exp_path} (sweep.storage_path / the --output folder name)")
    if not resume and (output_dir / "results.csv").exists():
        raise UserError(f"--output {output_dir} already holds sweep results (results.csv); choose another folder")
    record = output_dir / "sweep_config.yaml"  # the config the sweep started with; a resumed sweep must match it
    if resume and record.exists() and config_to_dict(load_config(record)) != config_to_dict(cfg):
        raise UserError(
            f"--resume: the config differs from the one this sweep started with ({record}); resume "
            "with the same config and overrides"
        )
    save_config(cfg, record)

    base_dict = config_to_dict(base)
    trainable = tune.with_resources(
        _make_trainable(base_dict, sw, stop_after),
        lambda params: trial_resources(sweeps.trial_config(config_from_dict(base_dict), params), sw),
    )
    # two checkpoints kept per trial force an experiment snapshot per report on a tiny model; that is intended
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    local = is_local_instance(address)
    owns = connect(address)
    try:
        if owns and local:
            log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_tune_space(space, sw.search_alg),
                tune_config=tune.TuneConfig(
                    metric="ppl",
                    mode="min",
                    num_samples=_tune_samples(sw),
                    max_concurrent_trials=sw.max_concurrent or None,
                    scheduler=_scheduler(cfg, sw),
                    search_alg=_search_alg(cfg, sw),
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    verbose=0 if smoke else 1,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        results = tuner.fit()
    finally:
        if owns:
            ray.shutdown()
    df = sweeps.results_table(_records(results), list(space))
    sweeps.write_results(df, cfg, list(space), output_dir, experiment_path=exp_path)
    return df


def _tune_samples(sw: SweepConfig) -> int:

    # grid: Tune repeats the whole grid num_samples times; a searcher gets the same number of trials in all
    return sw.num_samples if sw.search_alg == "grid" else num_trials(sw)


def _scheduler(cfg: Config, sw: SweepConfig):
    if sw.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    reports = cfg.search.steps // sw.report_every + 1  # + the final, held-out report
    return ASHAScheduler(
        time_attr="training_iteration", max_t=reports, grace_period=max(1, (reports - 1) // 4), reduction_factor=2
    )


def _search_alg(cfg: Config, sw: SweepConfig):
    if sw.search_alg != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.seed)
