"""Sweeps without Ray: trial configs from a :class:`~probprune.config.SweepConfig`, the results table, its Pareto front,
a plot, and the best trial's config per sparsity target.

Ray Tune runs the trials (:func:`probprune.engine.ray.tune.run_sweep`); everything here is plain Python, pandas and
matplotlib, so it is unit-tested on hand-made tables and reused on any table of finished trials::

    SweepConfig ──search_space()──> {dotted key: Grid | LogUniform}  ──(Tune param_space)──> one search per point
    per-trial records ──results_table()──> DataFrame ──pareto_front()──> front (prunable sparsity vs held-out PPL)
                                                      ├─ write_results(): results.csv, pareto.md, pareto.png
                                                      └─ best_configs(): best/sparsity_0.30.yaml (runs as is)

Trial parameters are dotted config keys (``search.lr``, ``search.sparsity``, ``search.masks_per_step``, …); the table
names the first two ``lr`` and ``sparsity`` (the *target* sparsity; ``prunable_sparsity`` is what the final mask
removed). ``ppl`` is the held-out perplexity at the shortest evaluation window (``ppl_<len>`` for every window).

Example:
    >>> from probprune.config import SweepConfig
    >>> sw = SweepConfig(lr=[0.01, 0.02], sparsity=[0.3, 0.5])
    >>> num_trials(sw), expand_grid(sw)[0]
    (4, {'search.lr': 0.01, 'search.sparsity': 0.3})
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .config import Config, SweepConfig, config_from_dict, config_to_dict
from .errors import UserError
from .files import write_atomic, write_text_atomic

__all__ = [
    "Grid",
    "LogUniform",
    "LR_KEY",
    "SPARSITY_KEY",
    "search_space",
    "expand_grid",
    "num_trials",
    "trial_config",
    "absolute_paths",
    "column_name",
    "results_table",
    "pareto_front",
    "best_per_sparsity",
    "best_configs",
    "format_table",
    "plot_front",
    "write_results",
    "SweepOutputs",
    "shown_path",
]

LR_KEY = "search.lr"
SPARSITY_KEY = "search.sparsity"
# Table columns of the two main parameters (every other parameter keeps its dotted key as its column name).
_SHORT = {LR_KEY: "lr", SPARSITY_KEY: "sparsity"}
FINISHED = "finished"


# ---------------------------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Grid:
    """Every value is tried (Tune: ``grid_search``; Optuna: a categorical choice)."""

    values: tuple


@dataclass(frozen=True)
class LogUniform:
    """A value drawn log-uniformly from ``[low, high]`` for each trial (Tune: ``loguniform``)."""

    low: float
    high: float


def _require(sw: SweepConfig | None) -> SweepConfig:
    if sw is None:
        raise UserError(
            "the config has no 'sweep' section; add one with sweep.lr and sweep.sparsity lists "
            "(see configs/smollm2/135m_sweep.yaml)"
        )
    return sw


def search_space(sw: SweepConfig) -> dict[str, Grid | LogUniform]:
    """The trial parameters, dotted config key -> :class:`Grid` or :class:`LogUniform`, in a fixed order.

    ``search.lr`` comes from ``sweep.lr`` (a grid) or ``sweep.lr_range`` (log-uniform), ``search.sparsity`` from
    ``sweep.sparsity``, then every ``sweep.grid`` key. An empty list leaves that value at the base config's.
    """
    space: dict[str, Grid | LogUniform] = {}
    if sw.lr_range is not None:
        space[LR_KEY] = LogUniform(float(sw.lr_range[0]), float(sw.lr_range[1]))
    elif sw.lr:
        space[LR_KEY] = Grid(tuple(sw.lr))
    if sw.sparsity:
        space[SPARSITY_KEY] = Grid(tuple(sw.sparsity))
    for key, values in sw.grid.items():
        space[key] = Grid(tuple(values))
    return space


def expand_grid(sw: SweepConfig) -> list[dict[str, Any]]:
    """The grid points (one sample each), first key slowest; a :class:`LogUniform` key keeps its distribution.

    Example:
        >>> expand_grid(SweepConfig(lr_range=[1e-3, 1e-1], sparsity=[0.3, 0.5]))[1]
        {'search.lr': LogUniform(low=0.001, high=0.1), 'search.sparsity': 0.5}
    """
    space = search_space(sw)
    axes = [v.values if isinstance(v, Grid) else (v,) for v in space.values()]
    return [dict(zip(space, point)) for point in itertools.product(*axes)]


def num_trials(sw: SweepConfig) -> int:
    """Trials a sweep runs: ``num_samples`` x the grid size (a log-uniform lr counts once), for both search
    algorithms (Optuna gets the same budget as the grid)."""
    return sw.num_samples * len(expand_grid(sw))


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """The run config of one trial: ``base`` with the ``sweep`` section removed and ``params`` (dotted keys) set.

    Raises:
        ConfigError: a parameter is not a config key or its value breaks a rule (e.g. ``search.baseline=loo`` with
            ``search.masks_per_step=1``).
    """
    data = config_to_dict(base)
    data["sweep"] = None
    for key, value in params.items():
        section, _, name = key.rpartition(".")
        node = data[section] if section else data
        if not isinstance(node, dict) or name not in node:
            raise UserError(f"sweep parameter {key!r} is not a config key")
        node[name] = value
    return config_from_dict(data)


def absolute_paths(cfg: Config, root: str | Path | None = None) -> Config:
    """``cfg`` with relative local paths (model folder, data files) made absolute against ``root`` (default: cwd).

    Tune trials may run in another working directory (they chdir into their trial folder) or on another node.
    """
    root = Path(root or os.getcwd()).resolve()
    data = config_to_dict(cfg)

    def fix(p: str) -> str:
        return str(root / p) if p and not os.path.isabs(p) and (root / p).exists() else p

    data["model"]["name_or_path"] = fix(data["model"]["name_or_path"])
    data["data"]["paths"] = [fix(p) for p in data["data"]["paths"]]
    data["data"]["test_paths"] = [fix(p) for p in data["data"]["test_paths"]]
    return config_from_dict(data)


# ---------------------------------------------------------------------------------------------------- the table
def _is_ppl_col(name: Any) -> bool:
    """``ppl_<len>``: held-out perplexity at one window length."""
    return isinstance(name, str) and name.startswith("ppl_") and name[4:].isdigit()


def column_name(key: str) -> str:
    """Table column of a trial parameter: ``search.lr`` -> ``lr``, ``search.sparsity`` -> ``sparsity``, else the key."""
    return _SHORT.get(key, key)


def results_table(records: Iterable[Mapping[str, Any]], param_keys: Sequence[str]) -> pd.DataFrame:
    """One row per trial, from records ``{"trial_id", "status", "params": {dotted: value}, "metrics": {...}}``.

    ``metrics`` is the trial's last report (see :func:`probprune.engine.ray.tune.run_sweep`): a finished trial's has
    ``final=True``, ``ppl_<len>`` (held-out PPL per window), ``prunable_sparsity``, ``total_sparsity``, ``dense_ppl``,
    ``init_ppl``, ``params_total``, ``wall_seconds``; every report has ``step`` and ``calib_loss``.

    Columns: ``trial_id``, ``status`` (``finished`` / ``stopped`` / ``error`` / …), one per parameter (``lr``,
    ``sparsity``, grid keys), ``ppl`` (held-out, shortest window; NaN unless finished), ``ppl_<len>``,
    ``prunable_sparsity``, ``total_sparsity``, ``dense_ppl``, ``init_ppl``, ``params_total``, ``steps``,
    ``calib_loss`` (last reported), ``wall_seconds``, ``checkpoint`` (the trial's last Tune checkpoint: a finished
    trial's holds its ``summary.json`` and ``masks.pt``; only when records have it). Sorted by parameters, then trial id.
    """
    rows = []
    for rec in records:
        m = dict(rec.get("metrics") or {})
        final = bool(m.get("final"))
        status = rec.get("status", FINISHED if final else "unknown")
        if status == FINISHED and not final:
            status = "stopped"  # e.g. by ASHA: its last report is a calibration value, not a held-out PPL
        row: dict[str, Any] = {"trial_id": rec["trial_id"], "status": status}
        for key in param_keys:
            row[column_name(key)] = rec["params"].get(key)
        by_len = {int(k[4:]): float(v) for k, v in m.items() if _is_ppl_col(k)} if final else {}
        row["ppl"] = by_len[min(by_len)] if by_len else math.nan
        for n in sorted(by_len):
            row[f"ppl_{n}"] = by_len[n]
        for key in ("prunable_sparsity", "total_sparsity", "dense_ppl", "init_ppl", "params_total"):
            row[key] = float(m[key]) if final and m.get(key) is not None else math.nan
        row["steps"] = m.get("step", math.nan)
        row["calib_loss"] = m.get("calib_loss", math.nan)
        row["wall_seconds"] = m.get("wall_seconds", math.nan)
        if "checkpoint" in rec:
            row["checkpoint"] = rec["checkpoint"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["trial_id", "status", *map(column_name, param_keys), "ppl"])
    ppl_cols = sorted((c for c in df.columns if _is_ppl_col(c)), key=lambda c: int(c[4:]))
    front = ["trial_id", "status", *map(column_name, param_keys), "ppl", *ppl_cols]
    df = df[front + [c for c in df.columns if c not in front]]
    sort = [column_name(k) for k in param_keys if df[column_name(k)].notna().all()] + ["trial_id"]
    return df.sort_values(sort, kind="stable").reset_index(drop=True)


def _finished(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    ok = df[x].notna() & df[y].notna()
    if "status" in df:
        ok &= df["status"] == FINISHED
    return df[ok]


def pareto_front(df: pd.DataFrame, x: str = "prunable_sparsity", y: str = "ppl") -> pd.DataFrame:
    """The finished trials no other trial beats on both counts: higher (or equal) ``x`` AND lower (or equal) ``y``.

    Among trials with the same ``x`` only the lowest ``y`` can be on the front; exact duplicates count once (the first
    row). Rows without ``x`` / ``y`` or whose status is not ``finished`` are ignored.

    Returns:
        The front's rows (original columns, original index), sorted by ``x`` ascending.
    """
    done = _finished(df, x, y)
    order = done.sort_values([x, y], ascending=[False, True], kind="stable")
    keep, best = [], math.inf
    for idx, y_val in zip(order.index, order[y]):
        if y_val < best:
            keep.append(idx)
            best = y_val
    return done.loc[keep].sort_values(x, kind="stable")


def best_per_sparsity(df: pd.DataFrame, target: str = "sparsity", y: str = "ppl") -> pd.DataFrame:
    """For each sparsity target, the finished trial with the lowest ``y`` (ties: the first row). Sorted by target."""
    done = _finished(df, target, y)
    if done.empty:
        return done
    idx = done.groupby(target, sort=True)[y].idxmin()
    return done.loc[idx.values]


def best_configs(df: pd.DataFrame, base: Config, param_keys: Sequence[str], folder: str | Path) -> dict[float, Path]:
    """Write the best trial's config for each sparsity target as ``folder/sparsity_<target>.yaml``.

    Each file is ``base`` with the ``sweep`` section removed and the trial's parameters filled in, so
    ``probprune prune --config <file> --output <dir>`` reruns that trial as is (and keeps the pruned model).

    Returns:
        ``{target sparsity: path}``.
    """
    folder = Path(folder)
    out: dict[float, Path] = {}
    for _, row in best_per_sparsity(df).iterrows():
        params = {k: _plain(row[column_name(k)]) for k in param_keys}
        cfg = trial_config(base, params)
        target = float(cfg.search.sparsity)
        path = folder / f"sparsity_{target:.2f}.yaml"
        settings = ", ".join(f"{k}={v}" for k, v in params.items())
        header = (
            f"# Best trial of sweep '{base.name}' at target sparsity {target:g}: trial {row['trial_id']}, "
            f"held-out PPL {row['ppl']:.4g} (prunable sparsity {row['prunable_sparsity']:.2%}).\n"
            f"# Trial parameters: {settings}\n#\n# To rerun it (and keep the pruned model), run:\n"
            f"#   probprune prune --config {shown_path(path)} --output runs/{base.name}-best-{target:.2f}\n\n"
        )
        write_text_atomic(path, header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))
        out[target] = path
    return out


def shown_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it (tables meant to be committed), else as is."""
    if "://" in str(path):  # remote storage (s3://, gs://, ...)
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _plain(v: Any) -> Any:
    """numpy scalars -> Python scalars (for YAML and configs)."""
    return v.item() if hasattr(v, "item") else v


# ---------------------------------------------------------------------------------------------------- reporting
def _fmt(v: Any, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "pct":
        return f"{v:.1%}"
    if kind == "ppl":
        return f"{v:.2f}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_table(df: pd.DataFrame, param_keys: Sequence[str]) -> str:
    """A markdown table of ``df``'s trials: parameters, prunable / total sparsity, held-out PPL at each window."""
    ppl_cols = [c for c in df.columns if _is_ppl_col(c)] or ["ppl"]
    params = [column_name(k) for k in param_keys]
    head = [
        "trial",
        *params,
        "prunable sparsity",
        "total sparsity",
        *(f"PPL@{c[4:]}" if c != "ppl" else "PPL" for c in ppl_cols),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        cells = [
            str(r["trial_id"]),
            *(_fmt(_plain(r[p])) for p in params),
            _fmt(r.get("prunable_sparsity"), "pct"),
            _fmt(r.get("total_sparsity"), "pct"),
            *(_fmt(r.get(c), "ppl") for c in ppl_cols),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_front(df: pd.DataFrame, front: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Scatter of every finished trial (prunable sparsity vs held-out PPL, log scale when it spans more than 10x,
    colour = lr) with the Pareto front as a line and the dense model's PPL as a dashed line; written as PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _finished(df, "prunable_sparsity", "ppl")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        if not done.empty:
            c = done["lr"] if "lr" in done and done["lr"].notna().all() else None
            sc = ax.scatter(
                done["prunable_sparsity"] * 100,
                done["ppl"],
                c=c,
                cmap="viridis",
                s=36,
                norm=matplotlib.colors.LogNorm() if c is not None and (c > 0).all() else None,
                label="trials",
                zorder=2,
            )
            if c is not None:
                fig.colorbar(sc, ax=ax, label="lr")
        if not front.empty:
            ax.plot(
                front["prunable_sparsity"] * 100,
                front["ppl"],
                color="crimson",
                marker="o",
                mfc="none",
                ms=10,
                label="Pareto front",
                zorder=3,
            )
        dense = done["dense_ppl"].dropna() if "dense_ppl" in done else pd.Series(dtype=float)
        if not dense.empty:
            ax.axhline(float(dense.iloc[0]), color="grey", ls="--", lw=1, label="dense")
        ys = pd.concat([done["ppl"], dense]) if not done.empty else dense
        if not ys.empty and (ys > 0).all() and ys.max() / ys.min() > 10:  # PPLs of pruned models span decades
            ax.set_yscale("log")
        ax.set_xlabel("prunable-parameter sparsity (%)")
        ax.set_ylabel("held-out perplexity (shortest window)")
        ax.set_title(title or "sweep: sparsity vs perplexity")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


@dataclass
class SweepOutputs:
    """Where :func:`write_results` put things."""

    csv: Path
    markdown: Path
    png: Path
    best: dict[float, Path]
    front: pd.DataFrame


def _protocol(cfg: Config, df: pd.DataFrame) -> str:
    s, e, d = cfg.search, cfg.eval, cfg.data
    lens = sorted(int(c[4:]) for c in df.columns if _is_ppl_col(c)) or list(e.seq_lens)
    walls = df["wall_seconds"].dropna() if "wall_seconds" in df else pd.Series(dtype=float)
    wall = f"; trial wall time {walls.min():.0f}-{walls.max():.0f} s" if not walls.empty else ""
    return (
        f"model {cfg.model.name_or_path} ({cfg.model.dtype}), data {d.source} held-out split, seed {cfg.seed}; "
        f"PPL = exp(mean token cross-entropy) over non-overlapping windows of {', '.join(map(str, lens))} tokens, "
        f"at most {e.max_tokens} held-out tokens per length; 'ppl' is the shortest window. Calibration "
        f"{d.calib_blocks} blocks x {d.block_len} tokens; each trial searches {s.steps} steps x "
        f"{s.masks_per_step} masks x {s.batch_size} sequences (unless the sweep varies them){wall}."
    )


def write_results(
    df: pd.DataFrame,
    base: Config,
    param_keys: Sequence[str],
    output_dir: str | Path,
    experiment_path: str | None = None,
) -> SweepOutputs:
    """Write ``results.csv`` (all trials), ``pareto.md`` (front + all trials, with the evaluation protocol),
    ``pareto.png`` and ``best/sparsity_<target>.yaml`` under ``output_dir``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    write_atomic(csv, lambda tmp: df.to_csv(tmp, index=False))
    front = pareto_front(df)
    best = best_configs(df, base, param_keys, out / "best")
    png = plot_front(
        df,
        front,
        out / "pareto.png",
        title=f"{base.name}: {len(_finished(df, 'prunable_sparsity', 'ppl'))} trials, Pareto front",
    )
    status = df["status"].value_counts().to_dict() if "status" in df else {}
    md = [f"# Sweep {base.name}", ""]
    if experiment_path:
        md += [f"Tune experiment: `{shown_path(experiment_path)}`", ""]
    md += [
        "## Pareto front (prunable sparsity vs held-out perplexity)",
        "",
        format_table(front, param_keys),
        "",
        "## All trials",
        "",
        format_table(df, param_keys),
        "",
        "Trials: " + ", ".join(f"{n} {k}" for k, n in status.items()) + ".",
        "",
        _protocol(base, df),
        "",
    ]
    dense = df["dense_ppl"].dropna() if "dense_ppl" in df else pd.Series(dtype=float)
    if not dense.empty:
        md[-1:-1] = [f"Dense model: PPL {float(dense.iloc[0]):.2f} (shortest window).", ""]
    if best:
        md += ["## Best config per sparsity target", ""]
        md += [
            f"- {t:g}: `{shown_path(p)}` (`probprune prune --config {shown_path(p)} --output DIR`)"
            for t, p in best.items()
        ]
        md.append("")
    markdown = out / "pareto.md"
    write_text_atomic(markdown, "\n".join(md))
    return SweepOutputs(csv=csv, markdown=markdown, png=png, best=best, front=front)


def format_report(df: pd.DataFrame, sw: SweepConfig, out: Path, seconds: float) -> str:
    """What a finished sweep prints: the Pareto front, trial counts and where the results, tables, plot and best
    configs were written."""
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    lines = [
        "",
        "Pareto front (prunable sparsity vs held-out perplexity):",
        "",
        format_table(pareto_front(df), list(search_space(sw))),
        "",
        f"{len(df)} trials ({', '.join(f'{n} {k}' for k, n in counts.items())}) in {seconds:.0f} s",
        f"results: {out / 'results.csv'}",
        f"tables:  {out / 'pareto.md'}",
        f"plot:    {out / 'pareto.png'}",
    ]
    lines += [
        f"best:    {path}   (probprune prune --config {path} --output DIR)"
        for path in sorted((out / "best").glob("*.yaml"))
    ]
    return "\n".join(lines)
