#!/usr/bin/env bash
# CPU scoring speed of this checkout against an older commit, interleaved in one session (the machine is shared and
# noisy: A B A B ... rounds, then the mean of each row): benchmarks/throughput.py --no-ray --no-memory at each.
#
#   bash benchmarks/throughput_ab.sh 007d967 benchmarks/results/throughput_ab [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?base commit}
OUT=${2:?output folder}
ROUNDS=${3:-3}
PY=${PYTHON:-python}
mkdir -p "$OUT"
TREE=$(mktemp -d)
trap 'git worktree remove --force "$TREE" >/dev/null 2>&1 || true' EXIT
git worktree add --detach -f "$TREE" "$BASE" >/dev/null
ARGS=(--dtype bfloat16 --threads 1 --no-ray --no-memory)
for i in $(seq 1 "$ROUNDS"); do
    $PY benchmarks/throughput.py "${ARGS[@]}" --out "$OUT/after$i.json" >"$OUT/after$i.log" 2>&1
    (cd "$TREE" && PYTHONPATH="$TREE" $PY benchmarks/throughput.py "${ARGS[@]}" --out "$OUT/before$i.json" \
        >"$OUT/before$i.log" 2>&1)
done
$PY - "$OUT" "$BASE" "$ROUNDS" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, base, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def rows(tag):
    runs = [json.loads((out / f"{tag}{i}.json").read_text())["results"][0]["scoring"] for i in range(1, rounds + 1)]
    return {r["row"]: [next(x for x in run if x["row"] == r["row"])["tokens_per_s"] for run in runs] for r in runs[0]}
a, b = rows("after"), rows("before")
lines = [f"# CPU scoring speed: this checkout vs {base}", "",
         f"`bash benchmarks/throughput_ab.sh {base} {out} {rounds}`: benchmarks/throughput.py --dtype bfloat16 --threads 1"
         f" --no-ray --no-memory, {rounds} interleaved rounds (after, before, after, ...); tokens/s of each row per round and"
         " the ratio of the means.", "",
         "| row | after (tokens/s per round) | before | after ÷ before |", "|---|---|---|---:|"]
for k in a:
    if k in b:
        r = statistics.mean(a[k]) / statistics.mean(b[k])
        lines.append(f"| {k} | {', '.join(f'{v:,.0f}' for v in a[k])} | {', '.join(f'{v:,.0f}' for v in b[k])} | {r:.3f} |")
(out / "throughput_ab.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
