"""Bad input, as a user meets it through the ``probprune`` command: one clear message naming the field and the value,
exit code 2, no output folder left behind, and nothing the user already had touched or executed.

Every row of :data:`CASES` is one command line (``{out}`` = a fresh output folder, ``{tmp}`` = a scratch folder that
the case's ``setup`` may fill) and a regular expression the one-line error must match.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from probprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "tiny" / "smoke.yaml")
PRUNE = ["prune", "--config", SMOKE, "--output", "{out}"]


# ------------------------------------------------------------------------------------------------- set-ups
def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _pruned_folder(tmp: Path) -> Path:
    from probprune.compaction import compact, save_pruned
    from probprune.models import get_adapter, tiny_model

    model = tiny_model("llama")
    space = get_adapter(model).mask_space()
    mask = space.full_mask()
    mask[: space.num_units // 3] = 0
    return save_pruned(compact(model, space, mask), tmp / "pruned")


def _truncated_weights(tmp: Path) -> None:
    f = _pruned_folder(tmp) / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _gpt2_folder(tmp: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp / "gpt2")


def _malicious_checkpoint(tmp: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp / "PAYLOAD_RAN"), "w"))

    out = tmp / "resume"
    out.mkdir(parents=True)
    with (out / "search_checkpoint.pt").open("wb") as f:
        pickle.dump({"policy": Payload()}, f)


def _finished_run(tmp: Path) -> None:
    assert main(["prune", "--config", SMOKE, "--output", str(tmp / "resume"), "--quiet", "search.steps=2"]) == 0


SETUPS = {
    "config_dir": lambda t: (t / "cfgdir").mkdir(),
    "not_utf8": lambda t: _write(t / "c.yaml", b"\xff\xfe"),
    "bad_yaml": lambda t: _write(t / "c.yaml", "search: [unclosed\n"),
    "yaml_list": lambda t: _write(t / "c.yaml", "- 1\n- 2\n"),
    "no_config_json": lambda t: (t / "emptymodel").mkdir(),
    "truncated": _truncated_weights,
    "gpt2": _gpt2_folder,
    "empty_corpus": lambda t: _write(t / "empty.txt", ""),
    "tiny_corpus": lambda t: _write(t / "tiny.txt", "a few words only\n"),
    "no_text_folder": lambda t: _write(t / "notext" / "a.csv", "x,y\n"),
    "output_file": lambda t: _write(t / "out_file", "user data"),
    "output_nonempty": lambda t: _write(t / "busy" / "notes.txt", "user data"),
    "user_model": lambda t: _write(t / "resume" / "model" / "w.bin", "user weights"),
    "corrupt_ckpt": lambda t: _write(t / "resume" / "search_checkpoint.pt", b"\x00not a checkpoint" * 8),
    "malicious_ckpt": _malicious_checkpoint,
    "finished_run": _finished_run,
}

# (id, argv, error regex, setup or None)
CASES = [
    # ---- config values (each names the field and the value)
    ("sparsity>1", [*PRUNE, "search.sparsity=1.5"], r"search\.sparsity.*must be in \(0, 1\).*1\.5", None),
    ("sparsity=0", [*PRUNE, "search.sparsity=0"], r"search\.sparsity.*must be in \(0, 1\)", None),
    ("sparsity-text", [*PRUNE, "search.sparsity=half"], r"search\.sparsity.*half", None),
    ("lr<0", [*PRUNE, "search.lr=-1"], r"search\.lr.*must be > 0.*-1", None),
    ("steps=0", [*PRUNE, "search.steps=0"], r"search\.steps.*must be >= 1", None),
    ("samples=0", [*PRUNE, "search.masks_per_step=0"], r"search\.masks_per_step.*must be >= 1", None),
    ("batch=0", [*PRUNE, "search.batch_size=0"], r"search\.batch_size.*must be >= 1", None),
    ("method", [*PRUNE, "search.method=genetic"], r"search\.method.*'units', 'allocation'.*genetic", None),
    ("budget", [*PRUNE, "search.budget=flops"], r"search\.budget.*'per_type', 'params'.*flops", None),
    ("baseline", [*PRUNE, "search.baseline=none"], r"search\.baseline.*'ema', 'loo'.*none", None),
    ("init", [*PRUNE, "search.init=zeros"], r"search\.init.*'best'.*zeros", None),
    ("objective", [*PRUNE, "search.objective=mse"], r"search\.objective.*'ce', 'kl'.*mse", None),
    ("init_mix", [*PRUNE, "search.init_mix=1"], r"search\.init_mix.*must be in \(0, 1\)", None),
    ("check<0", [*PRUNE, "search.check_blocks=-1"], r"search\.check_blocks.*must be >= 0", None),
    ("batch>blocks", [*PRUNE, "search.batch_size=100"], r"search\.batch_size \(100\).*data\.calib_blocks \(64\)", None),
    (
        "check>blocks",
        [*PRUNE, "search.check_blocks=63"],
        r"search\.check_blocks \(63\).*data\.calib_blocks \(64\)",
        None,
    ),
    ("init_blocks", [*PRUNE, "search.init_blocks=65"], r"search\.init_blocks \(65\).*data\.calib_blocks \(64\)", None),
    ("best-no-check", [*PRUNE, "search.init=best"], r"search\.init='best'.*search\.check_blocks >= 1, got 0", None),
    (
        "gathered-no-fast",
        [*PRUNE, "engine.scoring=gathered", "engine.fast_path=false"],
        r"engine\.scoring='gathered'.*contradicts engine\.fast_path=false",
        None,
    ),
    ("does-not-fit", [*PRUNE, "engine.memory_gib=0.05"], r"does not fit: .* > 0\.05 GiB", None),
    (
        "loo-K1",
        [*PRUNE, "search.baseline=loo", "search.masks_per_step=1"],
        r"search\.baseline='loo'.*masks_per_step >= 2",
        None,
    ),
    ("antithetic-odd", [*PRUNE, "search.sampling=antithetic", "search.masks_per_step=3"], r"antithetic.*even.*3", None),
    ("typo-key", [*PRUNE, "serach.steps=3"], r"serach.*search", None),
    ("typo-field", [*PRUNE, "search.stpes=3"], r"search\.stpes.*search\.steps", None),
    ("unknown-section", [*PRUNE, "foo=1"], r"foo", None),
    ("layers-per_type", [*PRUNE, "mask.layers=true"], r"mask\.layers=true requires search\.budget='params'", None),
    ("no-units", [*PRUNE, "mask.heads=false", "mask.channels=false"], r"at least one of mask\.heads", None),
    ("block=0", [*PRUNE, "mask.channel_block=0"], r"mask\.channel_block.*must be >= 1", None),
    ("align", [*PRUNE, "mask.channel_block=2", "mask.align=3"], r"mask\.align \(3\).*multiple.*\(2\)", None),
    ("block_order", [*PRUNE, "mask.block_order=random"], r"mask\.block_order.*random", None),
    ("dtype", [*PRUNE, "model.dtype=int8"], r"model\.dtype.*int8", None),
    ("device", [*PRUNE, "model.device=tpu"], r"model\.device.*tpu", None),
    ("source", [*PRUNE, "data.source=web"], r"data\.source.*web", None),
    ("files-no-paths", [*PRUNE, "data.source=files"], r"data\.source='files' requires data\.paths", None),
    ("paths-csv", [*PRUNE, "data.source=files", "data.paths=[a.csv]"], r"data\.paths\[0\].*a\.csv", None),
    ("block_len=1", [*PRUNE, "data.block_len=1"], r"data\.block_len.*1", None),
    ("calib=0", [*PRUNE, "data.calib_blocks=0"], r"data\.calib_blocks.*0", None),
    ("test_fraction", [*PRUNE, "data.test_fraction=1.5"], r"data\.test_fraction.*1\.5", None),
    ("engine", [*PRUNE, "engine.kind=spark"], r"engine\.kind.*spark", None),
    ("actors=0", [*PRUNE, "engine.num_actors=0"], r"engine\.num_actors.*must be >= 1", None),
    ("cpus=0", [*PRUNE, "engine.cpus_per_actor=0"], r"engine\.cpus_per_actor.*must be > 0", None),
    ("gpu-on-cpu", [*PRUNE, "engine.gpus_per_actor=1"], r"engine\.gpus_per_actor=1.*model\.device", None),
    ("seq_lens", [*PRUNE, "eval.seq_lens=[]"], r"eval\.seq_lens", None),
    ("max_tokens", [*PRUNE, "eval.max_tokens=0"], r"eval\.max_tokens.*must be >= 1", None),
    ("no-equals", [*PRUNE, "search.lr"], r"search\.lr", None),
    ("list-for-float", [*PRUNE, "search.lr=[1,2]"], r"search\.lr", None),
    # ---- the config file
    ("config-missing", ["prune", "--config", "{tmp}/nope.yaml", "--output", "{out}"], r"config file not found", None),
    ("config-dir", ["prune", "--config", "{tmp}/cfgdir", "--output", "{out}"], r"is a directory", "config_dir"),
    ("config-not-utf8", ["prune", "--config", "{tmp}/c.yaml", "--output", "{out}"], r"not UTF-8", "not_utf8"),
    (
        "config-bad-yaml",
        ["prune", "--config", "{tmp}/c.yaml", "--output", "{out}"],
        r"cannot parse config.*line",
        "bad_yaml",
    ),
    ("config-list", ["prune", "--config", "{tmp}/c.yaml", "--output", "{out}"], r"must hold a mapping", "yaml_list"),
    # ---- model folders
    (
        "model-missing",
        [*PRUNE, "model.name_or_path=/nonexistent/model"],
        r"model\.name_or_path.*/nonexistent/model",
        None,
    ),
    ("model-no-config", [*PRUNE, "model.name_or_path={tmp}/emptymodel"], r"no config\.json", "no_config_json"),
    (
        "model-truncated",
        [*PRUNE, "model.name_or_path={tmp}/pruned"],
        r"model\.name_or_path.*truncated or corrupt",
        "truncated",
    ),
    (
        "model-unsupported",
        [*PRUNE, "model.name_or_path={tmp}/gpt2"],
        r"unsupported architecture .GPT2.*supports LlamaForCausalLM",
        "gpt2",
    ),
    ("eval-missing", ["eval", "--model", "/nonexistent/model"], r"/nonexistent/model", None),
    # ---- data
    (
        "data-missing-file",
        [*PRUNE, "data.source=files", "data.paths=[{tmp}/none.txt]"],
        r"none\.txt.*does not exist",
        None,
    ),
    (
        "data-empty",
        [*PRUNE, "data.source=files", "data.paths=[{tmp}/empty.txt]"],
        r"empty|too short|no text",
        "empty_corpus",
    ),
    (
        "data-too-short",
        [*PRUNE, "data.source=files", "data.paths=[{tmp}/tiny.txt]"],
        r"data\.paths=.*tiny\.txt.*only one",
        "tiny_corpus",
    ),
    (
        "data-no-text-files",
        [*PRUNE, "data.source=files", "data.paths=[{tmp}/notext]"],
        r"names no \.txt or \.jsonl",
        "no_text_folder",
    ),
    ("calib-too-many", [*PRUNE, "data.calib_blocks=100000000"], r"data\.calib_blocks=100000000.*only has", None),
    ("block-over-context", [*PRUNE, "data.block_len=100000"], r"data\.block_len=100000.*context", None),
    # ---- output folders and resume
    (
        "output-is-file",
        ["prune", "--config", SMOKE, "--output", "{tmp}/out_file"],
        r"exists and is not a folder",
        "output_file",
    ),
    ("output-not-empty", ["prune", "--config", SMOKE, "--output", "{tmp}/busy"], r"is not empty", "output_nonempty"),
    (
        "resume-user-folder",
        ["prune", "--config", SMOKE, "--output", "{tmp}/resume", "--resume"],
        r"holds no search checkpoint",
        "user_model",
    ),
    (
        "resume-corrupt",
        ["prune", "--config", SMOKE, "--output", "{tmp}/resume", "--resume"],
        r"cannot read the search checkpoint",
        "corrupt_ckpt",
    ),
    (
        "resume-malicious",
        ["prune", "--config", SMOKE, "--output", "{tmp}/resume", "--resume"],
        r"cannot read the search checkpoint",
        "malicious_ckpt",
    ),
    (
        "resume-other-settings",
        ["prune", "--config", SMOKE, "--output", "{tmp}/resume", "--resume", "search.steps=2", "search.sparsity=0.3"],
        r"belongs to a different search",
        "finished_run",
    ),
    (
        "rerun-finished",
        ["prune", "--config", SMOKE, "--output", "{tmp}/resume", "search.steps=2"],
        r"already holds a finished run",
        "finished_run",
    ),
    # ---- baselines
    (
        "baseline-sparsity",
        ["baseline", "--method", "flap", "--sparsity", "1.5", "--config", SMOKE, "--output", "{out}"],
        r"search\.sparsity.*1\.5",
        None,
    ),
    (
        "baseline-no-units",
        [
            "baseline",
            "--method",
            "flap",
            "--sparsity",
            "0.5",
            "--config",
            SMOKE,
            "--output",
            "{out}",
            "mask.heads=false",
            "mask.channels=false",
        ],
        r"at least one of mask\.heads",
        None,
    ),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case_id, argv, pattern, setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_message_exit_2_and_leaves_nothing(case_id, argv, pattern, setup, tmp_path, capsys):
    torch.set_num_threads(1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if setup:
        SETUPS[setup](scratch)
    out = tmp_path / "out"
    before = _snapshot(scratch)
    capsys.readouterr()
    rc = main([a.replace("{out}", str(out)).replace("{tmp}", str(scratch)) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("probprune: error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()  # no output folder for a refused run
    assert _snapshot(scratch) == before  # nothing the user had was changed, deleted or added to
    assert not (scratch / "PAYLOAD_RAN").exists()


def test_the_bad_input_table_is_large_enough():
    assert len(CASES) >= 60


# ------------------------------------------------------------------------------ files, permissions, recovery
def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["prune", "--config", SMOKE, "--output", str(tmp_path / "run"), "--quiet", "search.steps=2"]) == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"
    assert (run / "model").stat().st_mode & 0o777 == 0o755
    for p in [*run.iterdir(), *(run / "model").iterdir()]:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


def test_a_kill_between_the_renames_of_a_model_replacement_is_recovered(tmp_path, monkeypatch):
    from probprune import files

    path = tmp_path / "model"
    path.mkdir()
    (path / "w").write_text("old")
    new = files.make_temp_dir(path)
    (new / "w").write_text("new")
    real_replace = os.replace
    calls = []

    def killed_after_first(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill: the old model is aside, the new one not yet in place
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        files.publish_dir(new, path)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert not path.exists()
    done = files.recover_dir(path)
    assert (path / "w").read_text() == "old"  # the complete old folder is back under its name
    assert not list(tmp_path.glob(".model.*")) and len(done) == 2
    # an uninterrupted replacement leaves only the new folder
    new = files.make_temp_dir(path)
    (new / "w").write_text("new")
    files.publish_dir(new, path)
    assert (path / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overrides_may_stand_between_options(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", "--config", SMOKE, "search.steps=2", "--output", str(out), "search.lr=0.1", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["search"]["steps"] == 2 and summary["search"]["lr"] == 0.1


def test_a_folder_of_text_files_is_a_corpus(tmp_path):
    from probprune.config import load_config

    (tmp_path / "texts").mkdir()
    cfg = load_config(SMOKE, ["data.source=files", f"data.paths=[{tmp_path / 'texts'}]"])
    assert cfg.data.paths == [str(tmp_path / "texts")]


# ------------------------------------------------------------------------------------------ the Ray engine
RAY_CASES = [
    ("ray-cpus-per-actor", ["engine.cpus_per_actor=16"], r"engine\.cpus_per_actor=16.*no node of the Ray cluster"),
    ("ray-too-many-actors", ["engine.num_actors=4096"], r"engine\.num_actors=4096 x 1 CPU.*local Ray instance has \d+"),
]


@pytest.mark.ray
@pytest.mark.parametrize("case_id, overrides, pattern", RAY_CASES, ids=[c[0] for c in RAY_CASES])
def test_ray_engine_bad_input_is_refused_before_any_output(case_id, overrides, pattern, tmp_path):
    """In a fresh process (its own local Ray instance with this machine's CPUs), as a user runs it."""
    import re
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [
        sys.executable,
        "-m",
        "probprune.cli",
        "prune",
        "--config",
        SMOKE,
        "--output",
        str(out),
        "--quiet",
        "engine.kind=ray",
        "engine.threads=1",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("probprune: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr[-2000:]
    assert not out.exists()


def test_a_full_disk_while_saving_keeps_the_old_model_and_leaves_nothing(tmp_path, monkeypatch):
    from probprune.compaction import save_pruned
    from probprune.errors import UserError
    from probprune.models import tiny_model

    model = tiny_model("llama")
    path = tmp_path / "model"
    save_pruned(model, path)
    before = _snapshot(path)

    def disk_full(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", disk_full)
    with pytest.raises(UserError, match=r"could not save the model to .*No space left on device"):
        save_pruned(model, path)
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_sigterm_stops_a_run_with_the_resume_hint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "probprune.cli",
            "prune",
            "--config",
            SMOKE,
            "--output",
            str(out),
            "--quiet",
            "search.steps=100000",
            "search.checkpoint_every=5",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "search_checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM); a search resumes from its last checkpoint with --resume" in err
    assert "Traceback" not in err
