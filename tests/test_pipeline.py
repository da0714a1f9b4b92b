"""The pipeline's pieces on a tiny model: session, mask space from the config, policies, init, final mask, summary."""

from pathlib import Path

import numpy as np
import pytest
import torch

from probprune import pipeline
from probprune.allocation import AllocationPolicy
from probprune.config import apply_overrides, load_config
from probprune.errors import UserError
from probprune.mask_space import HEAD
from probprune.policy import Policy
from probprune.run_folder import format_summary

ROOT = Path(__file__).resolve().parents[1]

SMOKE = ROOT / "configs" / "tiny" / "smoke.yaml"


def _cfg(*overrides):
    return apply_overrides(load_config(SMOKE), list(overrides))


def test_prepare_builds_the_session_the_config_asks_for():
    s = pipeline.prepare(_cfg("mask.channel_block=8", "mask.block_order=metric"))
    assert s.space.channel_block == 8 and s.stats is not None
    assert len(s.calib) > 0 and s.test_tokens.numel() > 0
    # metric blocks: each layer's channels ranked by single-channel Wanda-sp
    assert any(not np.array_equal(p, np.arange(p.size)) for p in s.space.channel_perm)


def test_query_head_units_come_from_the_config_and_are_refused_with_the_field_named():
    s = pipeline.prepare(_cfg("model.name_or_path=tiny:gemma3-mqa", "mask.head_unit=query"), need_stats=False)
    assert s.space.query_heads and s.space.type_counts()["head"] == 12
    with pytest.raises(UserError, match="mask.head_unit='query': query-head units need at most one KV head"):
        pipeline.prepare(_cfg("mask.head_unit=query"), need_stats=False)


@pytest.mark.parametrize("method,cls", [("units", Policy), ("allocation", AllocationPolicy)])
def test_initial_probs_meet_the_budget_and_build_the_policy(method, cls):
    cfg = _cfg(f"search.method={method}")
    s = pipeline.prepare(cfg)
    probs = pipeline.initial_probs(s)
    for t in np.unique(s.space.unit_type):
        sel = s.space.unit_type == t
        assert probs[sel].sum() == pytest.approx(0.5 * sel.sum(), rel=1e-6)
    policy = pipeline.build_policy(cfg, s.space, probs, s.engine, s.stats)
    assert isinstance(policy, cls)
    mask = pipeline.final_mask(cfg, s.space, policy.probs if method == "units" else probs)
    for t in np.unique(s.space.unit_type):
        assert mask[s.space.unit_type == t].sum() == round(0.5 * (s.space.unit_type == t).sum())


def test_uniform_shape_final_mask_keeps_the_same_units_per_layer():
    cfg = _cfg("mask.shape=uniform")
    s = pipeline.prepare(cfg)
    probs = torch.rand(s.space.num_units, generator=torch.Generator().manual_seed(0)).double()
    mask = pipeline.final_mask(cfg, s.space, probs)
    per_layer = {
        (int(t), int(li)): int(mask[(s.space.unit_type == t) & (s.space.unit_layer == li)].sum())
        for t in (HEAD, 1)
        for li in range(s.space.num_layers)
    }
    assert len({v for (t, _), v in per_layer.items() if t == HEAD}) == 1
    assert len({v for (t, _), v in per_layer.items() if t == 1}) == 1


def test_the_fingerprint_changes_with_what_changes_the_search():
    s = pipeline.prepare(_cfg(), need_stats=False)
    a = pipeline.fingerprint(_cfg(), s.space)
    assert a == pipeline.fingerprint(_cfg("eval.max_tokens=1024"), s.space)  # evaluation only: same search
    assert a != pipeline.fingerprint(_cfg("search.lr=0.5"), s.space)


def test_the_results_table_has_a_row_per_model(tmp_path):
    summary = pipeline.run_baseline(_cfg("eval.max_tokens=512"), "magnitude", tmp_path / "b", progress=False)
    table = format_summary(summary)
    assert table.splitlines()[0].startswith("| model | params |") and "| dense |" in table
    assert "| magnitude |" in table and "PPL@32" in table


def test_the_summary_records_the_scoring_path_and_its_measured_timings(tmp_path):
    from probprune.config import load_config
    from probprune.pipeline import prune

    s = prune(
        load_config(SMOKE, ["engine.scoring=auto", "search.steps=2", "search.objective=kl"]),
        tmp_path / "a",
        progress=False,
    )
    rec = s["search"]["scoring"]
    assert rec["path"] in ("gathered", "batched") and rec["chosen_by"] == "measured on the first call"
    assert set(rec["seconds_per_mask"]) == {"gathered", "batched"} and min(rec["seconds_per_mask"].values()) > 0
    assert rec["seconds_per_mask"][rec["path"]] == min(rec["seconds_per_mask"].values())
    s = prune(load_config(SMOKE, ["engine.fast_path=false", "search.steps=2"]), tmp_path / "b", progress=False)
    assert s["search"]["scoring"] == {"path": "batched", "chosen_by": "config"}


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_scratch_and_nothing_else_is_overwritten(tmp_path):
    from probprune.config import save_config
    from probprune.pipeline import prune
    from probprune.run_folder import RunFolder

    cfg = load_config(SMOKE, ["search.steps=2", "eval.max_tokens=512"])
    out = tmp_path / "run"
    out.mkdir()
    save_config(cfg, out / "config.yaml")  # what a run killed before its first checkpoint leaves behind
    with pytest.raises(UserError, match="is not empty; pass --resume"):
        RunFolder(out, cfg=cfg)
    # a config.yaml of other settings, or any other file, is the user's: refused, untouched
    other = load_config(SMOKE, ["search.steps=3", "eval.max_tokens=512"])
    with pytest.raises(UserError, match="holds no search checkpoint"):
        RunFolder(out, resume=True, cfg=other)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no search checkpoint"):
        RunFolder(out, resume=True, cfg=cfg)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    resumed = prune(cfg, out, resume=True, progress=False)
    prune(cfg, tmp_path / "fresh", progress=False)
    assert resumed["search"]["resumed_from_step"] == 0
    a, b = (torch.load(p / "masks.pt", weights_only=False) for p in (out, tmp_path / "fresh"))
    assert torch.equal(a["probs"], b["probs"]) and torch.equal(a["final_mask"], b["final_mask"])
