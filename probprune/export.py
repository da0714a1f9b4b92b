"""Export a (pruned) model folder to one GGUF file that llama.cpp runs without the Hugging Face folder.

Shapes: a model whose decoder layers all have the same query heads, KV heads and MLP width is written as llama.cpp's
plain ``llama`` architecture. Otherwise it is written as ``deci`` (the architecture llama.cpp uses for Nemotron-NAS
models), which reads the query-head count, the KV-head count and the MLP width **per layer** from the arrays
``deci.attention.head_count``, ``deci.attention.head_count_kv`` and ``deci.feed_forward_length``:

- a layer with no heads left is attention-free (0 / 0 heads): llama.cpp passes its input straight to the MLP;
- a layer with no MLP channels left *and* heads left is written with a one-channel MLP whose down-projection is zero
  (it adds exactly 0): llama.cpp's ``deci`` graph skips the rest of a layer whose MLP width is 0, attention output
  included, so a width of 0 is only right for a layer with neither heads nor channels;
- a layer with neither is written as 0 / 0 / 0 (llama.cpp treats it as the identity); layers removed whole by a
  search are simply not there.

Tensors follow llama.cpp's names (``blk.N.attn_q.weight`` …); the query and key rows of each head are permuted from
Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one, as llama.cpp's own converter does. Norms stay
float32; matrices are written as ``--outtype`` (f32, f16, bf16 or q8_0). The tokenizer (GPT-2-style byte-level BPE:
tokens, token types, merges, special tokens) and the chat template come from the folder's tokenizer files.

k-quants and q4_0 (``q4_k_m``, ``q5_k_m``, ``q6_k``, ``q4_0``) are made by llama.cpp's own quantizer
(``llama_model_quantize`` through ``llama-cpp-python``, the ``probprune[llamacpp]`` extra) from the f16 export, with
its default parameters (no importance matrix), so the per-tensor type mix is the one ``llama-quantize`` gives. What
that quantizer does with pruned shapes (``src/llama-quant.cpp`` of the llama.cpp vendored in llama-cpp-python 0.3.36):

- a matrix is quantized along its rows, whose length (the number of input columns: ``hidden`` for q/k/v/gate/up, the
  kept heads × head length for ``attn_output``, the layer's MLP width for ``ffn_down``) must be a multiple of the type's
  block: 256 for the k-quants, 32 for q4_0. Otherwise it falls back to a 32-block type (Q4_K → Q5_0, Q5_K → Q5_1,
  Q6_K → Q8_0), or to F16 when the row is not a multiple of 32 either, and says so in its log. So a pruned layer whose
  MLP width is an odd number of 128-channel blocks gets a Q5_0 ``ffn_down`` under Q4_K_M, where 256-multiples get
  Q4_K; SmolLM2's hidden size 576 (2.25 × 256) sends every q/k/v/gate/up matrix to Q5_0 in the dense model as well;
- the one-channel stand-in MLP of an attention-only layer: its ``ffn_gate``/``ffn_up`` ([1, hidden]) count as
  one-dimensional for ggml and are copied unquantized (f16), its ``ffn_down`` has rows of length 1 and falls back to
  F16 (all its weights are 0 either way, so the layer still adds exactly 0);
- Q4_K_M / Q5_K_M give ``attn_v`` and ``ffn_down`` of the first and last eighth of the layers (and every third one
  between) Q6_K, counting the ``ffn_down`` tensors that exist (a ``deci`` model without an MLP in some layers shifts
  that pattern), and the token embedding (tied to the output) Q6_K, or Q8_0 when its rows are not 256-multiples.

The result is checked to load and run in llama.cpp by the tests (``tests/test_export.py``).

Supported: LLaMA-architecture models (``LlamaForCausalLM``, and ``MistralForCausalLM`` without a sliding window)
with no RoPE scaling or ``llama3`` scaling, and byte-level BPE tokenizers. Anything else is refused with a message
naming what is not supported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

DIRECT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # written by this module
# quantized by llama.cpp from the f16 export: outtype -> the name of llama.cpp's file type (llama_ftype)
LLAMA_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
OUTTYPES = (*DIRECT_OUTTYPES, *LLAMA_QUANTS)
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
# llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, keyed by the sha256 of the ids it gives PROBE_TEXT.
# Only tokenizers checked against llama.cpp are listed; others get "default" and a warning (token ids, and so
# perplexity from ids, are unaffected; text tokenised by llama.cpp may differ slightly).
PROBE_TEXT = "Hello World! 3.14 and 1234567 -- \u00e9t\u00e9,\tnew\nlines   spaces 'll 's \U0001f600"
PRE_TOKENIZERS: dict[str, str] = {
    "f804ca638777578d39313e9fe136ec4f6fdedfec08d678dce14692bb109c9c89": "smollm"  # SmolLM2 (GPT-2 regex, ByteLevel)
}


def _permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q_proj / k_proj ([n_head·d, …]) from rotate-half order to llama.cpp's interleaved pairs, per head."""
    if n_head == 0:
        return w
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of the export's q/k row permutation (for reading a GGUF back)."""
    if n_head == 0:
        return w
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def layer_shapes(model: torch.nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: ``n_head`` (query heads), ``n_head_kv`` and ``n_ff`` (MLP width), 0 for an empty sublayer."""
    from .models.modeling_probprune import EmptyAttention, EmptyMLP

    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(attn, EmptyAttention):
            n_head = n_kv = 0
        else:
            n_head = attn.q_proj.out_features // attn.head_dim
            n_kv = attn.k_proj.out_features // attn.head_dim
        n_ff = 0 if isinstance(mlp, EmptyMLP) else mlp.gate_proj.out_features
        out.append({"n_head": n_head, "n_head_kv": n_kv, "n_ff": n_ff})
    return out


def _check_supported(model: torch.nn.Module) -> None:
    from .models.modeling_probprune import EmptyAttention, EmptyMLP

    cfg = model.config
    arch = getattr(cfg, "probprune_base_architecture", None) or (cfg.architectures or [type(model).__name__])[0]
    if arch not in SUPPORTED:
        raise UserError(f"GGUF export supports {', '.join(SUPPORTED)}; this model is {arch}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise UserError(f"GGUF export: sliding-window attention (sliding_window={cfg.sliding_window}) is not supported")
    rope = getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind not in (None, "default", "llama3"):
        raise UserError(f"GGUF export: RoPE scaling {kind!r} is not supported (none or 'llama3')")
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        if isinstance(a, EmptyAttention) and a.o_bias is not None:
            raise UserError(f"GGUF export: layer {i} has no heads but an o_proj bias, which llama.cpp would drop")
        if isinstance(m, EmptyMLP) and m.down_bias is not None:
            raise UserError(f"GGUF export: layer {i} has no MLP channels but a down_proj bias")
        if not isinstance(a, EmptyAttention) and any(p.bias is not None for p in (a.q_proj, a.k_proj, a.v_proj)):
            raise UserError(f"GGUF export: layer {i} has q/k/v biases, which this export does not write")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _llama3_rope_factors(cfg, head_dim: int) -> np.ndarray | None:
    rope = getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = _rope_theta(cfg)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:  # the llama3 schedule: long wavelengths scaled by `factor`, short ones kept, a ramp between
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer_fingerprint(tokenizer) -> str:
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def _write_tokenizer(writer, folder: Path, tokenizer, vocab_size: int, pre_tokenizer: str | None) -> None:
    import gguf

    tj = folder / "tokenizer.json"
    if not tj.exists():
        raise UserError(f"GGUF export: {folder} has no tokenizer.json (a fast tokenizer is needed)")
    spec = json.loads(tj.read_text(encoding="utf-8"))
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style); this tokenizer is "
            f"{(spec.get('model') or {}).get('type')!r}"
        )
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    by_id = {i: t for t, i in vocab.items()}
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    if pre_tokenizer is None:
        pre_tokenizer = PRE_TOKENIZERS.get(tokenizer_fingerprint(tokenizer))
        if pre_tokenizer is None:
            log.warning(
                "GGUF export: unknown byte-level BPE pre-tokenizer; writing 'default' (pass "
                "--pre-tokenizer NAME with llama.cpp's name for it if text generation in llama.cpp matters)"
            )
            pre_tokenizer = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer)
    if not special.merges:
        log.warning("GGUF export: the tokenizer has no BPE merges; llama.cpp refuses such a vocabulary")


# ----------------------------------------------------------------------------------------------------- export
def _tensor(writer, name: str, t: torch.Tensor, outtype: str) -> None:
    import gguf

    data = t.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return
    kind = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]
    if kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
        return
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        writer.add_tensor(name, data.astype(np.float16))  # q8_0 needs rows in blocks of 32: this one stays f16
        return
    q = gguf.quants.quantize(data, kind)
    writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)


def require_llama_cpp():
    """The ``llama_cpp`` module, or a UserError that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "k-quant and q4_0 GGUF files are made by llama.cpp's quantizer: pip install "
            "'probprune[llamacpp]' (llama-cpp-python; builds llama.cpp from source, about 12 CPU-minutes "
            f"once), or use --outtype {' / '.join(DIRECT_OUTTYPES)}"
        ) from None
    return llama_cpp


