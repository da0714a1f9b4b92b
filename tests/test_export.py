"""GGUF export: read the file back with ``gguf.GGUFReader`` and compare shapes, metadata and every tensor with the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probprune.compaction import compact, save_pruned
from probprune.errors import UserError
from probprune.export import export_gguf, unpermute_rope_rows
from probprune.masks import CHANNEL, HEAD
from probprune.models import get_adapter, tiny_model
from probprune.models.loading import byte_tokenizer

from conftest import hetero_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _field(reader, key):
    f = reader.fields[key]
    vals = [f.parts[i] for i in f.data]
    if len(vals) == 1 and f.types and f.types[0] != 9:  # scalar
        v = vals[0]
        return bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0]
    return [bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0] for v in vals]


def _tensors(reader):
    import gguf

    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest first
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (0, 1) else np.asarray(t.data)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(shape)
    return out


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """A tiny 4-layer model compacted to: thinned, attention-free, MLP-free, and untouched layers."""
    _, pruned = hetero_tiny()
    folder = save_pruned(pruned, tmp_path_factory.mktemp("m") / "model", byte_tokenizer())
    return pruned, folder


def test_heterogeneous_model_exports_as_deci_with_exact_tensors(hetero, tmp_path):
    import gguf

    pruned, folder = hetero
    res = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    cfg = pruned.config
    assert res["arch"] == "deci" and _field(reader, "general.architecture") == "deci"
    # per-layer widths: layer 2 (no MLP, heads kept) carries a 1-channel zero MLP (see probprune.export)
    assert _field(reader, "deci.attention.head_count") == [6, 0, 8, 8]
    assert _field(reader, "deci.attention.head_count_kv") == [3, 0, 4, 4]
    assert _field(reader, "deci.feed_forward_length") == [56, 96, 1, 96]
    assert _field(reader, "deci.block_count") == 4
    assert _field(reader, "deci.embedding_length") == cfg.hidden_size
    assert _field(reader, "deci.context_length") == cfg.max_position_embeddings
    assert _field(reader, "deci.attention.key_length") == _field(reader, "deci.attention.value_length") == 8
    assert _field(reader, "deci.rope.freq_base") == pytest.approx(float(cfg.rope_theta if hasattr(cfg, "rope_theta")
                                                                        else cfg.rope_parameters["rope_theta"]))
    assert _field(reader, "deci.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert _field(reader, "deci.vocab_size") == cfg.vocab_size
    assert len(_field(reader, "tokenizer.ggml.tokens")) == cfg.vocab_size
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 256  # <eos> of the byte tokenizer

    t = _tensors(reader)
    layers = pruned.model.layers
    sd = {k: v.float().numpy() for k, v in pruned.state_dict().items()}
    np.testing.assert_array_equal(t["token_embd.weight"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(t["output_norm.weight"], sd["model.norm.weight"])
    assert ("output.weight" in t) == (not cfg.tie_word_embeddings)
    for i, (n_head, n_kv) in enumerate([(6, 3), (0, 0), (8, 4), (8, 4)]):
        p = f"model.layers.{i}."
        if n_head:
            np.testing.assert_array_equal(unpermute_rope_rows(t[f"blk.{i}.attn_q.weight"], n_head),
                                          sd[p + "self_attn.q_proj.weight"])
            np.testing.assert_array_equal(unpermute_rope_rows(t[f"blk.{i}.attn_k.weight"], n_kv),
                                          sd[p + "self_attn.k_proj.weight"])
            np.testing.assert_array_equal(t[f"blk.{i}.attn_v.weight"], sd[p + "self_attn.v_proj.weight"])
            np.testing.assert_array_equal(t[f"blk.{i}.attn_output.weight"], sd[p + "self_attn.o_proj.weight"])
            np.testing.assert_array_equal(t[f"blk.{i}.attn_norm.weight"], sd[p + "input_layernorm.weight"])
        else:  # attention-free: llama.cpp reads no attention tensors (extra tensors would fail its load)
            assert not any(k.startswith(f"blk.{i}.attn") for k in t)
        np.testing.assert_array_equal(t[f"blk.{i}.ffn_norm.weight"], sd[p + "post_attention_layernorm.weight"])
        if i == 2:
            assert not t["blk.2.ffn_down.weight"].any() and t["blk.2.ffn_down.weight"].shape == (cfg.hidden_size, 1)
        else:
            for name, proj in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                np.testing.assert_array_equal(t[f"blk.{i}.{name}.weight"], sd[p + f"mlp.{proj}.weight"])
    assert len(layers) == 4
    # the permutation is llama.cpp's: rotate-half pairs (j, j + d/2) become adjacent rows (2j, 2j + 1)
    q = sd["model.layers.3.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(t["blk.3.attn_q.weight"][1], q[4])  # head 0, d = 8: row 4 follows row 0


def test_uniform_model_exports_as_plain_llama(tmp_path):
    import gguf

    model = tiny_model("llama")
    folder = save_pruned(model, tmp_path / "dense", byte_tokenizer())
    assert export_gguf(folder, tmp_path / "d.gguf", outtype="f16")["arch"] == "llama"
    reader = gguf.GGUFReader(tmp_path / "d.gguf")
    assert _field(reader, "llama.attention.head_count") == 8
    assert _field(reader, "llama.attention.head_count_kv") == 4
    assert _field(reader, "llama.feed_forward_length") == 96
    t = _tensors(reader)
    w = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_allclose(t["blk.1.ffn_down.weight"], w, rtol=1e-3, atol=1e-4)  # f16
    assert t["blk.1.ffn_norm.weight"].dtype == np.float32  # norms are always float32


def test_q8_0_export_is_close(hetero, tmp_path):
    import gguf

    pruned, folder = hetero
    export_gguf(folder, tmp_path / "q.gguf", outtype="q8_0")
    t = _tensors(gguf.GGUFReader(tmp_path / "q.gguf"))
    w = pruned.model.layers[3].mlp.up_proj.weight.detach().numpy()
    assert np.abs(t["blk.3.ffn_up.weight"] - w).max() <= np.abs(w).max() / 127 + 1e-6  # one q8_0 step


def test_unsupported_models_and_arguments_are_refused(tmp_path):
    with pytest.raises(UserError, match="GGUF export supports LlamaForCausalLM, MistralForCausalLM; this model is "
                                        "Qwen2ForCausalLM"):
        export_gguf("tiny:qwen2", tmp_path / "x.gguf")
    with pytest.raises(UserError, match="--outtype must be one of f32, f16, bf16, q8_0, got 'q4'"):
        export_gguf("tiny:llama", tmp_path / "x.gguf", outtype="q4")
    with pytest.raises(UserError, match="path not found"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_smollm2_export_carries_tokenizer_and_chat_template(tmp_path):
    import gguf

    res = export_gguf("embedded:smollm2-135m", tmp_path / "s.gguf", outtype="f16")
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    assert res["arch"] == "llama" and res["layers"] == 30
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == 49152
    assert len(_field(reader, "tokenizer.ggml.merges")) > 40000
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")
    assert _field(reader, "llama.attention.head_count") == 9 and _field(reader, "llama.attention.head_count_kv") == 3
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(100000.0)


def test_load_pruned_runs_no_code_from_the_folder(hetero, tmp_path):
    """The folder's modeling_probprune.py is only for trust_remote_code users; probprune's loader never imports it."""
    import shutil

    from probprune.models.loading import load_pruned

    pruned, folder = hetero
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "modeling_probprune.py").write_text("raise RuntimeError('folder code was executed')\n")
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pruned(x).logits
        torch.testing.assert_close(load_pruned(copy)(x).logits, want, rtol=0, atol=0)
        (copy / "modeling_probprune.py").unlink()  # and with no Python file at all
        torch.testing.assert_close(load_pruned(copy)(x).logits, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ stock shapes
def test_uniform_shape_search_gives_a_stock_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from probprune.models.loading import load_pruned
    from probprune.config import load_config
    from probprune.pipeline import prune

    cfg = load_config("configs/tiny/smoke.yaml", ["mask.shape=uniform", "mask.channel_block=8", "search.steps=4"])
    summary = prune(cfg, tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "model"
    assert not (folder / "modeling_probprune.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    assert type(stock).__name__ == "LlamaForCausalLM" and not getattr(stock.config, "probprune_layout", None)
    widths = {layer.mlp.gate_proj.out_features for layer in stock.model.layers}
    heads = {layer.self_attn.k_proj.out_features for layer in stock.model.layers}
    assert len(widths) == 1 and len(heads) == 1  # one shape for every layer
    assert summary["sparsity"]["prunable"] == pytest.approx(0.5, abs=0.01)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, load_pruned(folder)(x).logits, rtol=0, atol=0)
    masks = torch.load(tmp_path / "run" / "masks.pt", weights_only=True)
    probs, final = masks["probs"].numpy(), masks["final_mask"].numpy()
    space = get_adapter(tiny_model("llama")).mask_space(channel_block=8)
    for li in range(space.num_layers):  # each layer keeps its own top units by probability: the search chose them
        for t in (HEAD, CHANNEL):
            g = np.flatnonzero((space.unit_type == t) & (space.unit_layer == li))
            kept, dropped = g[final[g] == 1], g[final[g] == 0]
            assert probs[kept].min() >= probs[dropped].max()


@pytest.mark.parametrize("overrides, message", [
    (["mask.shape=uniform", "search.method=allocation"], "mask.shape='uniform'.*requires search.method='units'"),
    (["mask.shape=uniform", "search.init=best", "search.check_blocks=4"], "mask.shape='uniform'.*search.init='best'"),
    (["mask.shape=uniform", "mask.layers=true", "search.budget=params"], "requires mask.layers=false"),
    (["mask.shape=round"], "mask.shape.*'free', 'uniform'"),
])
def test_uniform_shape_settings_are_checked(overrides, message):
    from probprune.config import load_config
    from probprune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny/smoke.yaml", overrides)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_runs_the_exported_model_with_the_same_logits(hetero, tmp_path, outtype):
    """The real runtime: llama.cpp's logits of the exported heterogeneous model equal the compacted model's (q8_0:
    within the rounding of 8-bit weights; the one-channel stand-in MLP of the MLP-free layer stays f16 in it)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.skip("llama_cpp is not installed (pip install 'probprune[llamacpp]' builds it); the GGUF tensors and "
                    "shapes are still checked exactly by the tests above")
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pruned, folder = hetero
    # llama.cpp needs at least one BPE merge: the same byte vocabulary plus one merged token
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<eos>": 256, "ab": 257}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>").save_pretrained(copy)
    path = tmp_path / "m.gguf"
    assert export_gguf(copy, path, outtype=outtype)["arch"] == "deci"
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    llm = Llama(model_path=str(path), n_ctx=16, n_batch=16, logits_all=True, n_threads=1, verbose=False,
                type_k=0, type_v=0)  # an f32 KV cache (the default f16 one rounds keys and values)
    llm.eval([int(t) for t in ids[0]])
    got = np.asarray(llm.scores[:12], dtype=np.float32)  # [T, V]
    with torch.no_grad():
        want = pruned(ids).logits[0].float().numpy()  # [T, V]
    scale = max(1.0, float(np.abs(want).max()))
    if outtype == "f32":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-2 * scale)
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
