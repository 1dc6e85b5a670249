#!/usr/bin/env bash
# The digits runs of experiments/adapt_compress.md. From the repository root:
#   bash experiments/adapt_compress.sh          # pre-training, adaptation (3 seeds), quantization
#   bash experiments/adapt_compress.sh adapt    # the adaptation runs only
#   bash experiments/adapt_compress.sh quantize # the quantization tables only
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=configs/adapt_digits.py
PART=${1:-all}

if [ "$PART" = all ]; then
  # The ViT mu/4 on the digits 0-4, then on all ten (the quickstart), and a larger one.
  $PYTHON -m vitjax.train --config "$CONFIG:pretrain=True" --workdir workdirs/digits_0to4
  $PYTHON -m vitjax.train --config configs/quickstart.py --workdir workdirs/quickstart
  $PYTHON -m vitjax.train --workdir workdirs/digits_w128d8 \
      --config "$CONFIG:pretrain=True,all_classes=True,width=128,depth=8,mlp_dim=512"
fi

if [ "$PART" = all ] || [ "$PART" = adapt ]; then
  # Adapt to 5-9: workdirs/adapt_NAME (seed 0), adapt_NAME_s1, adapt_NAME_s2.
  for seed in 0 1 2; do
    suffix=$([ $seed = 0 ] && echo "" || echo "_s$seed")
    for spec in full:full probe:probe bitfit:bitfit norm:norm lora1:lora,rank=1 \
                lora2:lora,rank=2 lora4:lora,rank=4 lora8:lora,rank=8 vpt:vpt \
                vpt_deep:vpt_deep adapter:adapter; do
      name=${spec%%:*}; method=${spec#*:}
      $PYTHON -m vitjax.train --config "$CONFIG:method=$method,seed=$seed" \
          --workdir "workdirs/adapt_$name$suffix"
    done
  done
fi

if [ "$PART" = all ] || [ "$PART" = quantize ]; then
  for workdir in workdirs/quickstart workdirs/digits_w128d8; do
    $PYTHON -m vitjax.tools.quantize $workdir --scheme w8,w4,w8a8,w4a8,w4a4 --vit_quantizers both
  done
fi
