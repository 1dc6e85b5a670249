r"""MAE pre-training of a small ViT on the digits images, labels unused, on a CPU.

    python -m vitjax.train --config configs/mae_digits.py --workdir workdirs/mae_digits

Pre-trains the 'mu/4' ViT encoder (width 64, depth 4) as a masked autoencoder
on the 1,437 training images (75% of the 16 patches masked), logging the
masked-patch loss on the 360 test images (eval/reconstruction_loss) and a
linear probe on the frozen encoder. Then fine-tune with 10% of the labels:
configs/mae_finetune_digits.py. Results: experiments/mae.md.

Arguments after the colon: `configs/mae_digits.py:steps=2000,mask_ratio=0.5`.
"""

import ml_collections

from vitjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=1000, image_size=16, mask_ratio=0.75,
                             norm_pix_loss=False, decoder_width=64, decoder_depth=2)
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: the embedded digits (no download), upscaled 8x8 -> image_size; labels unused.
  config.dataset = "digits"
  config.data_dir = None
  config.train_split = "train"
  config.eval_split = "test"
  config.input = dict(
      image_size=arg.image_size,
      random_crop_padding=arg.image_size // 8,  # Random translation by up to 1/8 of the side.
      flip=False,
      channels=3,
      mean=(0.5, 0.5, 0.5),
      std=(0.5, 0.5, 0.5),
  )

  config.model = dict(
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
  )
  config.init = None
  config.init_head = "error"

  config.task = "mae"
  # The masked-patch loss on the test images, and a linear probe on frozen class tokens.
  config.evaluators = dict(reconstruction=dict(png_path=None), linear_probe=dict())

  config.batch_size = 128
  config.eval_batch_size = 360
  config.total_steps = arg.steps
  config.optimizer = dict(
      name="adamw",
      learning_rate=1e-3,
      weight_decay=0.05,
      b1=0.9,
      b2=0.95,  # MAE's setting.
      momentum=0.9,
      grad_clip_norm=1.0,
      schedule="cosine",
      warmup_steps=200,
      end_learning_rate=1e-5,
      freeze=None,
      lr_multipliers=None,
      layer_decay=None,
  )

  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "dp"
  config.sharding_rules = None
  config.grad_accum_steps = 1
  config.distributed = dict(enabled=False, coordinator_address=None, num_processes=None,
                            process_id=None, cpu_collectives=None)

  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 1
  return config
