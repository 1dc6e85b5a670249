r"""I-JEPA pre-training of a small ViT on the digits images, labels unused, on a CPU.

    python -m vitjax.train --config configs/ijepa_digits.py --workdir workdirs/ijepa_digits

Trains the 'mu/4' ViT (width 64, depth 4, 64 patches of 4x4 on the digits upsampled to
32 px, fixed sin-cos position embeddings, as I-JEPA) to predict, through a 2-block predictor of
width 32, the target encoder's representations of 4 target blocks (15-20% of the
patches each) from a context block (85-100% of the image, the targets removed). The
target encoder is an EMA of the context encoder (momentum 0.996 -> 1, linear). At 16 px
(a 4x4 grid) a target block would be a single patch, hence 32 px: blocks of 8 patches and
a context of 12 (`dataset.num_target_tokens`, `num_context_tokens`).
One crop per image (scale 0.3-1), no colour augmentation: I-JEPA's point is that it
needs none. Logged: the loss, collapse monitors (train/target_std, the spread of the
target representations over the batch), and a weighted k-NN and a linear probe on the
mean-pooled tokens of the context encoder (eval/) and the target encoder (eval_target/).
Fine-tune the target encoder on 10% of the labels with

    python -m vitjax.train \
        --config configs/mae_finetune_digits.py:init=workdirs/ijepa_digits:target_encoder,pool_type=gap,posemb=sincos2d \
        --workdir workdirs/ijepa_finetune_digits

Expected (experiments/self_distillation.md, 2026-12-03): k-NN top-1 85.0% of the
context encoder (74.4% at random initialisation); fine-tuning the target encoder on 144
labels 84.4 +- 1.5% (3 seeds), the same as from random weights at 32 px (84.0 +- 3.5%).

Arguments after the colon: `configs/ijepa_digits.py:steps=2000,predictor_depth=4`.
"""

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=1000, image_size=32, batch_size=128,
                             predictor_width=32, predictor_depth=2, num_targets=4)
  config = config_lib.load_config(
      f"{QUICKSTART}:variant={arg.variant},image_size={arg.image_size},steps={arg.steps}")
  patch_size = 4
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(
        name="ijepa",
        variant=arg.variant,
        image_size=arg.image_size,
        predictor_width=arg.predictor_width,
        predictor_depth=arg.predictor_depth,
        predictor_num_heads=4,
        drop_path_rate=0.0,
        attention_impl=None,
        dtype="float32",
    ))
    config.input.random_crop_padding = 0
    config.input.multicrop = ml_collections.ConfigDict(dict(
        global_crops=1,
        global_size=arg.image_size,
        global_scale=(0.3, 1.0),
        local_crops=0,
        flip=False,
        jitter_probability=0.0,
        grayscale_probability=0.0,
        blur=(0.0, 0.0, 0.0),
        solarize=(0.0, 0.0, 0.0),
        masks="ijepa",
        mask_patch_size=patch_size,
        num_targets=arg.num_targets,
        target_scale=(0.15, 0.2),
        target_aspect=(0.75, 1.5),
        context_scale=(0.85, 1.0),
    ))
    config.task = "ijepa"
    config.ijepa = ml_collections.ConfigDict(dict(teacher_momentum=0.996,
                                                  momentum_schedule="linear"))
  config.init_head = "error"
  config.label_smoothing = 0.0
  config.evaluators = dict(knn=dict(), linear_probe=dict())

  config.batch_size = arg.batch_size
  config.optimizer.update(
      learning_rate=1e-3,  # I-JEPA's peak rate.
      weight_decay=0.04,  # I-JEPA's starting value (0.04 -> 0.4 there; fixed here).
      warmup_steps=arg.steps // 10,
  )
  config.log_every = 50
  config.eval_every = arg.steps // 2
  config.checkpoint_every = arg.steps // 2
  config.keep_checkpoints = 1
  return config
