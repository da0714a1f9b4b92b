"""Config layer: every shipped YAML loads, defaults are valid, each bad field is reported by name and value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from probprune.config import (
    Config,
    SearchConfig,
    SweepConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate_config,
)
from probprune.errors import ConfigError, UserError

REPO = Path(__file__).parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _errors(**kwargs) -> list[str]:
    """The error list config_from_dict raises for the given nested dict."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(kwargs)
    return info.value.errors


# -- shipped configs ------------------------------------------------------------------------------------------------


def test_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"smollm2/135m_quickstart.yaml", "llama2/7b_paper.yaml", "tiny/smoke.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert path.read_text().startswith("#"), "each config starts with a header comment"
    assert f"--config configs/{path.relative_to(REPO / 'configs').as_posix()}" in path.read_text()


def test_quickstart_values():
    cfg = load_config(REPO / "configs/smollm2/135m_quickstart.yaml")
    assert (cfg.model.name_or_path, cfg.model.dtype) == ("embedded:smollm2-135m", "bfloat16")
    assert (cfg.data.source, cfg.data.block_len) == ("brown", 128)
    assert (cfg.mask.heads, cfg.mask.channels, cfg.mask.layers) == (True, True, False)
    assert (cfg.mask.channel_block, cfg.mask.block_order) == (128, "metric")  # benchmarks/results/granularity
    s = cfg.search
    assert (s.sparsity, s.budget, s.steps, s.masks_per_step, s.batch_size, s.lr, s.baseline, s.init) == (
        0.5,
        "per_type",
        150,
        4,
        4,
        0.1,
        "loo",
        "best",
    )
    assert (s.method, s.objective, s.check_blocks, s.init_mix) == ("allocation", "kl", 32, 0.25)  # quality benchmark
    assert (cfg.eval.seq_lens, cfg.eval.max_tokens) == ([128, 2048], 16384)
    assert cfg.sweep is None


def test_paper_configs_follow_the_paper():
    for rel, lr in [("llama2/7b_paper.yaml", 2e-3), ("llama3/8b_paper.yaml", 6e-3), ("smollm2/135m_paper.yaml", 2e-3)]:
        s = load_config(REPO / "configs" / rel).search
        assert (s.lr, s.masks_per_step, s.batch_size, s.baseline, s.ema_window, s.score_scaling, s.budget) == (
            lr,
            2,
            8,
            "ema",
            5,
            "sqrt",
            "per_type",
        ), rel
    cfg = load_config(REPO / "configs/llama2/7b_paper.yaml")
    assert (cfg.data.dataset, cfg.data.dataset_config, cfg.search.steps) == ("allenai/c4", "en", 15000)


def test_ray_and_sweep_configs():
    cfg = load_config(REPO / "configs/llama2/70b_ray_multinode.yaml")
    assert (cfg.engine.kind, cfg.engine.num_actors, cfg.engine.gpus_per_actor, cfg.model.device_map) == (
        "ray",
        4,
        4.0,
        "auto",
    )
    sweep_cfg = load_config(REPO / "configs/smollm2/135m_sweep.yaml")
    sweep = sweep_cfg.sweep
    assert sweep is not None
    assert (sweep.lr, sweep.sparsity) == ([0.03, 0.1, 0.3], [0.2, 0.3, 0.5])
    for c in (cfg, load_config(REPO / "configs/llama2/13b_ray_8gpu.yaml"), sweep_cfg):  # the default search
        assert (c.search.method, c.search.init, c.search.objective) == ("allocation", "best", "kl")
        assert c.search.check_blocks > 0 and c.mask.channel_block == 128


# -- defaults and round trip ----------------------------------------------------------------------------------------


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg == Config()
    validate_config(cfg)
    assert (cfg.search.sparsity, cfg.search.lr, cfg.eval.seq_lens, cfg.sweep) == (0.5, 0.1, [128, 2048], None)


