#!/usr/bin/env bash
# The GPU checks, prepared for one H100/H200 and about 8 minutes (it has not run on a GPU yet):
#   1. bench.step_time at the LLaMA-2-7B shape, random weights, bf16, seq 512, micro-batch 2 (the paper's Table 5);
#   2. bench.memory at the same shape: measured peaks at seq 512, and the longest sequence of full fine-tuning under
#      the paper's 80 GiB, found by real out-of-memory search (to 256 tokens; the paper's Table 3).
# Each writes <name>.md / .json / .png into bench/results/<name>_gpu/. Every step has its own time limit, so that a
# slow one cannot starve the next; a step that runs out of time leaves no result and the script goes on.
#
#   bash bench/gpu.sh             # on the GPU machine, from the repository root
#   DRY_RUN=1 bash bench/gpu.sh   # anywhere: only checks that every command accepts its flags (--print_config)
set -u
cd "$(dirname "$0")/.."
read -ra PYTHON <<< "${PYTHON:-python}"  # a command, maybe with words before it (taskset -c 1 python)
MODEL=${MODEL:-Llama-2-7b-hf}
OUT=${OUT:-bench/results}
DRY=()
[[ -n "${DRY_RUN:-}" ]] && DRY=(--print_config)
# QLoRA needs bitsandbytes' CUDA kernels; without them it is left out rather than failing the step.
if "${PYTHON[@]}" -c "import bitsandbytes" 2>/dev/null; then STEP_METHODS='[full, lora, qlora]'; else STEP_METHODS='[full, lora]'; fi

status=0
run() {  # run LIMIT_SECONDS NAME ARGS...: one step under its own limit
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" || { echo "!! $name failed or ran out of time (rc $?)"; status=1; }
    echo "== $name took $((SECONDS - start)) s"
}

[[ -z "${DRY_RUN:-}" ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# About 8 x 6 micro-batches per method at seq 512 x 2, plus building the 7B model: 1-2 minutes.
run 180 step_time "${PYTHON[@]}" -m bench.step_time --device cuda --model_name "$MODEL" --seq_len 512 \
    --micro_batch_size 2 --methods "$STEP_METHODS" --out "$OUT/step_time_gpu" "${DRY[@]}"

# Full fine-tuning (the paper's 7B row): 4 drop rates and PLD, 2 draws each, about 13 lengths per search, so about
# 130 micro-batches of up to ~30k tokens.
run 300 memory "${PYTHON[@]}" -m bench.memory --device cuda --model_name "$MODEL" --methods '[full]' \
    --seq_len 512 --micro_batch_size 2 --memory_budget_gib 80 --draws 2 --search_granularity 256 \
    --out "$OUT/memory_gpu" "${DRY[@]}"

exit $status
