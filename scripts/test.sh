#!/usr/bin/env bash
# The test suite: installs what it needs, checks lint and formatting (ruff), then runs pytest (tiny models, the real
# SmolLM2-135M and Brown corpus, one shared local Ray instance). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test || exit 1
python -m ruff check . || { echo "scripts/test.sh: ruff check failed (ruff check --fix fixes most)" >&2; exit 1; }
python -m ruff format --check . || { echo "scripts/test.sh: unformatted files (ruff format fixes them)" >&2; exit 1; }
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
