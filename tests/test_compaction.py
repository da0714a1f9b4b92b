import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.compaction import compact, count_params, save_pruned
from probprune.errors import UserError
from probprune.mask_space import CHANNEL, HEAD, LAYER
from probprune.masked_forward import masked_logits
from probprune.models import get_adapter, tiny_model
from probprune.models.loading import load_pruned

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32


def _random_mask(space, seed, p=0.5):
    m = (np.random.default_rng(seed).random(space.num_units) < p).astype(np.float32)
    return m


def _roundtrip(model, tmp_path, name="m"):
    path = save_pruned(model, tmp_path / name)
    return load_pruned(path), AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def test_masked_equals_compacted_equals_reloaded(tiny_kind, tmp_path):
    model = tiny_model(tiny_kind)
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True)
    mask = _random_mask(space, 0)
    mask[space.type_slice(LAYER)] = 1
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    want = masked_logits(adapter, space, mask, x)
    small = compact(model, space, mask)
    got = small(input_ids=x).logits
    torch.testing.assert_close(got, want, **TOL)
    assert count_params(small) == space.total_params - (space.prunable_params - space.kept_params(mask))
    ours, stock = _roundtrip(small, tmp_path)
    torch.testing.assert_close(ours(input_ids=x).logits, got, rtol=0, atol=0)
    torch.testing.assert_close(stock(input_ids=x).logits, got, rtol=0, atol=0)
    out = stock.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
    assert torch.equal(out, small.generate(x[:1, :4], max_new_tokens=6, do_sample=False))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert [(s["num_key_value_heads"], s["intermediate_size"]) for s in cfg["probprune_layout"]] == [
        (
            int(
                mask[space.type_slice(HEAD)][
                    li * space.layers[0].num_kv_heads : (li + 1) * space.layers[0].num_kv_heads
                ].sum()
            ),
            int(mask[space.type_slice(CHANNEL)][li * 96 : (li + 1) * 96].sum()),
        )
        for li in range(space.num_layers)
    ]