def quantize_gguf(src: str | Path, dst: str | Path, outtype: str, threads: int = 0) -> None:
    """Quantize the f16/f32 GGUF ``src`` into ``dst`` with llama.cpp's ``llama_model_quantize`` (default parameters).

    Raises:
        UserError: llama-cpp-python is not installed, ``outtype`` is not one of :data:`LLAMA_QUANTS`, or llama.cpp
            reports a failure.
    """
    if outtype not in LLAMA_QUANTS:
        raise UserError(f"outtype must be one of {', '.join(LLAMA_QUANTS)} to quantize with llama.cpp, got {outtype!r}")
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[outtype])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise UserError(
            f"llama.cpp could not quantize {src} to {outtype} (llama_model_quantize returned {rc}; "
            "its log above says why)"
        )


def cpu_has_amx() -> bool:
    """Whether this CPU reports Intel AMX tiles (``amx_tile`` in ``/proc/cpuinfo``)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def open_llama_cpp(path: str | Path, extra_buffers: bool | None = None, **kwargs: Any):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, optionally without llama.cpp's extra CPU buffer types.

    The extra buffer types hold weights repacked for special kernels (Intel AMX tiles, interleaved AVX blocks). On
    this project's CPU machine (AMX reported by the CPU), llama-cpp-python 0.3.36's AMX matrix multiply ends the
    process with SIGSEGV (in ``ggml_backend_amx_mul_mat``) for every quantized model, the stock SmolLM2 Q4_1 GGUF
    included; f32/f16 files never use it. ``extra_buffers=None`` turns them off where the CPU has AMX.
    """
    llama_cpp = require_llama_cpp()
    if extra_buffers is None:
        extra_buffers = not cpu_has_amx()
    if extra_buffers:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    from llama_cpp import llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds, e.g. ``{"Q4_K": 120, "Q5_0": 60, "F32": 61}``."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def export_gguf(
    model_dir: str | Path, output: str | Path, outtype: str = "f16", pre_tokenizer: str | None = None
) -> dict[str, Any]:
    """Write ``model_dir`` (a folder ``probprune prune`` wrote, or any supported model) as one GGUF file.

    Args:
        model_dir: a model folder (or ``embedded:smollm2-135m``).
        output: the ``.gguf`` file to write (written to a temporary name, then renamed; umask permissions).
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices (norms stay float32), or ``q4_k_m``,
            ``q5_k_m``, ``q6_k``, ``q4_0``: the f16 export quantized by llama.cpp (needs ``probprune[llamacpp]``; see
            the module docstring for the types of tensors whose shapes a k-quant does not fit).
        pre_tokenizer: llama.cpp's pre-tokenizer name; None detects the known ones (SmolLM2: ``smollm``).

    Returns:
        ``{"path", "arch", "layers", "bytes", "shapes"}``, and ``"tensor_types"`` (ggml type -> count) for the
        types quantized by llama.cpp.

    Raises:
        UserError: unsupported architecture, RoPE scaling, biases or tokenizer; unknown ``outtype``; llama-cpp-python
            missing for a llama.cpp type; a missing folder or an unwritable output.
    """
    from .files import write_atomic

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    output = Path(output)
    if output.exists() and output.is_dir():
        raise UserError(f"--output {output} is a folder; give the .gguf file to write")
    if outtype in DIRECT_OUTTYPES:
        return _write_gguf(model_dir, output, outtype, pre_tokenizer)
    require_llama_cpp()  # before any work
    output.parent.mkdir(parents=True, exist_ok=True)
    f16 = output.with_name(f".{output.name}.f16-{os.getpid()}")
    try:
        res = _write_gguf(model_dir, f16, "f16", pre_tokenizer)
        log.info("quantizing %s to %s with llama.cpp", output.name, outtype)
        write_atomic(output, lambda tmp: quantize_gguf(f16, tmp, outtype))
    except OSError as err:
        raise UserError(f"could not write {output}: {err}") from None
    finally:
        f16.unlink(missing_ok=True)
    return {**res, "path": str(output), "bytes": output.stat().st_size, "tensor_types": tensor_types(output)}