def test_round_trip(tmp_path: Path):
    cfg = load_config(
        REPO / "configs/smollm2/135m_sweep.yaml",
        [
            "model.device_map={model.layers.0: 0, lm_head: cpu}",
            "search.lr=1e-7",
            "sweep.grid={search.masks_per_step: [2, 8]}",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "run.yaml")
    assert path == tmp_path / "sub" / "run.yaml"
    assert load_config(path) == cfg
    assert load_config(save_config(Config(), tmp_path / "default.yaml")) == Config()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_config_to_dict_is_plain():
    d = config_to_dict(Config(sweep=SweepConfig(lr=[0.1])))
    assert d["search"]["lr"] == 0.1 and d["sweep"]["lr"] == [0.1] and d["seed"] == 0
    assert isinstance(d["model"], dict)


def test_atomic_save_leaves_no_temp_file(tmp_path: Path):
    save_config(Config(), tmp_path / "a.yaml")
    save_config(Config(seed=3), tmp_path / "a.yaml")  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["a.yaml"]
    assert load_config(tmp_path / "a.yaml").seed == 3


def test_failed_save_leaves_no_temp_file(tmp_path: Path):
    target = tmp_path / "dir.yaml"
    target.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        save_config(Config(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["dir.yaml"]
    assert list(target.iterdir()) == []


# -- files ----------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=re.escape(f"config file not found: {path}")):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("search:\n  lr: 0.1\n  steps: [1, 2\nmodel: {}\n")
    with pytest.raises(UserError, match=rf"cannot parse config file {re.escape(str(path))}: line 4") as info:
        load_config(path)
    assert not isinstance(info.value, ConfigError)


def test_empty_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


def test_top_level_must_be_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping of sections, got list"):
        load_config(path)


def test_null_section_takes_defaults(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\nsweep:\nseed: 4\n")
    assert load_config(path) == Config(seed=4)


# -- single bad fields ----------------------------------------------------------------------------------------------


def test_sparsity_out_of_range():
    with pytest.raises(ConfigError, match=re.escape("search.sparsity must be in (0, 1), got 1.5")):
        load_config(None, ["search.sparsity=1.5"])
    with pytest.raises(ConfigError, match=re.escape("search.sparsity must be in (0, 1), got 0.0")):
        load_config(None, ["search.sparsity=0"])


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'search.lrr' (did you mean 'search.lr'?)")):
        load_config(None, ["search.lrr=0.1"])
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'serch' (did you mean 'search'?)")):
        config_from_dict({"serch": {"lr": 0.1}})
    # a field of another section
    with pytest.raises(ConfigError, match=re.escape("'search.block_len' (did you mean 'data.block_len'?)")):
        config_from_dict({"search": {"block_len": 64}})
    with pytest.raises(ConfigError, match=r"^invalid config: unknown config key 'model.zzzz'$"):
        load_config(None, ["model.zzzz=1"])


def test_unknown_key_in_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dtpye: bfloat16\n")
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'model.dtpye' (did you mean 'model.dtype'?)")):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.steps=abc", "search.steps must be an int, got 'abc'"),
        ("search.steps=1.5", "search.steps must be an int, got 1.5"),
        ("search.steps=true", "search.steps must be an int, got True"),
        ("search.lr=fast", "search.lr must be a number, got 'fast'"),
        ("search.lr=.nan", "search.lr must be a finite number, got nan"),
        ("mask.heads=maybe", "mask.heads must be a bool, got 'maybe'"),
        ("model.name_or_path=3", "model.name_or_path must be a string, got 3"),
        ("engine.threads=two", "engine.threads must be an int or null, got 'two'"),
        ("eval.seq_lens=128", "eval.seq_lens must be a list of int, got 128"),
        ("eval.seq_lens=[128, x]", "eval.seq_lens[1] must be an int, got 'x'"),
        ("model.device_map=3", "model.device_map must be a string or a mapping or null, got 3"),
        ("sweep.lr_range=[0.1, x]", "sweep.lr_range[1] must be a number, got 'x'"),
        ("search=3", "search must be a mapping, got 3"),
    ],
)
def test_wrong_type(override: str, message: str):
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(message)}$"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.baseline=mean", "search.baseline must be one of 'ema', 'loo', got 'mean'"),
        ("model.dtype=fp8", "model.dtype must be one of 'float32', 'bfloat16', 'float16', got 'fp8'"),
        ("data.source=web", "data.source must be one of 'brown', 'hf', 'files', got 'web'"),
        ("engine.kind=dask", "engine.kind must be one of 'local', 'ray', got 'dask'"),
        ("model.device=gpu", "model.device must be one of 'cpu', 'cuda', 'cuda:N', 'auto', got 'gpu'"),
        (
            "model.device_map=everywhere",
            "model.device_map must be one of 'auto', 'balanced', 'balanced_low_0', 'sequential', got 'everywhere'",
        ),
        ("search.init=zeros", "search.init must be one of 'wanda-sp', 'uniform', 'random', 'best', got 'zeros'"),
    ],
)
def test_bad_enum_lists_allowed_values(override: str, message: str):
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(message)}$"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.steps=0", "search.steps must be >= 1, got 0"),
        ("search.lr=0", "search.lr must be > 0, got 0.0"),
        ("data.block_len=4", "data.block_len must be >= 8, got 4"),
        ("data.test_fraction=1", "data.test_fraction must be in (0, 1), got 1.0"),
        ("eval.seq_lens=[128, 4]", "eval.seq_lens[1] must be >= 8, got 4"),
        ("eval.seq_lens=[]", "eval.seq_lens must not be empty, got []"),
        ("engine.threads=0", "engine.threads must be >= 1, got 0"),
        ("engine.max_retries=-1", "engine.max_retries must be >= 0, got -1"),
        ("engine.gpus_per_actor=-1", "engine.gpus_per_actor must be >= 0, got -1.0"),
        ("data.paths=[a.csv]", "data.paths[0] must be a .txt or .jsonl file, or a folder of them, got 'a.csv'"),
        ("sweep.sparsity=[0.3, 1]", "sweep.sparsity[1] must be in (0, 1), got 1.0"),
    ],
)
def test_out_of_range(override: str, message: str):
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(message)}$"):
        load_config(None, [override])


