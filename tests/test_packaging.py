"""The package works outside the clone: configs by name, and a wheel installed into a fresh environment runs."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from probprune.config_files import packaged_configs, resolve_config
from probprune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_configs_resolve_by_path_then_by_name(tmp_path, monkeypatch):
    want = (ROOT / "configs" / "smollm2" / "135m_quickstart.yaml").resolve()
    for name in ("smollm2/135m_quickstart", "smollm2/135m_quickstart.yaml", "configs/smollm2/135m_quickstart.yaml"):
        monkeypatch.chdir(tmp_path)  # not the checkout: the name is resolved from the package
        assert resolve_config(name).resolve() == want, name
    local = tmp_path / "smollm2" / "135m_quickstart.yaml"  # an existing file wins over the packaged name
    local.parent.mkdir()
    local.write_text("seed: 3\n")
    assert resolve_config("smollm2/135m_quickstart.yaml") == Path("smollm2/135m_quickstart.yaml")
    assert resolve_config(None) is None
    assert {"tiny/smoke", "smollm2/135m_quickstart", "llama2/13b_ray_8gpu"} <= set(packaged_configs())
    assert len(packaged_configs()) == len(list((ROOT / "configs").rglob("*.yaml")))
    with pytest.raises(
        UserError,
        match=r"config file not found: smollm2/135m_quikstart, and no packaged config of "
        r"that name \(closest packaged configs: smollm2/135m_quickstart",
    ):
        resolve_config("smollm2/135m_quikstart")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def test_wheel_installed_outside_the_checkout_runs_info_and_a_prune_by_config_name(tmp_path):
    """Build the wheel from the package files only, install it into a fresh venv (system site-packages for torch
    etc., no dependency resolution), and from a folder outside the checkout run ``probprune info`` and a tiny prune
    whose config is given by name; the model folder it writes loads with the installed ``load_pruned``."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("probprune", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            ".",
            "-w",
            str(tmp_path / "dist"),
        ],
        src,
        env,
    )
    wheel = next((tmp_path / "dist").glob("probprune-*.whl"))
    files = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "probprune").rglob("*.py")}
    assert modules <= files, f"not in the wheel: {sorted(modules - files)}"  # a subpackage missing from pyproject
    assert {f"probprune/configs/{n}.yaml" for n in packaged_configs()} <= files
    assert "probprune/models/modeling_probprune.py" in files and "probprune/py.typed" in files

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    py, cli = venv / "bin" / "python", venv / "bin" / "probprune"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import probprune; print(probprune.__file__)"], work, env).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed wheel, not the checkout or an editable install

    info = _run([str(cli), "info", "--model", "tiny:llama"], work, env).stdout
    assert "model tiny:llama: LlamaForCausalLM (llama family), 2 decoder layers" in info
    assert "| head group | 8 |" in info

    _run([str(cli), "prune", "--config", "tiny/smoke", "--output", "run", "--quiet", "search.steps=2"], work, env)
    assert (work / "run" / "summary.json").exists() and (work / "run" / "model" / "README.md").exists()
    code = (
        "import probprune, torch; m = probprune.load_pruned('run/model'); "
        "print(type(m).__module__, m.dtype, m(torch.tensor([[1, 2, 3]])).logits.shape)"
    )
    out = _run([str(py), "-c", code], work, env).stdout
    assert "torch.float32 torch.Size([1, 3, 260])" in out
    bad = subprocess.run(
        [str(cli), "prune", "--config", "tiny/smokee", "--output", "x"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "closest packaged configs: tiny/smoke" in bad.stderr
    assert not (work / "x").exists()
