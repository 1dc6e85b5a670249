#!/usr/bin/env bash
# The digits runs of experiments/self_distillation.md: DINO, iBOT and I-JEPA pre-training on
# the unlabelled training images, then fine-tuning on 10% of the labels (seeds 0-2), against
# the same ViT from random weights. From the repository root:
#   bash experiments/self_distillation.sh            # pre-training, then the fine-tunes
#   bash experiments/self_distillation.sh finetune   # the fine-tunes only
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
FINETUNE=configs/mae_finetune_digits.py
IJEPA_VIT=image_size=32,pool_type=gap,posemb=sincos2d  # I-JEPA's encoder, on 32 px digits.

if [ "${1:-all}" != finetune ]; then
  $PYTHON -m vitjax.train --config configs/dino_digits.py --workdir workdirs/dino_digits_3000
  $PYTHON -m vitjax.train --config configs/dino_digits.py:steps=1000 --workdir workdirs/dino_digits
  $PYTHON -m vitjax.train --config configs/dino_digits.py:method=ibot,steps=1000 --workdir workdirs/ibot_digits
  $PYTHON -m vitjax.train --config configs/ijepa_digits.py --workdir workdirs/ijepa_digits
fi

for seed in 0 1 2; do
  $PYTHON -m vitjax.train --config "$FINETUNE:scratch,seed=$seed" --workdir "workdirs/scratch16_$seed"
  $PYTHON -m vitjax.train --config "$FINETUNE:init=workdirs/dino_digits_3000:teacher,seed=$seed" \
    --workdir "workdirs/dino3000_finetune_$seed"
  $PYTHON -m vitjax.train --config "$FINETUNE:init=workdirs/dino_digits:teacher,seed=$seed" \
    --workdir "workdirs/dino_finetune_$seed"
  $PYTHON -m vitjax.train --config "$FINETUNE:init=workdirs/ibot_digits:teacher,seed=$seed" \
    --workdir "workdirs/ibot_finetune_$seed"
  $PYTHON -m vitjax.train --config "$FINETUNE:scratch,$IJEPA_VIT,seed=$seed" \
    --workdir "workdirs/scratch32_$seed"
  $PYTHON -m vitjax.train --config "$FINETUNE:init=workdirs/ijepa_digits:target_encoder,$IJEPA_VIT,seed=$seed" \
    --workdir "workdirs/ijepa_finetune_$seed"
done