def _write_gguf(model_dir: str | Path, output: Path, outtype: str, pre_tokenizer: str | None) -> dict[str, Any]:
    """The export itself, for the types this module writes (:data:`DIRECT_OUTTYPES`)."""
    import gguf

    from .files import write_atomic
    from .models.loading import load_model, resolve_model_path

    model, tokenizer = load_model(str(model_dir), dtype="float32")
    _check_supported(model)
    if str(model_dir).startswith("tiny:"):
        raise UserError("GGUF export reads the tokenizer files of a model folder; save the model first")
    folder = Path(resolve_model_path(str(model_dir)))
    cfg = model.config
    shapes = layer_shapes(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    written = []  # per layer (n_head, n_head_kv, n_ff) as written (see the module docstring for n_ff = 1)
    for s in shapes:
        n_ff = 1 if (s["n_ff"] == 0 and s["n_head"] > 0) else s["n_ff"]
        written.append((s["n_head"], s["n_head_kv"], n_ff))
    uniform = len(set(written)) == 1 and all(v > 0 for v in written[0]) and written[0][2] == shapes[0]["n_ff"]
    arch = "llama" if uniform else "deci"

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_name(folder.name)
            writer.add_block_count(len(shapes))
            writer.add_context_length(int(cfg.max_position_embeddings))
            writer.add_embedding_length(int(cfg.hidden_size))
            if uniform:
                writer.add_head_count(written[0][0])
                writer.add_head_count_kv(written[0][1])
                writer.add_feed_forward_length(written[0][2])
            else:
                writer.add_head_count([w[0] for w in written])
                writer.add_head_count_kv([w[1] for w in written])
                writer.add_feed_forward_length([w[2] for w in written])
            writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
            writer.add_rope_freq_base(_rope_theta(cfg))
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
            writer.add_rope_dimension_count(head_dim)
            writer.add_vocab_size(int(cfg.vocab_size))
            writer.add_file_type(
                {
                    "f32": gguf.LlamaFileType.ALL_F32,
                    "f16": gguf.LlamaFileType.MOSTLY_F16,
                    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                }[outtype]
            )
            _write_tokenizer(writer, folder, tokenizer, int(cfg.vocab_size), pre_tokenizer)

            base = model.model
            _tensor(writer, "token_embd.weight", base.embed_tokens.weight, outtype)
            factors = _llama3_rope_factors(cfg, head_dim)
            if factors is not None:
                writer.add_tensor("rope_freqs.weight", factors)
            for i, (layer, (n_head, n_kv, n_ff)) in enumerate(zip(base.layers, written)):
                if n_head > 0:
                    a = layer.self_attn
                    _tensor(writer, f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, outtype)
                    _tensor(writer, f"blk.{i}.attn_q.weight", _permute_rope_rows(a.q_proj.weight, n_head), outtype)
                    _tensor(writer, f"blk.{i}.attn_k.weight", _permute_rope_rows(a.k_proj.weight, n_kv), outtype)
                    _tensor(writer, f"blk.{i}.attn_v.weight", a.v_proj.weight, outtype)
                    _tensor(writer, f"blk.{i}.attn_output.weight", a.o_proj.weight, outtype)
                    if a.o_proj.bias is not None:
                        _tensor(writer, f"blk.{i}.attn_output.bias", a.o_proj.bias, outtype)
                if n_ff > 0:
                    m = layer.mlp
                    _tensor(writer, f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, outtype)
                    if shapes[i]["n_ff"] == 0:  # attention-only layer: a one-channel MLP that adds exactly 0
                        zeros_in = torch.zeros(1, cfg.hidden_size)
                        _tensor(writer, f"blk.{i}.ffn_gate.weight", zeros_in, outtype)
                        _tensor(writer, f"blk.{i}.ffn_up.weight", zeros_in, outtype)
                        _tensor(writer, f"blk.{i}.ffn_down.weight", torch.zeros(cfg.hidden_size, 1), outtype)
                    else:
                        _tensor(writer, f"blk.{i}.ffn_gate.weight", m.gate_proj.weight, outtype)
                        _tensor(writer, f"blk.{i}.ffn_up.weight", m.up_proj.weight, outtype)
                        _tensor(writer, f"blk.{i}.ffn_down.weight", m.down_proj.weight, outtype)
                        for name, proj in (("ffn_gate", m.gate_proj), ("ffn_up", m.up_proj), ("ffn_down", m.down_proj)):
                            if proj.bias is not None:
                                _tensor(writer, f"blk.{i}.{name}.bias", proj.bias, outtype)
            _tensor(writer, "output_norm.weight", base.norm.weight, outtype)
            if not getattr(cfg, "tie_word_embeddings", False):
                _tensor(writer, "output.weight", model.lm_head.weight, outtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    try:
        write_atomic(output, write)
    except OSError as err:
        raise UserError(f"could not write {output}: {err}") from None
    return {
        "path": str(output),
        "arch": arch,
        "layers": len(shapes),
        "bytes": output.stat().st_size,
        "shapes": [{"n_head": w[0], "n_head_kv": w[1], "n_ff": w[2]} for w in written],
    }
