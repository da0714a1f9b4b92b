"""GGUF export: read the file back with ``gguf.GGUFReader`` and compare shapes, metadata and every tensor with the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hetero_tiny

from probprune.compaction import compact, save_pruned
from probprune.errors import UserError
from probprune.export import export_gguf, unpermute_rope_rows
from probprune.mask_space import CHANNEL, HEAD
from probprune.models import get_adapter, tiny_model
from probprune.models.loading import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]

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
    assert _field(reader, "deci.rope.freq_base") == pytest.approx(
        float(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    )
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
            np.testing.assert_array_equal(
                unpermute_rope_rows(t[f"blk.{i}.attn_q.weight"], n_head), sd[p + "self_attn.q_proj.weight"]
            )
            np.testing.assert_array_equal(
                unpermute_rope_rows(t[f"blk.{i}.attn_k.weight"], n_kv), sd[p + "self_attn.k_proj.weight"]
            )
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
    with pytest.raises(
        UserError, match="GGUF export supports LlamaForCausalLM, MistralForCausalLM; this model is Qwen2ForCausalLM"
    ):
        export_gguf("tiny:qwen2", tmp_path / "x.gguf")
    with pytest.raises(
        UserError, match="--outtype must be one of f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k, q4_0, got 'q4'"
    ):
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

    from probprune.config import load_config
    from probprune.models.loading import load_pruned
    from probprune.pipeline import prune

    cfg = load_config(
        ROOT / "configs" / "tiny" / "smoke.yaml", ["mask.shape=uniform", "mask.channel_block=8", "search.steps=4"]
    )
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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mask.shape=uniform", "search.method=allocation"], "mask.shape='uniform'.*requires search.method='units'"),
        (
            ["mask.shape=uniform", "search.init=best", "search.check_blocks=4"],
            "mask.shape='uniform'.*search.init='best'",
        ),
        (["mask.shape=uniform", "mask.layers=true", "search.budget=params"], "requires mask.layers=false"),
        (["mask.shape=round"], "mask.shape.*'free', 'uniform'"),
    ],
)
def test_uniform_shape_settings_are_checked(overrides, message):
    from probprune.config import load_config
    from probprune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny" / "smoke.yaml", overrides)


def _llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp is not installed (pip install 'probprune[llamacpp]' builds it)")
    return llama_cpp


def _with_merges(folder, tmp_path):
    """A copy of ``folder`` whose tokenizer has one BPE merge (llama.cpp refuses a vocabulary without merges)."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<eos>": 256, "ab": 257}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>").save_pretrained(copy)
    return copy


def _llama_cpp_logits(path, ids):
    from probprune.export import open_llama_cpp

    llm = open_llama_cpp(path, n_ctx=16, n_batch=16, logits_all=True, n_threads=1, verbose=False, type_k=0, type_v=0)
    llm.eval([int(t) for t in ids[0]])
    return np.asarray(llm.scores[: ids.shape[1]], dtype=np.float32)  # [T, V]


def llama_cpp_logits(pruned, folder, tmp_path, outtype: str, arch: str) -> tuple[np.ndarray, np.ndarray]:
    """``(llama.cpp's logits, the model's logits)`` ``[12, V]`` of ``folder`` exported as GGUF in ``outtype``, which
    must be written as ``arch`` (skips the test without llama_cpp; an f32 KV cache: the default f16 one rounds keys
    and values)."""
    _llama_cpp_or_skip()  # without it, the GGUF tensors and shapes are still checked exactly by the tests above
    path = tmp_path / "m.gguf"
    assert export_gguf(_with_merges(folder, tmp_path), path, outtype=outtype)["arch"] == arch
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    got = _llama_cpp_logits(path, ids)
    with torch.no_grad():
        want = pruned(ids).logits[0].float().numpy()  # [T, V]
    return got, want


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_runs_the_exported_model_with_the_same_logits(hetero, tmp_path, outtype):
    """The real runtime: llama.cpp's logits of the exported heterogeneous model equal the compacted model's (q8_0:
    within the rounding of 8-bit weights; the one-channel stand-in MLP of the MLP-free layer stays f16 in it)."""
    pruned, folder = hetero
    got, want = llama_cpp_logits(pruned, folder, tmp_path, outtype, "deci")
    scale = max(1.0, float(np.abs(want).max()))
    if outtype == "f32":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-2 * scale)
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999


