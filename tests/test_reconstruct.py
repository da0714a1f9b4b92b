"""Reconstruction of the kept weights: exactness where nothing is removed, the solve against a direct lstsq, the
compacted model through save / reload / GGUF, the Ray path against the local one, and the pipeline option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probprune.compaction import compact, save_pruned
from probprune.engine.local import LocalEngine
from probprune.errors import UserError
from probprune.mask_space import CHANNEL, HEAD
from probprune.models import get_adapter, tiny_model
from probprune.models.loading import byte_tokenizer, load_pruned
from probprune.reconstruct import MODES, reconstruct, reconstruct_local, reconstructed_hidden, reconstructed_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _units(space, t, li):
    return np.flatnonzero((space.unit_type == t) & (space.unit_layer == li))


def _blocks(model, n=6, t=16, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _capture_inputs(model, module, blocks):
    """``[n·T, width]`` float64 inputs of ``module`` (a Linear) over ``blocks``, from the stock forward."""
    got = []
    handle = module.register_forward_hook(lambda m, inp, out: got.append(inp[0].detach().double()))
    with torch.no_grad():
        model(blocks)
    handle.remove()
    return torch.cat([g.flatten(0, 1) for g in got])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", ["local", "dense"])
def test_a_layer_that_keeps_everything_is_left_exactly_as_it_is(target, mode):
    model = tiny_model("llama", num_hidden_layers=3)
    space = get_adapter(model).mask_space(channel_block=4)
    mask = space.full_mask()
    mask[_units(space, HEAD, 1)[:1]] = 0
    mask[_units(space, CHANNEL, 1)[:3]] = 0  # only layer 1 loses anything
    rec = reconstruct_local(model, space, mask, _blocks(model), target=target, mode=mode)
    assert set(rec.weights) | set(rec.biases) == {1}
    plain, fitted = compact(model, space, mask), compact(model, space, mask, override=rec.override())
    for li in (0, 2):
        for (name, a), b in zip(
            plain.model.layers[li].state_dict().items(), fitted.model.layers[li].state_dict().values()
        ):
            assert torch.equal(a, b), name
    if mode == "bias":
        assert fitted.model.layers[1].mlp.down_proj.bias.abs().max() > 0
    else:
        assert not torch.equal(plain.model.layers[1].mlp.down_proj.weight, fitted.model.layers[1].mlp.down_proj.weight)
    full = reconstruct_local(model, space, space.full_mask(), _blocks(model), target=target, mode=mode)
    assert not full.weights and not full.biases
    x = _blocks(model, 2, 12, seed=1)
    with torch.no_grad():
        assert torch.equal(
            compact(model, space, space.full_mask(), override=full.override())(x).logits,
            compact(model, space, space.full_mask())(x).logits,
        )


@pytest.mark.parametrize("which", ["down_proj", "o_proj"])
def test_the_solve_equals_a_direct_lstsq_of_the_same_ridge_problem(which):
    model = tiny_model("llama", num_hidden_layers=1).double()
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = space.full_mask()
    kind = CHANNEL if which == "down_proj" else HEAD
    mask[_units(space, kind, 0)[::3]] = 0
    blocks = _blocks(model, n=8, t=16)
    damping = 0.05
    rec = reconstruct_local(model, space, mask, blocks, target="local", mode="refit", damping=damping)
    proj = adapter.mlp_out(0) if which == "down_proj" else adapter.attn_out(0)
    z = _capture_inputs(model, proj, blocks)  # [nT, width]
    w0 = proj.weight.detach().double()  # [H, width]
    keep = space.plan(mask)[0]
    d = adapter.head_dim
    cols = keep.channels if which == "down_proj" else (keep.q_heads[:, None] * d + torch.arange(d)).flatten()
    y = z @ w0.T  # the dense sublayer on the same input, [nT, H]
    zs = z[:, cols]
    lam = damping * float(torch.diagonal(zs.T @ zs).mean())
    a = torch.cat([zs, lam**0.5 * torch.eye(cols.numel(), dtype=torch.float64)])
    b = torch.cat([y, lam**0.5 * w0[:, cols].T])
    want = torch.linalg.lstsq(a, b).solution.T  # [H, k]
    got = rec.weights[0][which]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(want, w0[:, cols], atol=1e-3)  # the fit moved the columns
    assert rec.info[f"0.{which}"]["err_after"] < rec.info[f"0.{which}"]["err_before"]


def test_bias_mode_is_the_removed_columns_mean_on_the_pruned_input():
    model = tiny_model("llama", num_hidden_layers=1).double()
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = space.full_mask()
    mask[_units(space, CHANNEL, 0)[1::2]] = 0
    blocks = _blocks(model)
    rec = reconstruct_local(model, space, mask, blocks, target="local", mode="bias")
    z = _capture_inputs(model, adapter.mlp_out(0), blocks)
    gone = np.setdiff1d(np.arange(z.shape[1]), space.plan(mask)[0].channels.numpy())
    want = adapter.mlp_out(0).weight.detach().double()[:, gone] @ z[:, gone].mean(0)  # FLAP's compensation
    torch.testing.assert_close(rec.biases[0]["down_proj"].double(), want, rtol=1e-5, atol=1e-6)
    assert not rec.weights


def test_an_emptied_sublayer_keeps_its_own_bias_and_the_layers_after_it_are_fitted_with_it():
    """A sublayer with nothing kept has no column to re-fit: given the bias the model is returned with (FLAP's
    compensation), it keeps it, and the next layer's re-fit equals a direct lstsq on the stream that carries it."""
    model = tiny_model("llama", num_hidden_layers=2).double()
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = space.full_mask()
    mask[_units(space, HEAD, 0)] = 0  # layer 0's attention is emptied
    mask[_units(space, CHANNEL, 1)[::3]] = 0
    blocks, damping = _blocks(model, n=8, t=16), 0.05
    own = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    own = {0: {"o_proj": own}, 1: {"down_proj": torch.ones(model.config.hidden_size)}}  # layer 1's is re-fit away
    kw = dict(target="local", mode="refit", damping=damping)
    rec = reconstruct_local(model, space, mask, blocks, emptied_biases=own, **kw)
    assert set(rec.biases) == {0} and torch.equal(rec.biases[0]["o_proj"], own[0]["o_proj"].float())
    # the direct problem: layer 1's full-width MLP hidden on the stream after layer 0 (attention = its bias only)
    first = space.full_mask()
    first[_units(space, HEAD, 0)] = 0
    stream = compact(model, space, first, override={0: {"o_bias": own[0]["o_proj"]}})
    z = _capture_inputs(stream, stream.model.layers[1].mlp.down_proj, blocks)  # [nT, width]
    w0 = adapter.mlp_out(1).weight.detach().double()
    cols = space.plan(mask)[1].channels
    zs = z[:, cols]
    lam = damping * float(torch.diagonal(zs.T @ zs).mean())
    a = torch.cat([zs, lam**0.5 * torch.eye(cols.numel(), dtype=torch.float64)])
    b = torch.cat([z @ w0.T, lam**0.5 * w0[:, cols].T])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(rec.weights[1]["down_proj"], want, rtol=1e-3, atol=3e-5 * float(want.abs().max()))
    without = reconstruct_local(model, space, mask, blocks, **kw)  # the stream without the bias: another fit
    assert not without.biases
    assert not torch.allclose(without.weights[1]["down_proj"], want, atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "phi3"])
