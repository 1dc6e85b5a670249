#!/usr/bin/env bash
# Digits: weight EMA on vs off (4 seeds), and SAM vs AdamW on 10% of the labels (4 seeds).
#   bash experiments/ema_sam.sh [WORKDIR_ROOT]     # results: experiments/ema_sam.md
# Each run is the quickstart (configs/quickstart.py, 1,200 steps). A finished run is not
# retrained (the trainer finds it complete), so the script can be rerun after a stop.
set -euo pipefail
root=${1:-workdirs/ema_sam}
python=${PYTHON:-python}
train() { "$python" -m vitjax.train --config configs/quickstart.py --workdir "$root/$1" \
            --config.seed="$2" "${@:3}" > "$root/$1.log" 2>&1; }
mkdir -p "$root"
for seed in 0 1 2 3; do
  # EMA: evaluated beside the raw weights (eval/* and eval_ema/* of the same run).
  train "ema_seed$seed" "$seed" --config.ema.decay=0.995 --config.ema.warmup=True
  # 10% of the labels (144 training digits): AdamW alone, then with SAM (rho 0.05).
  train "adamw_10pct_seed$seed" "$seed" --config.train_split='train[:10%]'
  train "sam_10pct_seed$seed" "$seed" --config.train_split='train[:10%]' \
        --config.optimizer.sam_rho=0.05
done
"$python" - "$root" <<'PY'
import json, statistics, sys
root = sys.argv[1]
def final(run, key):
  rows = [json.loads(line) for line in open(f"{root}/{run}/metrics.jsonl")]
  return [r[key] for r in rows if key in r][-1]
def row(name, values):
  return (f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values)
          + f" | {100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} |")
print("| run | seed 0 | seed 1 | seed 2 | seed 3 | mean ± sd |\n|---|---:|---:|---:|---:|---:|")
seeds = range(4)
print(row("raw weights (EMA run)", [final(f"ema_seed{s}", "eval/top1") for s in seeds]))
print(row("EMA weights, decay 0.995", [final(f"ema_seed{s}", "eval_ema/top1") for s in seeds]))
print(row("AdamW, 10% labels", [final(f"adamw_10pct_seed{s}", "eval/top1") for s in seeds]))
print(row("SAM rho 0.05, 10% labels", [final(f"sam_10pct_seed{s}", "eval/top1") for s in seeds]))
PY