def test_original_model_untouched_by_compaction():
    model = tiny_model()
    space = get_adapter(model).mask_space()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact(model, space, _random_mask(space, 1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_layer_drop_renumbers_and_generates(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True)
    mask = space.full_mask()
    lay = space.type_slice(LAYER)
    mask[lay.start + 1] = 0
    mask[lay.start + 2] = 0
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    want = masked_logits(adapter, space, mask, x)
    small = compact(model, space, mask)
    assert small.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    assert small.config.probprune_source_layers == [0, 3]
    torch.testing.assert_close(small(input_ids=x).logits, want, **TOL)
    # uniform widths: the folder loads with stock classes, no remote code
    path = save_pruned(small, tmp_path / "uniform")
    assert not (path / "modeling_probprune.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(path)
    assert type(stock).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(stock(input_ids=x).logits, small(input_ids=x).logits, rtol=0, atol=0)
    stock.generate(x[:1, :3], max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("empty", ["heads", "channels", "both"])
def test_empty_sublayers(empty, tmp_path):
    model = tiny_model("qwen2")  # biased q/k/v: empty attention must still be exact
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = _random_mask(space, 2, p=0.7)
    if empty in ("heads", "both"):
        mask[0:4] = 0  # all KV groups of layer 0
    if empty in ("channels", "both"):
        mask[space.type_slice(CHANNEL).start : space.type_slice(CHANNEL).start + 96] = 0  # all channels of layer 0
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    want = masked_logits(adapter, space, mask, x)
    small = compact(model, space, mask)
    torch.testing.assert_close(small(input_ids=x).logits, want, **TOL)
    if empty == "both":
        assert small.config.num_hidden_layers == 1  # nothing left in layer 0: dropped
    ours, stock = _roundtrip(small, tmp_path)
    torch.testing.assert_close(stock(input_ids=x).logits, small(input_ids=x).logits, rtol=0, atol=0)
    out = stock.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(out, small.generate(x[:1, :4], max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("empty", ["heads", "channels"])
def test_an_emptied_sublayer_given_an_output_bias_keeps_the_models_dtype(empty, tmp_path):
    """A sublayer with nothing left that receives an output bias (FLAP's compensation, a reconstruction): the
    bias is created in the model's dtype, so a bfloat16 model stays bfloat16 through the layer, and reloads so."""
    model = tiny_model("llama").to(torch.bfloat16)
    adapter = get_adapter(model)
    space = adapter.mask_space()
    mask = space.full_mask()
    t = HEAD if empty == "heads" else CHANNEL
    mask[(space.unit_type == t) & (space.unit_layer == 0)] = 0
    key = "o_bias" if empty == "heads" else "down_bias"
    bias = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # float32, as solved
    small = compact(model, space, mask, override={0: {key: bias}})
    layer = get_adapter(small).layers[0]
    added = layer.self_attn.o_bias if empty == "heads" else layer.mlp.down_bias
    assert added.dtype == torch.bfloat16
    torch.testing.assert_close(added.float(), bias.to(torch.bfloat16).float(), rtol=0, atol=0)
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = small(input_ids=x).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    save_pruned(small, tmp_path / "m")
    layer = get_adapter(load_pruned(tmp_path / "m")).layers[0]
    reloaded = layer.self_attn.o_bias if empty == "heads" else layer.mlp.down_bias
    assert reloaded.dtype == torch.bfloat16 and torch.equal(reloaded, added)


def test_compacting_a_compacted_model_composes(tmp_path):
    model = tiny_model()
    adapter = get_adapter(model)
    space = adapter.mask_space()
    m1 = _random_mask(space, 3, p=0.8)
    small = compact(model, space, m1)
    space2 = get_adapter(small).mask_space()
    m2 = _random_mask(space2, 4, p=0.8)
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    want = masked_logits(get_adapter(small), space2, m2, x)
    smaller = compact(small, space2, m2)
    torch.testing.assert_close(smaller(input_ids=x).logits, want, **TOL)


@pytest.mark.slow
def test_smollm2_half_mask_roundtrip(smollm2, tmp_path):
    model, tok = smollm2
    adapter = get_adapter(model)
    space = adapter.mask_space()
    rng = np.random.default_rng(0)
    mask = np.zeros(space.num_units, dtype=np.float32)
    heads, chans = space.type_slice(HEAD), space.type_slice(CHANNEL)
    mask[heads.start + rng.choice(90, 45, replace=False)] = 1
    mask[chans.start + rng.choice(46_080, 23_040, replace=False)] = 1
    x = tok("The jury said the election was conducted fairly and that", return_tensors="pt").input_ids
    want = masked_logits(adapter, space, mask, x)
    small = compact(model, space, mask)
    got = small(input_ids=x).logits
    # fp32, 30 layers, different matmul shapes: logits (|x| ~ 20) agree to 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert count_params(small) == space.total_params - (space.prunable_params - space.kept_params(mask))
    path = save_pruned(small, tmp_path / "smol", tokenizer=tok)
    stock = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    torch.testing.assert_close(stock(input_ids=x).logits, got, rtol=0, atol=0)
    assert (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()


@pytest.mark.parametrize("kind", ["llama", "phi3", "gemma3-mqa"])
def test_streamed_compaction_of_a_sharded_checkpoint_equals_compact_then_save(kind, tmp_path):
    from probprune.compaction import compact_checkpoint

    model = tiny_model(kind)
    adapter = get_adapter(model)
    space = adapter.mask_space(layers=True, channel_block=8, query_heads=kind == "gemma3-mqa")
    mask = _random_mask(space, 3, p=0.6)
    mask[np.flatnonzero(space.unit_type == LAYER)[:2]] = [1, 0]  # the first layer stays, the second is dropped
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")  # several source shards
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    out = compact_checkpoint(tmp_path / "src", space, mask, tmp_path / "out", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists()  # several output shards
    want = compact(model, space, mask)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    got = load_pruned(out)
    assert [tuple(p.shape) for p in got.parameters()] == [tuple(p.shape) for p in want.parameters()]
    torch.testing.assert_close(got(input_ids=x).logits, want(input_ids=x).logits, rtol=0, atol=0)
    # again from the pruned folder: layouts, renumbered layers and source indices carry over
    space2 = get_adapter(got).mask_space(channel_block=4)
    mask2 = _random_mask(space2, 4, p=0.7)
    again = compact_checkpoint(out, space2, mask2, tmp_path / "again")
    torch.testing.assert_close(
        load_pruned(again)(input_ids=x).logits, compact(got, space2, mask2)(input_ids=x).logits, rtol=0, atol=0
    )
    assert (
        json.loads((again / "config.json").read_text())["probprune_source_layers"]
        == compact(got, space2, mask2).config.probprune_source_layers
    )


def test_streamed_compaction_needs_safetensors(tmp_path):
    from probprune.compaction import compact_checkpoint
    from probprune.errors import UserError

    model = tiny_model("llama")
    space = get_adapter(model).mask_space()
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="neither model.safetensors nor model.safetensors.index.json"):
        compact_checkpoint(tmp_path / "src", space, space.full_mask(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _uniform_mask(space, keep_heads=2, keep_channels=48):
    """The same heads and channels kept in every layer: the compacted model is a stock-shaped checkpoint."""
    mask = np.zeros(space.num_units, dtype=np.float32)
    for li in range(space.num_layers):
        mask[np.flatnonzero((space.unit_type == HEAD) & (space.unit_layer == li))[:keep_heads]] = 1
        mask[np.flatnonzero((space.unit_type == CHANNEL) & (space.unit_layer == li))[:keep_channels]] = 1
    return mask


def test_load_pruned_keeps_the_saved_dtype_like_from_pretrained(tmp_path):
    model = tiny_model("llama")
    space = get_adapter(model).mask_space()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    uniform = save_pruned(compact(model, space, _uniform_mask(space)).to(torch.bfloat16), tmp_path / "uniform")
    assert json.loads((uniform / "config.json").read_text()).get("probprune_layout") is None  # stock shapes
    ours, stock = load_pruned(uniform), AutoModelForCausalLM.from_pretrained(uniform)
    assert ours.dtype == stock.dtype == torch.bfloat16
    torch.testing.assert_close(ours(input_ids=x).logits, stock(input_ids=x).logits, rtol=0, atol=0)

    mask = _uniform_mask(space)
    mask[np.flatnonzero((space.unit_type == CHANNEL) & (space.unit_layer == 1))[48:80]] = 1  # layer 1 wider
    per_layer = save_pruned(compact(model, space, mask).to(torch.float16), tmp_path / "per_layer")
    assert json.loads((per_layer / "config.json").read_text())["probprune_layout"][1]["intermediate_size"] == 80
    assert load_pruned(per_layer).dtype == torch.float16
    assert load_pruned(per_layer, dtype="float32").dtype == torch.float32
    assert load_pruned(per_layer, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_pruned(per_layer, device_map="cpu").lm_head.weight.device.type == "cpu"
    assert all(p.dtype == torch.float16 for p in load_pruned(per_layer, device_map={"": "cpu"}).parameters())
    with pytest.raises(UserError, match="dtype must be 'auto' or one of float32, bfloat16, float16, got 'int8'"):
        load_pruned(per_layer, dtype="int8")
