"""Every model family end to end on a tiny random model built from its real config class.

The per-unit equalities (masked forward = compacted forward = reloaded, fast path = reference) run for every family
through the ``tiny_kind`` fixture in tests/test_compaction.py and tests/test_fastpath.py; here: what is specific to a
family (fused projections, q/k norms, sandwich norms, query-head units), a short search and every baseline through
the pipeline, stock loading of uniform shapes, ``probprune info``, and precise refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.baselines import BASELINES
from probprune.cli import main
from probprune.compaction import compact, save_pruned
from probprune.errors import UnsupportedModelError
from probprune.fastpath import gathered_losses
from probprune.mask_space import HEAD, LAYER
from probprune.masked_forward import masked_logits, masked_losses
from probprune.models import get_adapter, load_pruned, tiny_model
from probprune.models.loading import TINY_ARCHITECTURES

SMOKE = str(Path(__file__).parents[2] / "configs" / "tiny" / "smoke.yaml")
NEW_FAMILIES = ["qwen3", "gemma3", "gemma3-mqa", "phi3"]
ADAPTER_OF = {"qwen3": "Qwen3Adapter", "gemma3": "Gemma3Adapter", "gemma3-mqa": "Gemma3Adapter", "phi3": "Phi3Adapter"}


def _x(t: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_the_family_has_its_own_adapter(kind):
    assert type(get_adapter(tiny_model(kind))).__name__ == ADAPTER_OF[kind]


def test_phi3_fused_projections_are_split_into_roles_by_rows():
    model = tiny_model("phi3")
    adapter = get_adapter(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    parts = adapter.attn_in(0)
    d = adapter.head_dim
    assert [parts[r].w.shape[0] for r in ("q", "k", "v")] == [8 * d, 4 * d, 4 * d]
    assert all(parts[r].weight is attn.qkv_proj.weight for r in "qkv")
    torch.testing.assert_close(torch.cat([parts[r].w for r in "qkv"]), attn.qkv_proj.weight, rtol=0, atol=0)
    g = adapter.mlp_in(0)
    torch.testing.assert_close(torch.cat([g["gate"].w, g["up"].w]), mlp.gate_up_proj.weight, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_qk_norms_matter_and_are_applied_by_the_fast_path(kind):
    """Scaling the shared q-norm weight changes the model; the fast path follows it exactly (it is not skipped)."""
    model = tiny_model(kind)
    adapter = get_adapter(model)
    space = adapter.mask_space()
    masks = np.stack([space.full_mask(), (np.random.default_rng(0).random(space.num_units) < 0.6).astype(np.float32)])
    before = gathered_losses(adapter, space, masks, _x())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.add_(0.5)
    after = gathered_losses(adapter, space, masks, _x())
    assert np.all(np.abs(after - before) > 1e-4)
    np.testing.assert_allclose(after, masked_losses(adapter, space, masks, _x()), rtol=1e-5, atol=1e-5)


def test_gemma3_sliding_and_global_layers_use_their_own_rotary_tables_and_soft_capping():
    model = tiny_model("gemma3")
    adapter = get_adapter(model)
    assert [adapter.layer_type(i) for i in range(3)] == ["sliding_attention", "full_attention", "sliding_attention"]
    rot = adapter.rotary(model.model.embed_tokens(_x()), torch.arange(12)[None])
    assert set(rot) == {"sliding_attention", "full_attention"}
    assert not torch.allclose(rot["sliding_attention"][0], rot["full_attention"][0])  # bases 1e4 vs 1e6
    hidden = torch.randn(3, 64) * 50
    with torch.no_grad():
        assert float(adapter.logits(hidden).abs().max()) <= 30.0  # final_logit_softcapping=30
    space = adapter.mask_space(layers=True)
    mask = (np.random.default_rng(1).random(space.num_units) < 0.5).astype(np.float32)
    x = _x(16)  # longer than the window (4): the sliding layers really slide
    got = gathered_losses(adapter, space, mask[None], x)
    np.testing.assert_allclose(got, masked_losses(adapter, space, mask[None], x), rtol=1e-5, atol=1e-5)


def test_query_head_units_thin_a_single_kv_head(tmp_path):
    model = tiny_model("gemma3-mqa")  # 4 query heads over one KV head per layer
    adapter = get_adapter(model)
    groups = adapter.mask_space()
    assert groups.type_counts()["head"] == 3  # one KV group per layer: all-or-nothing attention
    space = adapter.mask_space(query_heads=True)
    assert space.type_counts()["head"] == 12
    ls = space.layers[0]
    assert sum(ls.query_unit_costs()) == ls.head_unit_cost  # the KV head's cost is shared out exactly
    mask = space.full_mask()
    heads = np.flatnonzero(space.unit_type == HEAD)
    mask[heads[[0, 2, 4, 5, 6, 7]]] = 0  # layer 0 keeps heads 1, 3; layer 1 none; layer 2 all four
    plan = space.plan(mask)
    assert plan[0].q_heads.tolist() == [1, 3] and plan[0].kv_heads.tolist() == [0]
    assert plan[1].q_heads.numel() == 0 and plan[1].kv_heads.numel() == 0
    x = _x()
    want = masked_logits(adapter, space, mask, x)
    small = compact(model, space, mask)
    assert [s["num_attention_heads"] for s in small.config.probprune_layout] == [2, 0, 4]
    torch.testing.assert_close(small(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) == space.total_params - space.prunable_params + space.kept_params(
        mask
    )
    np.testing.assert_allclose(
        gathered_losses(adapter, space, mask[None], x),
        masked_losses(adapter, space, mask[None], x),
        rtol=1e-5,
        atol=1e-5,
    )
    save_pruned(small, tmp_path / "m")
    torch.testing.assert_close(
        load_pruned(tmp_path / "m")(input_ids=x).logits, small(input_ids=x).logits, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="at most one KV head per layer"):
        get_adapter(tiny_model("gemma3")).mask_space(query_heads=True)


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_uniform_shapes_load_with_stock_from_pretrained(kind, tmp_path):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    space = adapter.mask_space(channel_block=8, query_heads=kind == "gemma3-mqa")
    mask = space.full_mask()
    for li in range(space.num_layers):  # the same units dropped in every layer: stock shapes
        sel = np.flatnonzero(space.unit_layer == li)
        mask[sel[space.unit_type[sel] == HEAD][:2]] = 0  # half the heads (stock configs: hidden % heads == 0)
        mask[sel[space.unit_type[sel] != HEAD][:3]] = 0
    small = compact(model, space, mask)
    assert getattr(small.config, "probprune_layout", None) is None
    save_pruned(small, tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=False)
    assert type(stock).__name__ == model.config.architectures[0]
    x = _x()
    torch.testing.assert_close(stock(input_ids=x).logits, small(input_ids=x).logits, rtol=0, atol=0)
    torch.testing.assert_close(small(input_ids=x).logits, masked_logits(adapter, space, mask, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_a_short_search_and_every_baseline_run_end_to_end(kind, tmp_path, capsys):
    head_unit = ["mask.head_unit=query"] if kind == "gemma3-mqa" else []
    common = [f"model.name_or_path=tiny:{kind}", "search.steps=3", "eval.max_tokens=512", *head_unit]
    out = tmp_path / "search"
    assert main(["prune", "--config", SMOKE, "--output", str(out), "--quiet", *common]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["sparsity"]["prunable"] == pytest.approx(0.5, abs=0.05)
    assert all(np.isfinite(v) for v in s["pruned_ppl"].values())
    x = _x()
    reloaded = load_pruned(out / "model")
    assert type(reloaded).__name__.removeprefix("ProbPruned") == TINY_ARCHITECTURES[kind]
    assert torch.isfinite(reloaded(input_ids=x).logits).all()
    for method in BASELINES:
        b = tmp_path / method
        assert (
            main(
                [
                    "baseline",
                    "--config",
                    SMOKE,
                    "--method",
                    method,
                    "--sparsity",
                    "0.5",
                    "--output",
                    str(b),
                    "--quiet",
                    *common,
                ]
            )
            == 0
        ), method
        summary = json.loads((b / "summary.json").read_text())
        assert all(np.isfinite(v) for v in summary["pruned_ppl"].values()), method
        assert summary["params"]["pruned_total"] < summary["params"]["dense_total"], method
        assert torch.isfinite(load_pruned(b / "model")(input_ids=x).logits).all(), method
    capsys.readouterr()


def test_flap_baseline_saves_its_bias_compensation(tmp_path):
    out = tmp_path / "flap"
    assert (
        main(
            [
                "baseline",
                "--config",
                SMOKE,
                "--method",
                "flap",
                "--sparsity",
                "0.5",
                "--output",
                str(out),
                "--quiet",
                "eval.max_tokens=512",
            ]
        )
        == 0
    )
    layout = json.loads((out / "model" / "config.json").read_text())["probprune_layout"]
    assert any(e.get("o_bias") or e.get("down_bias") for e in layout)
    model = load_pruned(out / "model")
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biases and any(float(b.detach().abs().max()) > 0 for b in biases)


@pytest.mark.parametrize("kind,unit", [("gemma3-mqa", "query"), ("phi3", "group")])
def test_info_prints_the_units(kind, unit, capsys):
    assert main(["info", "--model", f"tiny:{kind}", "--head-unit", unit, "--layers"]) == 0
    out = capsys.readouterr().out
    label = "query head" if unit == "query" else "head group"
    assert f"| {label} | 12 |" in out or f"| {label} | 8 |" in out
    assert "| layer |" in out and "family" in out


def test_query_head_units_on_a_model_with_several_kv_heads_are_refused(capsys):
    assert main(["info", "--model", "tiny:gemma3", "--head-unit", "query"]) == 2
    assert "at most one KV head per layer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config_kind,overrides,feature",
    [
        ("gemma3", {"attn_logit_softcapping": 50.0}, "attention-logit soft-capping"),
        ("gemma3", {"use_bidirectional_attention": True}, "bidirectional attention"),
    ],
)
def test_features_an_adapter_does_not_handle_are_refused_by_name(config_kind, overrides, feature):
    with pytest.raises(UnsupportedModelError, match=feature):
        get_adapter(tiny_model(config_kind, **overrides))


def test_moe_and_multimodal_folders_are_refused_before_loading_weights(tmp_path, capsys):
    from transformers import Gemma3Config, MixtralConfig

    for name, cfg in (
        (
            "moe",
            MixtralConfig(
                num_hidden_layers=1,
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=64,
            ),
        ),
        ("mm", Gemma3Config()),
    ):
        folder = tmp_path / name
        folder.mkdir()
        cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
        cfg.save_pretrained(folder)  # a config and no weights: the refusal must come before any weight is read
        assert main(["info", "--model", str(folder)]) == 2
        err = capsys.readouterr().err
        assert ("mixture-of-experts" if name == "moe" else "vision encoder") in err, err


def test_layer_units_on_every_new_family_drop_whole_layers():
    for kind in NEW_FAMILIES:
        model = tiny_model(kind)
        adapter = get_adapter(model)
        space = adapter.mask_space(layers=True)
        mask = space.full_mask()
        mask[np.flatnonzero(space.unit_type == LAYER)[0]] = 0
        small = compact(model, space, mask)
        assert len(small.model.layers) == space.num_layers - 1
        x = _x()
        torch.testing.assert_close(
            small(input_ids=x).logits, masked_logits(adapter, space, mask, x), rtol=1e-4, atol=1e-4
        )
