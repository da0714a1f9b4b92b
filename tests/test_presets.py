"""Defaults are the recommended settings, the paper's method is one preset, old key names still load, and the
configuration reference is generated from the config classes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from probprune import config as config_module
from probprune.config import (
    Config,
    EvalConfig,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    presets,
    reference_markdown,
)
from probprune.errors import ConfigError

REPO = Path(__file__).parents[1]
# Every shipped config resolved by the code before the defaults changed (commit 007d967, when a field left out got
# the paper's value): each must resolve to exactly the same settings now.
RESOLVED_BEFORE = json.loads((REPO / "tests" / "data" / "resolved_configs.json").read_text())
# The defaults of that code for the search and the mask space: the paper's method.
PAPER_MASK = {
    "heads": True,
    "head_unit": "group",
    "channels": True,
    "layers": False,
    "channel_block": 1,
    "block_order": "index",
    "align": 1,
    "shape": "free",
}
PAPER_SEARCH = {
    "sparsity": 0.5,
    "budget": "per_type",
    "method": "units",
    "steps": 300,
    "masks_per_step": 2,
    "batch_size": 8,
    "lr": 0.002,
    "lr_schedule": "cosine",
    "baseline": "ema",
    "ema_window": 5,
    "score_scaling": "sqrt",
    "sampling": "independent",
    "init": "wanda-sp",
    "init_blocks": 32,
    "init_mix": 0.25,
    "objective": "ce",
    "check_blocks": 0,
    "checkpoint_every": 50,
    "log_every": 1,
}


# configs shipped after the record was taken (nothing to compare them with)
ADDED_SINCE = {"gemma3/270m_quickstart.yaml"}


def test_the_record_covers_every_shipped_config():
    shipped = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == set(RESOLVED_BEFORE) | ADDED_SINCE


@pytest.mark.parametrize("rel", sorted(RESOLVED_BEFORE))
def test_every_shipped_config_resolves_as_before(rel: str):
    """Every setting that existed then resolves to the same value (settings added since take their defaults)."""
    now, before = config_to_dict(load_config(REPO / "configs" / rel)), RESOLVED_BEFORE[rel]
    for section, values in before.items():
        if isinstance(values, dict) and section != "sweep":
            renamed = {
                config_module._RENAMED_KEYS.get(f"{section}.{k}", f"{section}.{k}").split(".")[1]: v
                for k, v in values.items()
            }  # keys renamed since the record was taken
            assert {k: now[section][k] for k in renamed} == renamed, section
        else:
            assert now[section] == values, section
    assert now["data"]["bos"] == "auto"


def test_paper_configs_name_the_preset():
    papers = sorted((REPO / "configs").glob("*/*_paper.yaml"))
    assert len(papers) == 8
    for path in papers:
        assert re.search(r"^preset: paper\b", path.read_text(), re.M), path


def test_defaults_are_the_quickstart_search():
    quick = load_config(REPO / "configs/smollm2/135m_quickstart.yaml")
    # the quickstart sets the run's name, a bfloat16 model and a shorter evaluation; everything else is the default
    assert quick == Config(
        model=ModelConfig(dtype="bfloat16"), eval=EvalConfig(max_tokens=16384), name="smollm2-135m-quickstart"
    )
    s, m = Config().search, Config().mask
    assert (s.method, s.init, s.objective, s.check_blocks, s.baseline, s.lr) == (
        "allocation",
        "best",
        "kl",
        32,
        "loo",
        0.1,
    )
    assert (s.masks_per_step, s.batch_size, s.steps, s.init_mix, m.channel_block, m.block_order) == (
        4,
        4,
        150,
        0.25,
        128,
        "metric",
    )


def test_the_paper_preset_is_the_old_default_method():
    cfg = config_to_dict(load_config(None, ["preset=paper"]))
    assert (cfg["mask"], cfg["search"]) == (PAPER_MASK, PAPER_SEARCH)
    assert config_to_dict(config_from_dict({"preset": "paper"})) == cfg
    assert presets() == ["paper"]


def test_preset_file_overrides_layering(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: paper\nsearch:\n  lr: 0.05\n  steps: 20\nmask:\n")
    cfg = load_config(path, ["search.steps=7"])
    assert (cfg.search.method, cfg.search.masks_per_step, cfg.mask.channel_block) == ("units", 2, 1)  # the preset
    assert (cfg.search.lr, cfg.search.steps) == (0.05, 7)  # the file, then the override
    # the preset may also come from the command line, and a saved config needs no preset
    assert load_config(REPO / "configs/tiny/smoke.yaml") == load_config(
        None,
        [
            "preset=paper",
            "model.name_or_path=tiny:llama",
            "data.block_len=32",
            "data.calib_blocks=64",
            "search.steps=6",
            "search.batch_size=2",
            "search.lr=0.02",
            "search.init_blocks=8",
            "search.checkpoint_every=3",
            "engine.threads=1",
            "eval.seq_lens=[32, 64]",
            "eval.max_tokens=2048",
            "name=tiny-smoke",
        ],
    )
    saved = config_module.save_config(cfg, tmp_path / "saved.yaml")
    assert "preset" not in saved.read_text() and load_config(saved) == cfg


def test_bad_preset_names_the_choices():
    with pytest.raises(ConfigError, match=re.escape("preset must be one of 'paper', got 'papr'")):
        load_config(None, ["preset=papr"])
    with pytest.raises(ConfigError, match="override 'preset=paper': a preset applies when a config is loaded"):
        apply_overrides(Config(), ["preset=paper"])


def test_uniform_shape_says_what_else_to_set():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["mask.shape=uniform"])
    assert info.value.errors == [
        "mask.shape='uniform' learns which units each layer keeps, not how many: it requires "
        "search.method='units', got 'allocation'",
        "mask.shape='uniform' starts from the Wanda-sp ranking: search.init='best' may pick a non-uniform baseline; "
        "use search.init='wanda-sp', 'uniform' or 'random'",
    ]
    cfg = load_config(None, ["mask.shape=uniform", "search.method=units", "search.init=wanda-sp"])
    assert (cfg.mask.shape, cfg.mask.channel_block, cfg.search.check_blocks) == ("uniform", 128, 32)
    assert load_config(None, ["preset=paper", "mask.shape=uniform"]).mask.shape == "uniform"


def test_default_rules_hold_for_the_new_defaults():
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "search.init='best' chooses its start on the check set and requires search.check_blocks >= 1, got 0"
        ),
    ):
        load_config(None, ["search.check_blocks=0"])
    # the KL objective has a path without gathers too (the batched masked forward): fast_path=false is allowed
    assert load_config(None, ["engine.fast_path=false"]).search.objective == "kl"
    with pytest.raises(
        ConfigError,
        match=re.escape("engine.scoring='gathered' is the fast path and contradicts engine.fast_path=false"),
    ):
        load_config(None, ["engine.fast_path=false", "engine.scoring=gathered"])
    with pytest.raises(
        ConfigError, match=re.escape("search.baseline='loo' requires search.masks_per_step >= 2, got 1")
    ):
        load_config(None, ["search.masks_per_step=1"])
    with pytest.raises(ConfigError, match=re.escape("mask.align (64) must be a multiple of mask.channel_block (128)")):
        load_config(None, ["mask.align=64"])


def test_renamed_keys_load_as_the_new_key_with_one_warning(caplog, tmp_path: Path):
    assert config_module._RENAMED_KEYS["search.num_samples"] == "search.masks_per_step"
    path = tmp_path / "old.yaml"
    path.write_text("search:\n  num_samples: 6\n")
    with caplog.at_level(logging.WARNING, logger="probprune.config"):
        cfg = load_config(path)
    assert cfg.search.masks_per_step == 6
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "config key 'search.num_samples' is deprecated: it is now 'search.masks_per_step' (read as such)"
    ]
    # in overrides, in config_from_dict and as a sweep.grid key
    assert load_config(None, ["search.num_samples=8"]).search.masks_per_step == 8
    assert config_from_dict({"search": {"num_samples": 2}}).search.masks_per_step == 2
    sweep = load_config(None, ["sweep.grid.search.num_samples=[2, 8]"]).sweep
    assert sweep is not None and sweep.grid == {"search.masks_per_step": [2, 8]}
    # an override replaces the file's value whichever of the two names each uses
    assert load_config(path, ["search.masks_per_step=2"]).search.masks_per_step == 2
    path.write_text("search:\n  masks_per_step: 6\n")
    assert load_config(path, ["search.num_samples=2"]).search.masks_per_step == 2
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "config sets both 'search.num_samples' and its new name 'search.masks_per_step'; keep only "
            "'search.masks_per_step'"
        ),
    ):
        config_from_dict({"search": {"num_samples": 2, "masks_per_step": 4}})
    # sweep.num_samples (Tune's samples per grid point) keeps its name
    assert load_config(None, ["sweep.num_samples=3"]).sweep.num_samples == 3


def test_the_configuration_reference_is_generated_from_the_classes():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert reference_markdown() == committed, "python -m probprune.config --markdown > docs/configuration.md"
    out = subprocess.run(
        [sys.executable, "-m", "probprune.config", "--markdown"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert out == committed


def test_the_documented_defaults_are_the_dataclass_defaults():
    rows = [ln for ln in (REPO / "docs" / "configuration.md").read_text().splitlines() if ln.startswith("| `")]
    documented = {}
    for row in rows:
        key, _, default = [c.strip() for c in row.strip("|").split("|")][:3]
        documented[key.strip("`")] = default.strip("`")
    defaults = config_to_dict(Config())
    flat = {f"{s}.{k}": v for s, sec in defaults.items() if isinstance(sec, dict) for k, v in sec.items()}
    flat.update({k: v for k, v in defaults.items() if not isinstance(v, dict)})
    flat.pop("sweep")
    flat.update({f"sweep.{k}": v for k, v in config_to_dict(config_from_dict({"sweep": {}}))["sweep"].items()})
    assert set(documented) == {*flat, "preset"}
    for key, value in flat.items():
        assert config_module.yaml.safe_load(documented[key]) == value, key


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": ""}, "name must not be empty, got ''"),
        (
            {"model": {"device_map": {"lm_head": 1.5}}},
            "model.device_map must map module names to a device (int or str); bad entries: ['lm_head'], got {'lm_head': 1.5}",
        ),
        ({"model": {"device_map": [1]}}, "model.device_map must be a string or a mapping or null, got [1]"),
        ({"engine": {"cpus_per_actor": float("inf")}}, "engine.cpus_per_actor must be a finite number, got inf"),
        ({"search": {1: 2}}, "unknown config key 'search.1'"),
        ({"sweep": 3}, "sweep must be a mapping or null, got 3"),
        ({"sweep": {"grid": {"eval.seq_lens": [[128, 4]]}}}, "sweep.grid['eval.seq_lens'][0][1] must be >= 8, got 4"),
    ],
)
def test_one_message_per_field_for_each_kind_of_error(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.errors == [message]
