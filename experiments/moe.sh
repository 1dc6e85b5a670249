#!/usr/bin/env bash
# Digits: the quickstart ViT dense, with V-MoE layers (top-1, top-2) and with Soft MoE
# layers, all at the dense model's forward multiply-adds, 4 seeds each; then the top-1
# run again expert-parallel on 4 CPU devices (the 8 experts split 2 per device).
#   bash experiments/moe.sh [WORKDIR_ROOT]   # results: experiments/moe.md
set -euo pipefail
root=${1:-workdirs/moe}
source "$(dirname "$0")/train_runs.sh"
mkdir -p "$root"
for seed in 0 1 2 3; do
  train "dense_seed$seed" "configs/moe_digits.py:moe=none,seed=$seed"
  train "vmoe_top1_seed$seed" "configs/moe_digits.py:seed=$seed"
  train "vmoe_top2_seed$seed" "configs/moe_digits.py:top_k=2,capacity_factor=0.5,seed=$seed"
  train "soft_moe_seed$seed" "configs/moe_digits.py:moe=soft,seed=$seed"
done
# Expert parallel: 4 devices, the experts split over the `expert` axis (2 per device),
# each device's batch slice routed to the devices that hold its experts.
XLA_FLAGS=--xla_force_host_platform_device_count=4 train vmoe_top1_expert4_seed0 \
  configs/moe_digits.py:seed=0 --config.mesh.data=1 --config.mesh.expert=4
# For scale: the dense ViT data parallel on the same 4 devices.
XLA_FLAGS=--xla_force_host_platform_device_count=4 train dense_data4_seed0 \
  configs/moe_digits.py:moe=none,seed=0 --config.mesh.data=4
"$python" experiments/moe.py "$root"
