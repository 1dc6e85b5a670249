#!/usr/bin/env bash
# Digits: token merging (ToMe) and pruning (EViT, top-k) on the quickstart ViT (16 px,
# 16 patches) and on the same ViT at 32 px (64 patches): off the shelf on trained
# weights, and trained with the reduction switched on.
#   bash experiments/token_merging.sh [WORKDIR_ROOT]   # results: experiments/token_merging.md
set -euo pipefail
root=${1:-workdirs/token_merging}
source "$(dirname "$0")/train_runs.sh"
tm=--config.model.token_merging
mkdir -p "$root"
for seed in 0 1; do
  train "plain_seed$seed" configs/quickstart.py --config.seed="$seed"
  train "tome_r2_seed$seed" configs/quickstart.py --config.seed="$seed" $tm.r=2
  train "tome_r3_seed$seed" configs/quickstart.py --config.seed="$seed" $tm.r=3
  train "evit_0.7_seed$seed" configs/quickstart.py --config.seed="$seed" $tm.method=evit \
    $tm.keep_rate=0.7
  train "topk_r2_seed$seed" configs/quickstart.py --config.seed="$seed" $tm.method=topk $tm.r=2
done
train "plain32_seed0" configs/quickstart.py:image_size=32
# Every run (columns) evaluated with each reduction switched on after training (rows):
# the plain runs off the shelf, the others against the reduction they were trained with.
"$python" experiments/token_merging.py "$root"/{plain,tome_r2,tome_r3,evit_0.7,topk_r2}_seed0 \
  "$root"/{plain,tome_r2,tome_r3,evit_0.7,topk_r2}_seed1
"$python" experiments/token_merging.py "$root"/plain32_seed0 --r 4,8,12 --keep 0.7,0.5
# Training time of each run (seconds, this machine).
grep -H . "$root"/*.seconds