# -- cross-field rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mask.layers=true"], "mask.layers=true requires search.budget='params', got 'per_type'"),
        (
            ["mask.heads=false", "mask.channels=false"],
            "at least one of mask.heads, mask.channels, mask.layers must be true",
        ),
        (["data.source=files"], "data.source='files' requires data.paths (a list of .txt / .jsonl files), got []"),
        (["data.source=hf"], "data.source='hf' requires data.dataset (e.g. 'wikitext'), got None"),
        (
            ["engine.gpus_per_actor=1"],
            "engine.gpus_per_actor=1.0 requires a GPU model.device ('cuda' or 'auto'), got 'cpu'",
        ),
        (
            ["search.baseline=loo", "search.masks_per_step=1"],
            "search.baseline='loo' requires search.masks_per_step >= 2, got 1",
        ),
        (
            ["search.sampling=antithetic", "search.masks_per_step=3"],
            "search.sampling='antithetic' requires an even search.masks_per_step, got 3",
        ),
        (["sweep.lr_range=[0.1, 0.01]"], "sweep.lr_range must have low < high, got [0.1, 0.01]"),
        (["sweep.lr_range=[0.1]"], "sweep.lr_range must be [low, high], got [0.1]"),
        (
            ["sweep.lr=[0.1]", "sweep.lr_range=[0.01, 0.1]"],
            "sweep.lr and sweep.lr_range are mutually exclusive, got [0.1] and [0.01, 0.1]",
        ),
        (
            ["sweep.grid={search.lrr: [1]}"],
            "sweep.grid['search.lrr']: unknown config key 'search.lrr' (did you mean 'search.lr'?)",
        ),
        (["sweep.grid.search.masks_per_step=[2, x]"], "sweep.grid['search.masks_per_step'][1] must be an int, got 'x'"),
        (["sweep.grid.search.sparsity=[2]"], "sweep.grid['search.sparsity'][0] must be in (0, 1), got 2.0"),
        (["sweep.grid.search.steps=3"], "sweep.grid['search.steps'] must be a non-empty list of values, got 3"),
        (
            ["sweep.lr=[0.1]", "sweep.grid.search.lr=[0.2]"],
            "sweep.grid['search.lr'] conflicts with sweep.lr; set one of them",
        ),
    ],
)
def test_cross_field_rules(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(message)}$"):
        load_config(None, overrides)


def test_cross_field_rules_pass_when_satisfied():
    cfg = load_config(
        None,
        [
            "mask.layers=true",
            "search.budget=params",
            "data.source=files",
            "data.paths=[a.txt, b.jsonl]",
            "engine.gpus_per_actor=1",
            "model.device=cuda:1",
            "model.device_map=auto",
            "search.sampling=antithetic",
            "search.masks_per_step=4",
        ],
    )
    assert (cfg.mask.layers, cfg.data.paths, cfg.model.device) == (True, ["a.txt", "b.jsonl"], "cuda:1")


