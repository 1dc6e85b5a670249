#!/usr/bin/env bash
# Digits: NaViT (random sizes and aspect ratios, packed) against the fixed-resolution
# quickstart ViT, by test resolution; and NaViT's accuracy against its token-drop rate.
#   bash experiments/navit_digits.sh [WORKDIR_ROOT]     # results: experiments/flexi_navit.md
# A finished run is not retrained (the trainer finds it complete), so the script can be
# rerun after a stop.
set -euo pipefail
root=${1:-workdirs/navit}
python=${PYTHON:-python}
train() { "$python" -m vitjax.train --config "$2" --workdir "$root/$1" --no_progress \
            "${@:3}" > "$root/$1.log" 2>&1; }
mkdir -p "$root"
for seed in 0 1; do
  train "vit16_seed$seed" configs/quickstart.py --config.seed="$seed"
  train "navit_seed$seed" "configs/navit_digits.py:seed=$seed"
done
for drop in 0.25 0.5; do
  train "navit_drop${drop}" "configs/navit_digits.py:drop=$drop"
done
train "navit_drop0-0.5" "configs/navit_digits.py:drop_max=0.5"
# Accuracy at each test resolution (the ViT's position embeddings resized to the grid).
"$python" experiments/navit_digits.py "$root"/vit16_seed{0,1} "$root"/navit_seed{0,1} \
  "$root"/navit_drop0.25 "$root"/navit_drop0.5 "$root"/navit_drop0-0.5
# Images and padding per step (training logs: means over the run).
"$python" - "$root" <<'PY'
import json, sys
root = sys.argv[1]
print("| run | images per step | padding | final train loss |\n|---|---:|---:|---:|")
for run in ["navit_seed0", "navit_seed1", "navit_drop0.25", "navit_drop0.5", "navit_drop0-0.5"]:
  rows = [json.loads(line) for line in open(f"{root}/{run}/metrics.jsonl")]
  images = [r["train/packed_images"] for r in rows if "train/packed_images" in r]
  padding = [r["train/padding_fraction"] for r in rows if "train/padding_fraction" in r]
  loss = [r["train/loss"] for r in rows if "train/loss" in r][-1]
  print(f"| {run} | {sum(images) / len(images):.1f} | {100 * sum(padding) / len(padding):.1f}% "
        f"| {loss:.3f} |")
PY
