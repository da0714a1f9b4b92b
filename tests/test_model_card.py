"""The model card written into every saved model folder parses as a Hugging Face model card and says what it should."""

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from probprune.config import load_config
from probprune.model_card import base_model_info
from probprune.models.loading import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "tiny" / "smoke.yaml")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A tiny base model saved as a local folder whose own card names its hub id and licence."""
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\nbase_model: someorg/tiny-base\n---\n# tiny\n")
    return folder


def test_prune_writes_a_model_card_with_hub_metadata(base_folder, tmp_path):
    from probprune.pipeline import prune

    out = tmp_path / "run"
    cfg = load_config(SMOKE, [f"model.name_or_path={base_folder}", "search.steps=2"])
    summary = prune(cfg, out, progress=False)
    card = ModelCard.load(out / "model" / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "someorg/tiny-base" and meta["license"] == "mit"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"probprune", "pruned", "structured-pruning"} <= set(meta["tags"])
    text = card.text
    model_cfg = json.loads((out / "model" / "config.json").read_text())
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == model_cfg["num_hidden_layers"]  # one widths row per decoder layer
    layout = model_cfg["probprune_layout"] or [  # a stock-shaped result: one shape for all layers
        {k: model_cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
        | {"source_layer": src}
        for src in model_cfg["probprune_source_layers"]
    ]
    for li, s in enumerate(layout):
        assert rows[li] == (
            f"| {li} | {s['source_layer']} | {s['num_attention_heads']} / 8 | "
            f"{s['num_key_value_heads']} / 4 | {s['intermediate_size']} / 96 |"
        )
    assert sum(s["num_key_value_heads"] for s in layout) == 4  # half of the 2 x 4 KV groups are kept
    for n in ("32", "64"):
        assert f"{summary['pruned_ppl'][n]:.2f}" in text and f"{summary['dense_ppl'][n]:.2f}" in text
    assert "non-overlapping windows" in text and "at most 2,048 of its" in text
    assert 'probprune.load_pruned("PATH/TO/THIS/FOLDER")' in text and "trust_remote_code=True" in text
    _check_remote_code_note(text, out / "model")
    assert "--outtype q4_k_m" in text
    assert "probprune prune --config config.yaml --output runs/reproduced" in text
    embedded = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert embedded == yaml.safe_load((out / "config.yaml").read_text())  # the config that reproduces it


def _check_remote_code_note(text: str, folder: Path) -> None:
    per_layer = (folder / "modeling_probprune.py").exists()
    assert ("executes** this folder's `modeling_probprune.py`" in text) == per_layer
    assert ("would execute nothing (the folder holds no Python file)" in text) == (not per_layer)


def test_baseline_card_gives_the_baseline_command(tmp_path):
    from probprune.pipeline import run_baseline

    out = tmp_path / "b"
    run_baseline(load_config(SMOKE), "wanda-sp", out, progress=False)
    card = ModelCard.load(out / "model" / "README.md")
    assert "base_model" not in card.data.to_dict() and "license" not in card.data.to_dict()  # random weights
    _check_remote_code_note(card.text, out / "model")
    assert (
        "probprune baseline --method wanda-sp --sparsity 0.5 --config config.yaml --output runs/reproduced" in card.text
    )


def test_per_layer_card_says_what_trust_remote_code_executes(tmp_path):
    from probprune.pipeline import run_baseline

    out = tmp_path / "flap"
    run_baseline(load_config(SMOKE, ["search.budget=params"]), "flap", out, progress=False)
    text = (out / "model" / "README.md").read_text()
    layout = json.loads((out / "model" / "config.json").read_text())["probprune_layout"]
    assert len({(s["num_attention_heads"], s["intermediate_size"]) for s in layout}) > 1  # per-layer widths
    _check_remote_code_note(text, out / "model")
    assert "(layers have different widths)" in text and "llama.cpp's `deci` architecture" in text
    import hashlib

    digest = hashlib.sha256((out / "model" / "modeling_probprune.py").read_bytes()).hexdigest()[:16]
    assert f"sha256 {digest}" in text


def test_base_model_info():
    assert base_model_info("embedded:smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_model_info("tiny:llama") == (None, None)
    assert base_model_info("someorg/not-cached-anywhere")[0] == "someorg/not-cached-anywhere"
