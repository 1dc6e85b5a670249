#!/usr/bin/env bash
# Token merging speed on this machine: ViT-S/16 and ViT-B/16 at 224 px, inference, the
# merged and the plain model side by side in one process per row (BENCHMARKS.md).
#   bash experiments/token_merging_speed.sh [OUT_DIR]
set -euo pipefail
out=${1:-workdirs/token_merging_speed}
python=${PYTHON:-python}
mkdir -p "$out"
lscpu | grep "Model name" | tee "$out/cpu.txt"
for model in vit_small_patch16_224 vit_base_patch16_224; do
  for r in 4 8 13 16; do
    "$python" -m vitjax.tools.benchmark --model "$model" --mode infer --batch 8 --steps 10 \
      --warmup 2 --token_merging "r=$r" --markdown --json "$out/${model}_r$r.json" \
      2>&1 | tee "$out/${model}_r$r.md"
  done
done
