r"""MAE pre-training of a small ViT on the digits images, labels unused, on a CPU.

    python -m vitjax.train --config configs/mae_digits.py --workdir workdirs/mae_digits

Pre-trains the 'mu/4' ViT encoder (width 64, depth 4) as a masked autoencoder
on the 1,437 training images (75% of the 16 patches masked), logging the
masked-patch loss on the 360 test images (eval/reconstruction_loss) and a
linear probe on the frozen encoder. Then fine-tune with 10% of the labels:
configs/mae_finetune_digits.py. Results: experiments/mae.md.

Arguments after the colon: `configs/mae_digits.py:steps=2000,mask_ratio=0.5`.
"""

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=1000, image_size=16, mask_ratio=0.75,
                             norm_pix_loss=False, decoder_width=64, decoder_depth=2)
  # Data (the digits images; labels unused), input and mesh as in the quickstart.
  config = config_lib.load_config(
      f"{QUICKSTART}:variant={arg.variant},image_size={arg.image_size},steps={arg.steps}")
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(
        name="mae",
        variant=arg.variant,  # The encoder: a ViT size (big_vision's table).
        image_size=arg.image_size,
        decoder_width=arg.decoder_width,
        decoder_depth=arg.decoder_depth,
        decoder_num_heads=4,
        mask_ratio=arg.mask_ratio,
        norm_pix_loss=arg.norm_pix_loss,
        drop_path_rate=0.0,
        attention_impl=None,
        dtype="float32",
    ))
  config.init_head = "error"

  config.task = "mae"
  # The masked-patch loss on the test images, and a linear probe on frozen class tokens.
  config.evaluators = dict(reconstruction=dict(png_path=None), linear_probe=dict())
  config.label_smoothing = 0.0

  config.optimizer.update(
      learning_rate=1e-3,
      b2=0.95,  # MAE's setting.
      warmup_steps=200,
  )
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 1
  return config
