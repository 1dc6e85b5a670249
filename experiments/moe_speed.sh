#!/usr/bin/env bash
# Mixture-of-experts speed on this machine: each MoE model beside its dense counterpart
# (the same ViT with MLPs), their steps alternating in one process (BENCHMARKS.md).
#   bash experiments/moe_speed.sh [OUT_DIR]
set -euo pipefail
out=${1:-workdirs/moe_speed}
python=${PYTHON:-python}
mkdir -p "$out"
lscpu | grep "Model name" | tee "$out/cpu.txt"
bench() {  # NAME MODEL MODE
  "$python" -m vitjax.tools.benchmark --model "$2" --mode "$3" --batch 8 --steps 10 \
    --warmup 2 --markdown --json "$out/$1.json" 2>&1 | tee "$out/$1.md"
}
bench vmoe_s32_infer vmoe_small_patch32_224_e8_every2 infer
bench vmoe_s32_train vmoe_small_patch32_224_e8_every2 train
bench vmoe_b16_infer vmoe_base_patch16_224_e8_every2 infer
bench soft_s16_infer soft_moe_small_patch16_224_e128 infer
