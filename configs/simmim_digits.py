r"""SimMIM pre-training of a small ViT on the digits images, labels unused, on a CPU.

    python -m vitjax.train --config configs/simmim_digits.py --workdir workdirs/simmim_digits
    python -m vitjax.train --config configs/mae_finetune_digits.py:init=workdirs/simmim_digits \
        --workdir workdirs/simmim_finetune_digits

The MAE recipe of configs/mae_digits.py (same encoder, data, optimizer and
schedule) with SimMIM's objective: masked patches are replaced by a learned mask
token in the encoder's input, a linear head predicts their raw pixels, L1 loss.
Masks are random 8x8-pixel blocks (2x2 patches, as SimMIM's 32 px over patch 16),
60% of them masked. Results: experiments/mae.md.

Arguments after the colon: `configs/simmim_digits.py:steps=2000,mask_ratio=0.5`.
"""

import os

import ml_collections

from vitjax import config as config_lib

MAE_DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mae_digits.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=1000, image_size=16, mask_ratio=0.6,
                             mask_patch_size=8)
  config = config_lib.load_config(
      f"{MAE_DIGITS}:variant={arg.variant},image_size={arg.image_size},steps={arg.steps}")
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(
        name="simmim",
        variant=arg.variant,
        image_size=arg.image_size,
        mask_ratio=arg.mask_ratio,
        mask_patch_size=arg.mask_patch_size,
        drop_path_rate=0.0,
        attention_impl=None,
        dtype="float32",
    ))
  config.task = "simmim"
  return config