def test_several_errors_reported_together(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("search:\n  sparsity: 1.5\n  lrr: 0.1\n  steps: abc\nmask:\n  layers: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["search.baseline=mean", "nonsense", "eval.seq_lens=[4]"])
    assert info.value.errors == [
        "malformed override 'nonsense': expected key=value, e.g. search.lr=1e-2",
        "unknown config key 'search.lrr' (did you mean 'search.lr'?)",
        "search.sparsity must be in (0, 1), got 1.5",
        "search.steps must be an int, got 'abc'",
        "search.baseline must be one of 'ema', 'loo', got 'mean'",
        "eval.seq_lens[0] must be >= 8, got 4",
        "mask.layers=true requires search.budget='params', got 'per_type'",
    ]
    assert str(info.value).startswith("invalid config, found the following errors:\n  - malformed override")


def test_cross_field_rule_skipped_when_its_field_is_invalid():
    # budget itself is bad: report that, not a second error about mask.layers needing budget=params
    assert _errors(mask={"layers": True}, search={"budget": "joint"}) == [
        "search.budget must be one of 'per_type', 'params', got 'joint'"
    ]


# -- overrides ------------------------------------------------------------------------------------------------------


def test_overrides_parse_yaml_values():
    cfg = load_config(
        REPO / "configs/llama2/70b_ray_multinode.yaml",
        [
            "search.lr=1e-2",  # PyYAML reads 1e-2 as a string; float fields accept it
            "search.sparsity=.3",
            "eval.seq_lens=[128,512]",
            "model.device_map=null",
            "engine.threads=null",
            "engine.address= auto ",
            "data.test_paths=[]",
            "sweep.lr_range=[1e-3, 1.0e-1]",
            "seed=7",
            "name=x=y",  # only the first '=' splits
        ],
    )
    assert cfg.search.lr == 0.01 and isinstance(cfg.search.lr, float)
    assert cfg.search.sparsity == 0.3
    assert cfg.eval.seq_lens == [128, 512]
    assert cfg.model.device_map is None and cfg.engine.threads is None
    assert cfg.engine.address == "auto"
    assert cfg.sweep is not None and cfg.sweep.lr_range == [1e-3, 0.1]
    assert (cfg.seed, cfg.name) == (7, "x=y")


def test_float_fields_accept_ints_and_strings(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  lr: 1e-3\n  sparsity: '0.25'\nengine:\n  cpus_per_actor: 2\n")
    cfg = load_config(path)
    assert (cfg.search.lr, cfg.search.sparsity, cfg.engine.cpus_per_actor) == (1e-3, 0.25, 2.0)
    assert isinstance(cfg.engine.cpus_per_actor, float)


def test_dotted_keys_below_mapping_fields():
    cfg = load_config(None, ["sweep.grid.search.masks_per_step=[2, 8]", "model.device_map.model.embed_tokens=0"])
    assert cfg.sweep is not None and cfg.sweep.grid == {"search.masks_per_step": [2, 8]}
    assert cfg.model.device_map == {"model.embed_tokens": 0}


@pytest.mark.parametrize("bad", ["search.lr", "=3", "search..lr=3", "  =x"])
def test_malformed_override(bad: str):
    with pytest.raises(ConfigError, match=re.escape(f"malformed override {bad!r}: expected key=value")):
        load_config(None, [bad])


def test_override_with_invalid_yaml_value():
    with pytest.raises(ConfigError, match=re.escape("override 'eval.seq_lens=[128,': value is not valid YAML")):
        load_config(None, ["eval.seq_lens=[128,"])


def test_override_into_a_value():
    with pytest.raises(ConfigError, match=re.escape("override 'search.lr.x=1': 'search.lr' is a value, not a section")):
        load_config(None, ["search.lr.x=1"])


def test_apply_overrides_returns_new_validated_config():
    base = Config()
    new = apply_overrides(base, ["search.steps=10", "sweep.lr=[0.1]"])
    assert new.search.steps == 10 and new.sweep == SweepConfig(lr=[0.1])
    assert base.search.steps == 150 and base.sweep is None  # unchanged
    assert apply_overrides(base, []) == base
    with pytest.raises(ConfigError, match=re.escape("search.steps must be >= 1, got 0")):
        apply_overrides(base, ["search.steps=0"])


def test_validate_config_catches_code_edits():
    cfg = Config(search=SearchConfig(sparsity=2.0))
    with pytest.raises(ConfigError, match=re.escape("search.sparsity must be in (0, 1), got 2.0")):
        validate_config(cfg)


def test_align_must_be_a_multiple_of_the_channel_block():
    with pytest.raises(ConfigError, match=r"mask.align \(6\) must be a multiple of mask.channel_block \(4\)"):
        load_config(None, ["mask.align=6", "mask.channel_block=4"])
    with pytest.raises(ConfigError, match="mask.align=8 aligns MLP widths and needs mask.channels=true"):
        load_config(None, ["mask.align=8", "mask.channels=false"])
