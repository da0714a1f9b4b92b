"""One writer per output folder: a second run is refused (exit 2, naming the first), stale locks are taken over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probprune.errors import UserError
from probprune.runlock import LOCK_NAME, OutputLock

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "tiny" / "smoke.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


# The first writer: a real process running prune() that pauses at step 3 until the test creates the file "go".
FIRST = """
import sys, time
from pathlib import Path
from probprune.config import load_config
from probprune.pipeline import prune

out, go = Path(sys.argv[1]), Path(sys.argv[2])

def pause(stats):
    while stats["step"] == 3 and not go.exists():
        time.sleep(0.05)

prune(load_config(sys.argv[3], ["search.steps=8"]), out, progress=False, on_step=pause)
"""


def test_a_second_run_into_a_locked_folder_is_refused_and_the_first_finishes(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", FIRST, str(out), str(go), SMOKE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    _wait_for(out / "metrics.jsonl", first)  # the first run is in its search, holding the lock
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == first.pid
    for cmd in (
        ["prune", "--config", SMOKE, "--output", str(out), "--resume"],
        ["baseline", "--method", "wanda-sp", "--sparsity", "0.5", "--config", SMOKE, "--output", str(out)],
    ):
        second = subprocess.run(
            [sys.executable, "-m", "probprune.cli", *cmd, "--quiet"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is being written by another probprune run (pid {first.pid} on " in second.stderr
        assert first.poll() is None  # the first is unaffected
    go.touch()
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["search"]["steps"] == 8 and summary["search"]["forwards"] == 16
    assert (out / "model" / "config.json").exists() and (out / "masks.pt").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8
    assert not (out / LOCK_NAME).exists()  # released on exit


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    code = (
        "import os, signal, sys; from probprune.runlock import OutputLock; OutputLock(sys.argv[1]).acquire(); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    dead = subprocess.run([sys.executable, "-c", code, str(folder)], env=ENV, timeout=120)
    assert dead.returncode == -signal.SIGKILL
    stale_pid = json.loads((folder / LOCK_NAME).read_text())["pid"]  # the file stays; the kernel dropped the lock
    assert stale_pid != os.getpid()
    with caplog.at_level("WARNING", logger="probprune.runlock"):
        with OutputLock(folder):
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"no longer running (pid {stale_pid} on " in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == []  # the folder existed before: kept, lock file removed


def test_lock_in_process_refuses_a_second_holder_and_cleans_up(tmp_path):
    folder = tmp_path / "new" / "run"
    with OutputLock(folder):
        with pytest.raises(
            UserError,
            match=rf"--output {folder} is being written by another probprune run "
            rf"\(pid {os.getpid()} on ",
        ):
            OutputLock(folder).acquire()
        assert (folder / LOCK_NAME).exists()
    assert not folder.exists()  # created by the lock alone: removed with it
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        OutputLock(tmp_path / "file").acquire()


def test_prune_holds_the_lock_while_it_runs(tmp_path):
    from probprune.config import load_config
    from probprune.pipeline import prune

    out = tmp_path / "run"
    seen = []
    prune(
        load_config(SMOKE, ["search.steps=2"]),
        out,
        progress=False,
        on_step=lambda stats: seen.append(json.loads((out / LOCK_NAME).read_text())["pid"]),
    )
    assert seen == [os.getpid(), os.getpid()]
    assert not (out / LOCK_NAME).exists() and (out / "summary.json").exists()
