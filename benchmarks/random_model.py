"""A model folder with another folder's config and tokenizer and random weights (bf16, seed 0).

    python benchmarks/random_model.py ~/.cache/probprune/models/smollm2-135m-instruct /tmp/r135

Speed and memory do not depend on the weights' values, so a machine that cannot fetch the model (a GPU host without
package-registry access) measures with this folder what it would measure with the real one: copy the source
folder's ``config.json`` and tokenizer files there (a few MB), build the weights there. ``benchmarks/gpu.sh`` takes it
as ``MODEL=/tmp/r135``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a folder with config.json and tokenizer files (weights not needed)")
    ap.add_argument("output", type=Path)
    args = ap.parse_args()
    if not (args.source / "config.json").is_file():
        raise SystemExit(f"random_model.py: {args.source / 'config.json'} does not exist")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source)).to(torch.bfloat16)
    model.save_pretrained(args.output)
    for name in FILES:
        if (args.source / name).is_file():
            shutil.copy(args.source / name, args.output / name)
    print(f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M random bf16 parameters")


if __name__ == "__main__":
    main()