def _model_with_gguf_weights(pruned, path):
    """A copy of ``pruned`` whose matrices are the GGUF file's (dequantized, RoPE rows permuted back)."""
    import copy

    import gguf

    from probprune.export import layer_shapes
    from probprune.models.modeling_probprune import EmptyMLP

    t = _tensors(gguf.GGUFReader(str(path)))
    model = copy.deepcopy(pruned)
    roles = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i, (layer, shape) in enumerate(zip(model.model.layers, layer_shapes(model))):
        for name, module in roles.items():
            key = f"blk.{i}.{name}.weight"
            if key not in t or (name.startswith("ffn") and isinstance(layer.mlp, EmptyMLP)):
                continue
            w = t[key]
            if name in ("attn_q", "attn_k"):
                w = unpermute_rope_rows(w, shape["n_head"] if name == "attn_q" else shape["n_head_kv"])
            layer.get_submodule(module).weight.data = torch.from_numpy(np.ascontiguousarray(w))
    model.model.embed_tokens.weight.data = torch.from_numpy(t["token_embd.weight"])
    model.lm_head.weight.data = torch.from_numpy(t["output.weight"])
    return model


def _types(path):
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def hetero256(tmp_path_factory):
    """A 4-layer model with 256-wide rows (hidden 256, head length 32, MLP 512) compacted to: one KV group and five
    32-channel blocks fewer (rows of 192 and 352: not 256-multiples), attention-free, MLP-free, untouched."""
    model = tiny_model("llama", num_hidden_layers=4, hidden_size=256, intermediate_size=512, head_dim=32)
    space = get_adapter(model).mask_space(channel_block=32)
    mask = space.full_mask()
    units = lambda t, li: np.flatnonzero((space.unit_type == t) & (space.unit_layer == li))
    mask[units(HEAD, 0)[:1]] = 0
    mask[units(CHANNEL, 0)[:5]] = 0
    mask[units(HEAD, 1)] = 0
    mask[units(CHANNEL, 2)] = 0
    pruned = compact(model, space, mask)
    return pruned, save_pruned(pruned, tmp_path_factory.mktemp("m256") / "model", byte_tokenizer())


# outtype: (the type of a 256-multiple row, the fallback for a row of 192 or 352 columns)
QUANTS = {"q4_k_m": ("Q4_K", "Q5_0"), "q5_k_m": ("Q5_K", "Q5_1"), "q6_k": ("Q6_K", "Q8_0"), "q4_0": ("Q4_0", "Q4_0")}


@pytest.mark.parametrize("outtype", list(QUANTS))
def test_llama_cpp_quantizes_pruned_shapes_and_runs_them(hetero256, tmp_path, outtype):
    """llama.cpp's quantizer on pruned shapes (see probprune.export): full rows get the k-quant, thinned rows its
    32-block fallback, the MLP-free layer's one-channel stand-in stays F16; the file runs close to the model."""
    _llama_cpp_or_skip()
    pruned, folder = hetero256
    copy = _with_merges(folder, tmp_path)
    res = export_gguf(copy, tmp_path / "q.gguf", outtype=outtype)
    assert res["arch"] == "deci" and res["bytes"] == (tmp_path / "q.gguf").stat().st_size
    types = _types(tmp_path / "q.gguf")
    assert res["tensor_types"] == {k: list(types.values()).count(k) for k in sorted(set(types.values()))}
    full, fallback = QUANTS[outtype]
    assert types["blk.3.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == types["blk.3.attn_output.weight"] == full
    assert types["blk.0.attn_output.weight"] == types["blk.0.ffn_down.weight"] == fallback  # 192 / 352 columns
    assert types["blk.2.ffn_gate.weight"] == types["blk.2.ffn_down.weight"] == "F16"  # the one-channel stand-in
    assert types["blk.0.attn_norm.weight"] == "F32" and "blk.1.attn_q.weight" not in types
    if outtype == "q4_k_m":  # its mix: more bits for the last layer's ffn_down and attn_v
        assert types["blk.3.ffn_down.weight"] == types["blk.3.attn_v.weight"] == "Q6_K"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "q.gguf"]  # no intermediate left
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    got = _llama_cpp_logits(tmp_path / "q.gguf", ids)  # [T, V]
    with torch.no_grad():  # the same quantized weights in PyTorch: llama.cpp runs what the file holds
        want = _model_with_gguf_weights(pruned, tmp_path / "q.gguf")(ids).logits[0].float().numpy()
        dense = pruned(ids).logits[0].float().numpy()
    # llama.cpp rounds the activations of quantized matrix products to 8 bits (Q8_0/Q8_K): close, not equal
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.995  # vs the f32 model: 0.76-0.98 on this model
    assert np.abs(got - want).max() < np.abs(got - dense).max()  # nearer its own weights than the f32 model


def test_k_quants_without_llama_cpp_say_how_to_install_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(UserError, match=r"llama.cpp's quantizer: pip install 'probprune\[llamacpp\]'"):
        export_gguf("tiny:llama", tmp_path / "q.gguf", outtype="q4_k_m")
    assert not list(tmp_path.iterdir())
