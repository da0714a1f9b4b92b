"""The run folder: every file a run writes, named once here, written atomically, refused when it must not be.

A finished ``probprune prune`` / ``baseline`` folder holds::

    config.yaml           the resolved config (written first)
    metrics.jsonl         one line per search step
    search_checkpoint.pt  the search state (``--resume`` continues from it)
    masks.pt              final mask, unit layout, probabilities, the start's mask
    model/                the compacted model (+ tokenizer), loads with probprune.load_pruned
    summary.json          written last: its presence means the run finished
    .probprune.lock       held while a run writes (one writer per folder; see probprune.runlock)

Every check runs before the folder is created, so bad input never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UserError
from .files import dir_mode, recover_dir, write_atomic, write_text_atomic
from .runlock import LOCK_NAME

if TYPE_CHECKING:
    from .policy import Policy

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "search_checkpoint.pt"
MASKS = "masks.pt"
MODEL = "model"
SUMMARY = "summary.json"
# the small files of a run (everything but the model's weights): what a sweep trial keeps in its Tune checkpoint
SMALL_FILES = (CHECKPOINT, METRICS, CONFIG, SUMMARY, MASKS)


class RunFolder:
    """An output folder that a run may write into, checked before anything is loaded.

    Without ``resume`` the folder must be missing or empty. With ``resume`` it must hold the job's checkpoint (a
    folder without one was not written by that job: nothing in it is touched); a missing or empty folder starts anew,
    and says so, and so does a folder holding nothing but the ``config.yaml`` that this same command writes (given
    ``cfg``) and the metrics of its first steps: a run stopped before its first checkpoint. The search (``prune``) and
    healing (``heal``, ``checkpoint=heal_checkpoint.pt``) share these rules; a finished heal cannot be resumed, a
    finished search can (it re-derives its outputs).

    Attributes:
        path: the folder.
        checkpoint: the job's checkpoint file name.
        job: ``"search"`` or ``"heal"``, for the messages.
        resuming: whether a checkpoint in it will be resumed.

    Args:
        cfg: the command's config, to recognise a folder left by the same command before its first checkpoint.

    Raises:
        UserError: the folder exists and is a file, holds a finished run, is not empty (without ``resume``), or holds
            other files but no checkpoint (with ``resume``).
    """

    def __init__(
        self, path: str | Path, resume: bool = False, checkpoint: str = CHECKPOINT, job: str = "search", cfg: Any = None
    ):
        self.path = Path(path)
        self.checkpoint, self.job = checkpoint, job
        self.resuming = self._check(resume, cfg)

    def _check(self, resume: bool, cfg: Any) -> bool:
        output, job = self.path, self.job
        if output.exists() and not output.is_dir():
            raise UserError(f"--output {output} exists and is not a folder")
        has_files = output.exists() and any(p.name != LOCK_NAME for p in output.iterdir())  # our own lock aside
        finished = (output / SUMMARY).exists()
        if not resume:
            if has_files and finished:
                what = "run" if job == "search" else job
                raise UserError(f"--output {output} already holds a finished {what} ({SUMMARY}); choose another folder")
            if has_files:
                raise UserError(
                    f"--output {output} is not empty; pass --resume to continue a {job} there, or choose another folder"
                )
            return False
        if (output / self.checkpoint).exists():
            # a finished search keeps its checkpoint (resuming it re-derives the outputs); a finished heal is done
            if finished and job != "search":
                raise UserError(f"--resume: {output} already holds a finished {job} ({SUMMARY})")
            return True
        if has_files and self._left_before_a_checkpoint_by(cfg):
            log.warning(
                "--resume: %s holds only the %s (and %s) of this same %s, which stopped before its first "
                "checkpoint: starting it anew",
                output,
                CONFIG,
                METRICS,
                job,
            )
            return False
        if has_files:
            raise UserError(
                f"--resume: {output} holds no {job} checkpoint ({self.checkpoint}), so there is nothing to "
                "resume and probprune will not write into a folder it did not create; choose an empty or "
                "new --output (without --resume)"
            )
        log.warning("--resume: %s holds no %s checkpoint: nothing to resume, starting a new %s", output, job, job)
        return False

    def _left_before_a_checkpoint_by(self, cfg: Any) -> bool:
        """Whether the folder holds nothing (our lock aside) but the config.yaml that ``cfg`` writes, byte for byte,
        and perhaps metrics.jsonl: what this same command leaves when it stops before its first checkpoint."""
        if cfg is None:
            return False
        from .config import config_text

        names = {p.name for p in self.path.iterdir()} - {LOCK_NAME}
        config = self.path / CONFIG
        if CONFIG not in names or not names <= {CONFIG, METRICS} or not config.is_file():
            return False
        return config.read_text(errors="replace") == config_text(cfg)

    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse to resume a checkpoint written for other settings, before anything is computed or written."""
        saved = checkpoint_fingerprint(self.path / CHECKPOINT) if self.resuming else None
        if saved is not None and saved != fingerprint:
            raise UserError(
                f"--resume: the checkpoint in {self.path} belongs to a different search (model, data, mask space or "
                f"search settings differ from this command's); run it with the settings in its {CONFIG}, or choose "
                "another --output and drop --resume"
            )

    def open(self, cfg: Any) -> None:
        """Create the folder (once everything is loaded and checked) and write the config. Leftovers of an
        interrupted model save are cleaned up first."""
        from .config import save_config

        self.path.mkdir(parents=True, exist_ok=True, mode=dir_mode())
        for line in recover_dir(self.model_dir):
            log.warning("%s: %s", self.path, line)
        save_config(cfg, self.path / CONFIG)

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL

    def write_masks(self, record: dict[str, Any]) -> None:
        """``masks.pt``: tensors, numbers and lists only (it loads with ``weights_only=True``)."""
        write_atomic(self.path / MASKS, lambda tmp: torch.save(record, tmp))

    def write_summary(self, summary: dict[str, Any], cfg: Any) -> None:
        """The model card (``model/README.md``), then ``summary.json``, the run's last file."""
        from .model_card import write_model_card

        write_model_card(self.model_dir, summary, cfg)
        write_text_atomic(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        """The finished run's summary, or None if it did not finish."""
        path = self.path / SUMMARY
        return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------------- search checkpoint, metrics
def save_checkpoint(path: Path, policy: Policy, extra: dict[str, Any] | None = None) -> None:
    """Write the search state atomically (temp file + rename): a crash never leaves a half-written checkpoint."""
    state = {"policy": policy.state_dict(), "extra": extra or {}}
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, read with ``weights_only=True``: tensors, numbers, strings and containers only, so
    a checkpoint that came from elsewhere cannot run code when it is loaded (a pickle that tries is refused, its
    payload never runs).

    Raises:
        UserError: the file is unreadable, corrupt or not a probprune checkpoint.
    """
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"--resume: cannot read the search checkpoint {path} ({type(err).__name__}: {first[:200]}); it is corrupt "
            "or not a probprune checkpoint, and only tensors, numbers and strings are ever loaded from it. Delete it "
            "to start the search over, or choose another --output"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("policy"), dict):
        raise UserError(
            f"--resume: {path} is not a probprune search checkpoint (no policy state in it); delete it to "
            "start the search over, or choose another --output"
        )
    return state


def checkpoint_fingerprint(path: Path) -> str | None:
    """The fingerprint a checkpoint was written with (None if it has none), read safely (:func:`_read_checkpoint`)."""
    extra = _read_checkpoint(path).get("extra", {})
    return extra.get("fingerprint") if isinstance(extra, dict) else None


def load_checkpoint(path: Path, policy: Policy, fingerprint: str | None = None) -> dict[str, Any]:
    """Restore ``policy`` from a checkpoint; refuse one written for another search (different fingerprint).

    Raises:
        UserError: the file is unreadable, corrupt, not a probprune checkpoint (:func:`_read_checkpoint`), or from
            another search.
    """
    state = _read_checkpoint(path)
    saved = state.get("extra", {}).get("fingerprint")
    if fingerprint is not None and saved is not None and saved != fingerprint:
        raise UserError(
            f"--resume: checkpoint {path} belongs to a different search (model, data, mask space or search settings "
            "differ); use another --output or drop --resume"
        )
    policy.load_state_dict(state["policy"])
    return state.get("extra", {})


def _metric_step(line: str) -> int | None:
    """The step of one metrics line, or None for a torn or foreign line (e.g. the disk filled up mid-append)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get("step", 0) if isinstance(rec, dict) else None


def trim_metrics(path: Path, upto_step: int) -> None:
    """Keep only metric lines of steps <= upto_step (a resumed run rewrites the steps after its checkpoint).

    A line that is not a JSON object (a write torn by a full disk or a kill) is dropped with a warning, not fatal.
    """
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    steps = [_metric_step(ln) for ln in lines]
    torn = sum(st is None for st in steps)
    if torn:
        log.warning("metrics: dropped %d unreadable line(s) of %s (a write that did not finish)", torn, path)
    keep = [ln for ln, st in zip(lines, steps) if st is not None and st <= upto_step]
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def masks_record(
    space: Any,
    final: np.ndarray,
    probs: Any = None,
    init_mask: np.ndarray | None = None,
    init_probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """What ``masks.pt`` holds: the final mask, the unit layout and, for a search, its probabilities and start."""
    record: dict[str, Any] = {
        "final_mask": torch.as_tensor(final),
        "unit_type": torch.as_tensor(space.unit_type),
        "unit_layer": torch.as_tensor(space.unit_layer),
        "unit_index": torch.as_tensor(space.unit_index),
        "cost": torch.as_tensor(space.cost),
        "channel_block": space.channel_block,
        "channel_perm": [torch.from_numpy(np.array(p)) for p in space.channel_perm],
    }
    if probs is not None:
        record["probs"] = torch.as_tensor(probs).clone()
    if init_mask is not None:
        record["init_mask"], record["init_probs"] = (torch.from_numpy(np.array(x)) for x in (init_mask, init_probs))
    return record


def format_summary(summary: dict[str, Any]) -> str:
    """The results table ``probprune prune`` prints."""
    lens = list(summary["dense_ppl"])
    head = "| model | params | prunable sparsity | total sparsity | " + " | ".join(f"PPL@{n}" for n in lens) + " |"
    sep = "|" + "---|" * (4 + len(lens))
    p = summary["params"]

    def row(name, ppl, params, sp):
        cells = [name, f"{params / 1e6:.1f}M", f"{sp['prunable']:.1%}", f"{sp['total']:.1%}"]
        cells += [f"{ppl[n]:.2f}" for n in lens]
        return "| " + " | ".join(cells) + " |"

    rows = [head, sep, row("dense", summary["dense_ppl"], p["dense_total"], {"prunable": 0.0, "total": 0.0})]
    if summary.get("init_ppl"):
        rows.append(
            row(f"init only ({summary['init']})", summary["init_ppl"], summary["init_total"], summary["init_sparsity"])
        )
    plain = summary.get("without_reconstruction")
    if plain and not plain["same_model"]:  # the model the same run returns without reconstruction
        label = summary.get("method_label", "probprune search").removesuffix(" + reconstruction")
        rows.append(
            row(f"{label}, without reconstruction", plain["pruned_ppl"], plain["pruned_total"], plain["sparsity"])
        )
    rows.append(
        row(
            summary.get("method_label", "probprune search"),
            summary["pruned_ppl"],
            p["pruned_total"],
            summary["sparsity"],
        )
    )
    s = summary.get("search", {})
    foot = (
        f"model {summary['model']} ({summary['dtype']}), data {summary['data']} held-out split, seed "
        f"{summary['seed']}; perplexity over non-overlapping windows, at most {summary['eval']['max_tokens']} "
        f"held-out tokens per length; "
    )
    if s:
        foot += (
            f"search {s['steps']} steps x {s['num_samples']} masks x {s['batch_size']} sequences"
            f" ({s.get('method', 'units')}, {s.get('objective', 'ce')} objective); "
        )
    foot += f"wall time {summary['wall_seconds']:.0f} s"
    ws, chk = summary.get("warm_start"), summary.get("check")
    if ws:
        cands = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ws["check_losses"].items(), key=lambda kv: kv[1]))
        foot += f"\nwarm start: {ws['chosen']} (check-set cross-entropy: {cands})"
    if chk and "loss_reconstructed" in chk:  # a baseline: itself vs reconstructed
        foot += (
            f"\ncheck set ({chk['tokens']:,} held-out calibration tokens): as it is {chk['loss']:.3f}, reconstructed "
            f"{chk['loss_reconstructed']:.3f}: returned "
            + ("reconstructed" if chk["reconstructed"] else "without reconstruction")
        )
    elif chk:
        foot += (
            f"\ncheck set ({chk['tokens']:,} held-out calibration tokens): search result {chk['search_loss']:.3f}, "
            f"start {chk['start_loss']:.3f}: returned the {chk['returned']}"
        )
        if "search_loss_reconstructed" in chk:
            foot += (
                f"; reconstructed: search result {chk['search_loss_reconstructed']:.3f}, start "
                f"{chk['start_loss_reconstructed']:.3f}: returned "
                + ("reconstructed" if chk["reconstructed"] else "without reconstruction")
            )
    rec = summary.get("reconstruct")
    if rec:
        foot += (
            f"\nreconstruction: {rec['mode']}, target {rec['target']}, damping {rec['damping']}, "
            f"{rec['blocks']} calibration blocks, {rec['sublayers']} sublayers solved in {rec['seconds']:.0f} s"
        )
    return "\n".join(rows) + "\n\n" + foot
