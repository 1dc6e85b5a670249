r"""NaViT on the embedded digits: images of random sizes and aspect ratios, packed.

    python -m vitjax.train --config configs/navit_digits.py --workdir workdirs/navit_digits

Each training digit is resized to a side length drawn per side from 8-24 px (in
whole 4 px patches: 2-6 patches a side, so shapes from 2x6 to 6x2 and 6x6), some of
its tokens optionally dropped, and the images are packed first fit into sequences
of 64 tokens (up to 8 images each; segment ids keep attention within an image).
Evaluation runs each test digit at its own 16 px (or `eval_size`). The batch is
32 sequences of 64 tokens: the 2,048 tokens of the quickstart's 128 images of 16
tokens. Results and the comparisons: experiments/flexi_navit.md.

Arguments after the colon: `configs/navit_digits.py:steps=300,drop=0.25,eval_size=24`
(`drop` a fixed rate, or `drop_max` for a rate drawn per image from [0, drop_max]).
"""

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=1200, min_size=8, max_size=24,
                             seq_len=64, drop=0.0, drop_max=0.0, eval_size=0, pool="map",
                             seed=0)
  config = config_lib.load_config(f"{QUICKSTART}:variant={arg.variant},steps={arg.steps}")
  config.unlock()
  config.seed = arg.seed
  config.input.random_crop_padding = 2  # The quickstart's translation, before the resize.
  config.input.num_threads = 1  # Packs the next batch while the step runs.
  config.input.packing = ml_collections.ConfigDict(dict(
      patch_size=None,  # The model's.
      seq_len=arg.seq_len,  # Tokens per sequence.
      max_images=8,  # Image slots per sequence.
      images_per_step=None,  # None: as many as fill the batch on average.
      resolution=(arg.min_size, arg.max_size),  # Training sides in pixels; None: native.
      max_tokens=None,  # Token budget per image; None: seq_len.
      token_drop_rate=(0.0, arg.drop_max) if arg.drop_max else arg.drop,
      eval_size=arg.eval_size or None,  # None: each test image at its own size.
  ))
  config.model = dict(
      name="navit",
      variant=arg.variant,
      num_classes=10,
      pool_type=arg.pool,  # Per image: 'map' or 'gap'.
      posemb="factorized",  # 'factorized', 'fractional' or 'learned_grid'.
      max_grid=8,  # Rows and columns the factorized tables cover (24 px / 4 = 6).
      dropout=0.0,
      drop_path_rate=0.1,
      attention_impl=None,
      dtype="float32",
  )
  config.batch_size = 32  # Sequences.
  config.eval_batch_size = 32
  return config