def test_the_gathered_reconstructed_forward_equals_the_compacted_model(kind):
    model = tiny_model(kind, num_hidden_layers=3)
    adapter = get_adapter(model)
    space = adapter.mask_space(channel_block=4)
    mask = (np.random.default_rng(0).random(space.num_units) < 0.6).astype(np.float32)
    rec = reconstruct_local(model, space, mask, _blocks(model), target="dense", mode="refit+bias", damping=0.01)
    assert rec.weights and rec.biases
    x = _blocks(model, 2, 12, seed=3)
    with torch.no_grad():
        want = compact(model, space, mask, override=rec.override())(x).logits
        got = adapter.logits(reconstructed_hidden(adapter, space, mask, rec, x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # every re-fit improves the fit of its own sublayer on the calibration blocks
    assert all(v["err_after"] < v["err_before"] for v in rec.info.values())


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_an_emptied_sublayer_with_an_added_bias_is_scored_as_it_is_compacted(kind):
    """FLAP's compensation of a sublayer it empties: the check-set scoring path adds that bias exactly as the
    compacted model does (an EmptyAttention / EmptyMLP with the bias, through the family's norms)."""
    from probprune.reconstruct import Reconstruction

    model = tiny_model(kind, num_hidden_layers=3)
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = space.full_mask()
    mask[_units(space, HEAD, 1)] = 0  # layer 1's attention is empty, its MLP thinned
    mask[_units(space, CHANNEL, 1)[:5]] = 0
    mask[_units(space, CHANNEL, 2)] = 0  # layer 2's MLP is empty
    g = torch.Generator().manual_seed(0)
    h = model.config.hidden_size
    rec = Reconstruction(
        biases={1: {"o_proj": torch.randn(h, generator=g)}, 2: {"down_proj": torch.randn(h, generator=g)}}
    )
    x = _blocks(model, 2, 12, seed=3)
    with torch.no_grad():
        want = compact(model, space, mask, override=rec.override())(x).logits
        got = adapter.logits(reconstructed_hidden(adapter, space, mask, rec, x))
        bare = adapter.logits(reconstructed_hidden(adapter, space, mask, None, x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - bare).abs().max() > 0.1  # the biases matter


def _hetero_mask(space):
    mask = space.full_mask()
    mask[_units(space, HEAD, 0)[:1]] = 0
    mask[_units(space, CHANNEL, 0)[:5]] = 0
    mask[_units(space, CHANNEL, 2)[2:4]] = 0
    return mask


def _uniform_mask(space):
    mask = space.full_mask()
    for li in range(space.num_layers):
        mask[_units(space, HEAD, li)[:2]] = 0  # 4 of 8 query heads stay: a stock config can hold that
        mask[_units(space, CHANNEL, li)[-3:]] = 0
    return mask


@pytest.mark.parametrize("mode", ["refit", "refit+bias"])
def test_a_reconstructed_model_saves_reloads_and_exports_exactly(mode, tmp_path):
    import gguf
    from test_export import _tensors, llama_cpp_logits  # the GGUF reader and runtime of the export tests
    from transformers import AutoModelForCausalLM

    from probprune.export import export_gguf, unpermute_rope_rows

    model = tiny_model("llama", num_hidden_layers=3)
    space = get_adapter(model).mask_space(channel_block=8)
    mask = _uniform_mask(space)
    rec = reconstruct_local(model, space, mask, _blocks(model), mode=mode, damping=0.01)
    pruned = compact(model, space, mask, override=rec.override())
    folder = save_pruned(pruned, tmp_path / "model", byte_tokenizer())
    x = _blocks(model, 2, 12, seed=4)
    with torch.no_grad():
        want = pruned(x).logits
        torch.testing.assert_close(load_pruned(folder)(x).logits, want, rtol=0, atol=0)
        if mode == "refit":  # no new parameters: stock shapes, stock loader
            stock = AutoModelForCausalLM.from_pretrained(folder)
            assert type(stock).__name__ == "LlamaForCausalLM"
            torch.testing.assert_close(stock(x).logits, want, rtol=0, atol=0)
        else:  # the added output biases make it a per-layer-layout model
            assert all(s.get("o_bias") and s.get("down_bias") for s in pruned.config.probprune_layout)
    res = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    t = _tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    sd = {k: v.detach().numpy() for k, v in load_pruned(folder).state_dict().items()}
    for i in range(res["layers"]):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(t[f"blk.{i}.attn_output.weight"], sd[p + "self_attn.o_proj.weight"])
        np.testing.assert_array_equal(t[f"blk.{i}.ffn_down.weight"], sd[p + "mlp.down_proj.weight"])
        n_kv = res["shapes"][i]["n_head_kv"]
        np.testing.assert_array_equal(
            unpermute_rope_rows(torch.from_numpy(t[f"blk.{i}.attn_k.weight"].copy()), n_kv).numpy(),
            sd[p + "self_attn.k_proj.weight"],
        )
        if mode == "refit+bias":
            np.testing.assert_array_equal(t[f"blk.{i}.attn_output.bias"], sd[p + "self_attn.o_proj.bias"])
            np.testing.assert_array_equal(t[f"blk.{i}.ffn_down.bias"], sd[p + "mlp.down_proj.bias"])
    # a heterogeneous reconstructed model streams through compact_checkpoint to the same folder
    from probprune.compaction import compact_checkpoint

    dense_dir = save_pruned(model, tmp_path / "dense", byte_tokenizer())
    mask = _hetero_mask(space)
    rec = reconstruct_local(model, space, mask, _blocks(model), mode=mode, damping=0.01)
    streamed = compact_checkpoint(dense_dir, space, mask, tmp_path / "streamed", override=rec.override())
    with torch.no_grad():
        want = compact(model, space, mask, override=rec.override())(x).logits
        torch.testing.assert_close(load_pruned(streamed)(x).logits, want, rtol=0, atol=0)
    # llama.cpp runs the exported reconstructed model with the same logits (skipped where llama_cpp is missing)
    (tmp_path / "cpp").mkdir()
    got, want = llama_cpp_logits(pruned, folder, tmp_path / "cpp", "f32", "llama")  # uniform widths: llama
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * max(1.0, float(np.abs(want).max())))


def test_bad_settings_are_refused():
    model = tiny_model("llama", num_hidden_layers=1)
    space = get_adapter(model).mask_space()
    with pytest.raises(UserError, match="reconstruct.target must be one of local, dense, got 'residual'"):
        reconstruct_local(model, space, space.full_mask(), _blocks(model), target="residual")
    with pytest.raises(UserError, match="reconstruct.mode"):
        reconstruct_local(model, space, space.full_mask(), _blocks(model), mode="lora")
    with pytest.raises(UserError, match="calibration blocks"):
        reconstruct_local(model, space, space.full_mask(), torch.zeros(0, 8, dtype=torch.long))


class _SplitReplicas(LocalEngine):
    """Three replicas of one model: ``map`` shares the blocks three ways (what the Ray engine does)."""

    num_replicas = 3


def test_shares_combine_exactly_by_summing():
    model = tiny_model("qwen3", num_hidden_layers=4)
    adapter = get_adapter(model)
    space = adapter.mask_space(channel_block=4)
    mask = _hetero_mask(space)
    mask[_units(space, HEAD, 1)] = mask[_units(space, CHANNEL, 1)] = 0  # layer 1 removed: folded into layer 0
    blocks = _blocks(model, n=7)
    kw = dict(target="dense", mode="refit+bias", removed_layers=True, batch_size=1)  # the same per-block products
    one = reconstruct(LocalEngine(model, space), adapter, space, mask, blocks, **kw)
    three = reconstruct(_SplitReplicas(model, space), adapter, space, mask, blocks, **kw)
    assert set(one.weights) == {0, 2} and set(one.weights[0]) == {"o_proj", "down_proj"}  # layer 3: kept whole
    for li, parts in one.weights.items():
        for w, t in parts.items():
            torch.testing.assert_close(three.weights[li][w], t, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(three.biases[li][w], one.biases[li][w], rtol=1e-5, atol=1e-6)
    a = reconstructed_loss(LocalEngine(model, space), space, mask, one, blocks)
    b = reconstructed_loss(_SplitReplicas(model, space), space, mask, one, blocks)
    assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.ray
def test_prune_with_reconstruction_on_actors_equals_local(ray_cluster, tmp_path, monkeypatch):
    """engine.kind=ray with a driver that holds no model: the actors sum the statistics of their shares, the driver
    solves, the streamed compaction applies the re-fitted columns and the added biases; the check-set choice compares
    the reconstructed models. Everything equals the same run in one process."""
    from pathlib import Path

    from probprune import pipeline
    from probprune.config import apply_overrides, load_config

    root = Path(__file__).resolve().parents[1]
    base = load_config(
        root / "configs" / "tiny" / "smoke.yaml",
        [
            "reconstruct.enabled=true",
            "reconstruct.mode=refit+bias",
            "reconstruct.target=dense",
            "reconstruct.blocks=8",
            "search.init=best",
            "mask.layers=true",
            "search.budget=params",
            "search.check_blocks=4",
        ],
    )
    local = pipeline.prune(base, tmp_path / "local", progress=False)
    plain = pipeline.prune(apply_overrides(base, ["reconstruct.enabled=false"]), tmp_path / "plain", progress=False)
    chk = local["check"]
    best = min(chk["search_loss"], chk["start_loss"], chk["search_loss_reconstructed"], chk["start_loss_reconstructed"])
    assert chk[f"{chk['returned']}_loss" + ("_reconstructed" if chk["reconstructed"] else "")] == best
    for key in ("search_loss", "start_loss"):  # the plain models' check losses, as the plain run measured them
        assert chk[key] == pytest.approx(plain["check"][key], rel=1e-6)
    assert chk["without_reconstruction"] == plain["check"]["returned"]  # and the plain run's choice among them
    scored = local["warm_start"]["check_losses"]  # the two best candidates were also scored re-fit
    assert sum(k.endswith("+rec") for k in scored) == 2
    assert min(scored, key=scored.get).removesuffix("+rec") == local["warm_start"]["chosen"]
    refit = scored.get(local["warm_start"]["chosen"] + "+rec")
    if refit is not None:  # the start's re-fit was made once, by the warm start, and reused by the final choice
        assert chk["start_loss_reconstructed"] == pytest.approx(refit, rel=1e-12)
    without = local["without_reconstruction"]  # the run reports the model a plain run returns, measured
    assert without["sparsity"] == plain["sparsity"]
    for seq_len, value in plain["pruned_ppl"].items():
        assert without["pruned_ppl"][seq_len] == pytest.approx(value, rel=1e-6)
    assert chk["search_loss_reconstructed"] != chk["search_loss"]
    assert ("reconstruct" in local) == chk["reconstructed"]

    def no_weights_on_the_driver(*args, **kwargs):
        raise AssertionError("the driver loaded a model")

    from probprune.models import loading

    monkeypatch.setattr(loading, "load_model", no_weights_on_the_driver)  # nothing in this process may load weights
    ray = pipeline.prune(
        apply_overrides(
            base, ["engine.kind=ray", "engine.num_actors=2", "engine.cpus_per_actor=0.5", "engine.threads=1"]
        ),
        tmp_path / "ray",
        progress=False,
    )
    assert torch.equal(
        torch.load(tmp_path / "local" / "masks.pt")["final_mask"],
        torch.load(tmp_path / "ray" / "masks.pt")["final_mask"],
    )
    for key in ("search_loss", "start_loss", "search_loss_reconstructed", "start_loss_reconstructed"):
        assert ray["check"][key] == pytest.approx(local["check"][key], rel=1e-5)
    assert ray["check"]["reconstructed"] == local["check"]["reconstructed"]
    for seq_len, value in local["pruned_ppl"].items():  # compacted model here, gathered path on the actors
        assert ray["pruned_ppl"][seq_len] == pytest.approx(value, rel=1e-5)
    assert ray["params"] == local["params"]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = load_pruned(tmp_path / "local" / "model")(ids).logits
        got = load_pruned(tmp_path / "ray" / "model")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_every_baseline_takes_the_reconstruction_option(method, tmp_path):
    from pathlib import Path

    from probprune.config import load_config
    from probprune.pipeline import run_baseline

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny" / "smoke.yaml", ["reconstruct.enabled=true", "reconstruct.blocks=16"])
    summary = run_baseline(cfg, method, tmp_path / "run", progress=False)
    assert summary["method_label"] == f"{method} + reconstruction"
    rec = summary["reconstruct"]
    assert rec["mode"] == "refit" and rec["sublayers"] == 4  # 2 layers x (o_proj, down_proj), all thinned
    before, after = rec["mean_rel_error"]
    assert after < before
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # refit adds no parameter: the FLAP bias is replaced, not added
        assert load_pruned(tmp_path / "run" / "model")(ids).logits.isfinite().all()
    assert summary["params"]["pruned_total"] == summary["params"]["dense_total"] - (
        summary["params"]["dense_prunable"] - summary["params"]["pruned_prunable"]
    )
    plain = run_baseline(
        load_config(root / "configs" / "tiny" / "smoke.yaml"), method, tmp_path / "plain", progress=False
    )
    without = summary["without_reconstruction"]  # the same baseline as it is returned without reconstruction
    assert not without["same_model"] and without["sparsity"] == plain["sparsity"]
    for seq_len, value in plain["pruned_ppl"].items():  # FLAP's own bias compensation included
        assert without["pruned_ppl"][seq_len] == pytest.approx(value, rel=1e-6)
        assert summary["pruned_ppl"][seq_len] != pytest.approx(value, rel=1e-3)
    from probprune.run_folder import format_summary

    lines = format_summary(summary).splitlines()  # the printed table has both rows, the plain one first
    (plain_row,) = [i for i, x in enumerate(lines) if x.startswith(f"| {method}, without reconstruction |")]
    assert lines[plain_row + 1].startswith(f"| {method} + reconstruction |")
    for value in without["pruned_ppl"].values():
        assert f"{value:.2f}" in lines[plain_row]


def test_a_removed_layer_is_folded_into_the_down_proj_before_it():
    """ReplaceMe-style: layer 1 removed, layer 0 kept whole; layer 0's down_proj is re-fit so that its output also
    carries what layer 1 added: the target is z W⁰ᵀ + (h₂ − h₁) of the dense model, solved by a direct lstsq."""
    model = tiny_model("llama", num_hidden_layers=3).double()
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = space.full_mask()
    mask[_units(space, HEAD, 1)] = 0
    mask[_units(space, CHANNEL, 1)] = 0  # layer 1 is gone
    blocks = _blocks(model, n=8, t=16)
    damping = 0.05
    plain = reconstruct_local(model, space, mask, blocks, damping=damping)
    assert not plain.weights  # nothing thinned: without removed_layers nothing changes
    rec = reconstruct_local(model, space, mask, blocks, damping=damping, removed_layers=True)
    assert set(rec.weights) == {0} and set(rec.weights[0]) == {"down_proj"}
    z = _capture_inputs(model, adapter.mlp_out(0), blocks)  # [nT, I]
    with torch.no_grad():
        hs = model(blocks, output_hidden_states=True).hidden_states
    w0 = adapter.mlp_out(0).weight.detach().double()
    y = z @ w0.T + (hs[2] - hs[1]).flatten(0, 1)  # [nT, H]
    lam = damping * float(torch.diagonal(z.T @ z).mean())
    a = torch.cat([z, lam**0.5 * torch.eye(z.shape[1], dtype=torch.float64)])
    b = torch.cat([y, lam**0.5 * w0.T])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(rec.weights[0]["down_proj"], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_a_baseline_with_nothing_to_re_fit_is_returned_as_it_is_and_not_called_reconstructed(tmp_path):
    """ShortGPT removes whole layers only; with the fold off there is no sublayer to solve: the run returns the
    baseline's model, unlabelled, with no check-set scoring of an identical model and no second evaluation."""
    from pathlib import Path

    from probprune import pipeline
    from probprune.config import load_config

    smoke = Path(__file__).resolve().parents[1] / "configs/tiny/smoke.yaml"
    over = ["reconstruct.enabled=true", "reconstruct.removed_layers=false", "search.check_blocks=8"]
    summary = pipeline.run_baseline(load_config(smoke, over), "shortgpt", tmp_path / "r")
    plain = pipeline.run_baseline(load_config(smoke), "shortgpt", tmp_path / "p")
    assert summary["method_label"] == "shortgpt"
    assert "reconstruct" not in summary and "check" not in summary
    assert "eval_without_reconstruction" not in summary["timings"]
    assert summary["without_reconstruction"]["same_model"] is True
    for seq_len, value in plain["pruned_ppl"].items():
        assert summary["pruned_ppl"][seq_len] == pytest.approx(value, rel=1e-6)
        assert summary["without_reconstruction"]["pruned_ppl"][seq_len] == summary["pruned_ppl"][seq_len]


@pytest.mark.parametrize("method, spoil", [("shortgpt", False), ("flap", True)])
def test_a_baseline_keeps_its_reconstruction_only_where_it_lowers_the_check_set_loss(
    method, spoil, tmp_path, monkeypatch
):
    """With a check set, ``probprune baseline`` scores its model as it is (FLAP: with its biases) and reconstructed on
    held-out calibration blocks and returns the better: ShortGPT's re-fit (its removed layers folded in) is kept, a
    spoiled one (columns × 30) is refused and FLAP comes back with its own biases."""
    import dataclasses
    from pathlib import Path

    from probprune import pipeline
    from probprune.config import load_config

    root = Path(__file__).resolve().parents[1]
    over = ["reconstruct.enabled=true", "reconstruct.blocks=56", "search.check_blocks=8"]
    real = pipeline.reconstruct

    def spoiled(s, mask, own):
        rec = real(s, mask, own)
        weights = {li: {w: 30 * t for w, t in parts.items()} for li, parts in rec.weights.items()}
        return dataclasses.replace(rec, weights=weights)

    if spoil:
        monkeypatch.setattr(pipeline, "reconstruct", spoiled)
    summary = pipeline.run_baseline(load_config(root / "configs/tiny/smoke.yaml", over), method, tmp_path / "r")
    plain = pipeline.run_baseline(load_config(root / "configs/tiny/smoke.yaml"), method, tmp_path / "p")
    chk = summary["check"]
    assert chk["blocks"] == 8 and chk["reconstructed"] == (chk["loss_reconstructed"] <= chk["loss"])
    assert chk["reconstructed"] != spoil  # the real re-fit helps on this model; the spoiled one does not
    assert ("reconstruct" in summary) == chk["reconstructed"]
    for seq_len, value in plain["pruned_ppl"].items():  # the plain model, as the plain baseline returns it
        assert summary["without_reconstruction"]["pruned_ppl"][seq_len] == pytest.approx(value, rel=1e-6)
        if spoil:  # refused: the returned model is the plain one
            assert summary["pruned_ppl"][seq_len] == pytest.approx(value, rel=1e-6)
    assert summary["method_label"] == method + ("" if spoil else " + reconstruction")


def test_removed_layers_are_not_folded_where_sublayer_outputs_are_normed(caplog, monkeypatch):
    """Gemma 3 norms each sublayer's output before the residual add, so a removed layer cannot be folded into the
    down_proj before it: with layer 1 removed and the rest whole, reconstruction changes nothing (and says so once
    per process, however often it runs); the same mask on LLaMA re-fits layer 0's down_proj."""
    from probprune import reconstruct as rmod
    from probprune.reconstruct import folds_removed_layers

    monkeypatch.setattr(rmod, "_WARNED_NO_FOLD", set())
    for family, folded in (("gemma3", False), ("gemma3", False), ("llama", True)):
        model = tiny_model(family, num_hidden_layers=3).double()
        adapter = get_adapter(model)
        assert folds_removed_layers(adapter) is folded
        space = adapter.mask_space()
        mask = space.full_mask()
        mask[_units(space, HEAD, 1)] = 0
        mask[_units(space, CHANNEL, 1)] = 0  # layer 1 is gone
        rec = reconstruct_local(model, space, mask, _blocks(model, n=4, t=16), removed_layers=True)
        assert set(rec.weights) == ({0} if folded else set()), family
    assert sum("not folded in for gemma3" in r.getMessage() for r in caplog.records) == 1
