"""SIGTERM stops every entry point like Ctrl-C: message, exit 143, the resume command; also while Ray starts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probprune import termination
from probprune.runlock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "ray_jobs" / "prune.py"),
            "--smoke-test",
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


def _terminated(proc: subprocess.Popen, seen: str = "") -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    err = seen + err
    assert proc.returncode == 143, err[-3000:]
    assert "ray_jobs/prune.py: terminated (SIGTERM); the search resumes from its last checkpoint: python " in err
    assert "Traceback" not in err and "SIGABRT" not in err
    return err


@pytest.mark.ray
def test_sigterm_mid_search_then_resume_completes(tmp_path):
    out = tmp_path / "run"
    steps = ["search.steps=200", "search.checkpoint_every=2"]
    proc = _start(out, *steps)
    _wait_for(out / "search_checkpoint.pt", proc)
    err = _terminated(proc)
    assert f"search.checkpoint_every=2 --output {out} --num-actors 2 --resume" in err
    assert not (out / "summary.json").exists() and not (out / LOCK_NAME).exists()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ray_jobs" / "prune.py"),
            "--smoke-test",
            "--output",
            str(out),
            "--no-progress",
            *steps,
            "--resume",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["search"]["resumed_from_step"] >= 2 and summary["search"]["steps"] == 200
    assert summary["search"]["engine"] == "ray"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 200


@pytest.mark.ray
def test_sigterm_while_ray_starts(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    seen = []
    for line in proc.stderr:  # the driver logs this line just before ray.init, which takes seconds
        seen.append(line)
        if "starting Ray" in line:
            break
    assert seen and "starting Ray" in seen[-1], "".join(seen)[-3000:]
    time.sleep(0.3)
    err = _terminated(proc, "".join(seen))
    assert "SIGTERM arrived while Ray was starting: stopping now" in err


def test_sigterm_deferred_delivers_after_the_block(monkeypatch):
    """A SIGTERM inside the block (even after the block installed its own handler) reaches the handler from before."""
    import signal as sig

    got = []
    monkeypatch.setattr(termination, "_RECEIVED", [])
    before = sig.signal(sig.SIGTERM, lambda s, f: got.append(("app", s)))
    try:
        with termination.sigterm_deferred("a test"):
            os.kill(os.getpid(), sig.SIGTERM)
            time.sleep(0.05)
            assert got == []
        assert got == [("app", sig.SIGTERM)]
        assert sig.getsignal(sig.SIGTERM) is not None and got[0][0] == "app"
        sig.signal(sig.SIGTERM, termination.on_sigterm)
        with pytest.raises(termination.Terminated):
            with termination.sigterm_deferred("a test"):
                os.kill(os.getpid(), sig.SIGTERM)
                time.sleep(0.05)
        assert termination.terminated()
    finally:
        sig.signal(sig.SIGTERM, before)
