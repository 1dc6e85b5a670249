#!/usr/bin/env bash
# The digits diffusion runs of experiments/diffusion.md: a class-conditional DiT trained with
# DDPM (learned variance) and with flow matching, then sampled over sampler steps and guidance
# scales, scored by the quickstart classifier (workdirs/quickstart: `make quickstart`).
#   bash experiments/diffusion.sh            # from the repository root
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
CLASSIFIER=${CLASSIFIER:-workdirs/quickstart}
test -d "$CLASSIFIER/checkpoints" || $PYTHON -m vitjax.train --config configs/quickstart.py --workdir "$CLASSIFIER"

for objective in ddpm flow; do
  $PYTHON -m vitjax.train --config "configs/diffusion_digits.py:objective=$objective,feature_model=$CLASSIFIER" \
    --workdir "workdirs/dit_digits_$objective"
done

$PYTHON experiments/diffusion.py --workdir workdirs/dit_digits_ddpm --classifier "$CLASSIFIER" \
  --sampler ddim --steps 10,25,50 --guidance 1,2,4 --grids experiments/diffusion_grids
$PYTHON experiments/diffusion.py --workdir workdirs/dit_digits_ddpm --classifier "$CLASSIFIER" \
  --sampler ddpm --steps 250 --guidance 1,2 --grids experiments/diffusion_grids
$PYTHON experiments/diffusion.py --workdir workdirs/dit_digits_flow --classifier "$CLASSIFIER" \
  --sampler euler --steps 10,50 --guidance 1,2 --grids experiments/diffusion_grids
$PYTHON experiments/diffusion.py --workdir workdirs/dit_digits_flow --classifier "$CLASSIFIER" \
  --sampler heun --steps 5,10,25 --guidance 1,2,4 --grids experiments/diffusion_grids
