r"""DINO (or iBOT) pre-training of a small ViT on the digits images, labels unused, on a CPU.

    python -m vitjax.train --config configs/dino_digits.py --workdir workdirs/dino_digits
    python -m vitjax.train --config configs/dino_digits.py:method=ibot --workdir workdirs/ibot_digits

Trains the 'mu/4' ViT (width 64, depth 4; the encoder of configs/mae_digits.py) with
DINO's head (1,024 prototypes) on 2 global crops of 16 px and 6 local crops of 8 px of
each of the 1,437 training images, 3,000 steps of 128: the student learns to predict the EMA teacher's
centred, sharpened outputs across crops. `method=ibot` adds iBOT's masked-patch loss
(block masks on the global crops, shared head); `method=dinov2` adds DINOv2's KoLeo
term and Sinkhorn-Knopp centring to iBOT. Logged: the losses, collapse monitors
(train/teacher_entropy, train/teacher_mean_entropy, train/teacher_student_kl), and a
weighted k-NN (k=20, T=0.07) and a linear probe on the frozen class token, of the
student (eval/) and of the teacher (eval_teacher/). Fine-tune the teacher's backbone on
10% of the labels with

    python -m vitjax.train --config configs/mae_finetune_digits.py:init=workdirs/dino_digits:teacher \
        --workdir workdirs/dino_finetune_digits

Expected (experiments/self_distillation.md, 2026-12-03): k-NN top-1 90.8% of the
student's class token (64.4% at random initialisation), linear probe 92.5% (81.7%), the
teacher's entropy down to 4.1 of 6.93; fine-tuning the teacher on 144 labels: 82.6 +- 1.4%
(3 seeds) vs 73.1 +- 3.8% from random weights.
After 1,000 steps (`:steps=1000`) the teacher is still near uniform (k-NN 78.6%) and
iBOT's collapses (k-NN 74.2%).

The recipe is DINO's (Caron et al. 2021) scaled to 8x8 digits upsampled to 16 px. With
DINO's own settings the teacher collapses to the uniform distribution within 300 steps;
these changes, from the short runs experiments/self_distillation.md lists, keep it from
collapsing (it stays near uniform for ~1,000 steps, then sharpens): crops of 50-100% (global) and 20-50% (local) of the image rather than
40-100% and 5-40% (a 5% crop of an 8x8 digit is about two of its pixels), no
solarisation, a blur of at most 0.5 px (DINO's 2 px on 224 px images), no flips (a
mirrored digit is another digit), a teacher momentum of 0.99 rather than 0.996 (the
teacher's memory, about 1 / (1 - m) steps, must stay well short of the run), and
the learning rate 5e-4. Colour jitter and grayscale are kept; on grey digits only the
brightness and contrast of the jitter do anything.

Arguments after the colon: `configs/dino_digits.py:method=ibot,steps=2000,local_crops=0`.
"""

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
METHODS = ("dino", "ibot", "dinov2")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="dino", variant="mu/4", steps=3000, image_size=16,
                             local_crops=6, local_size=8, out_dim=1024, batch_size=128)
  if arg.method not in METHODS:
    raise ValueError(f"method={arg.method!r}: use one of {', '.join(METHODS)}.")
  ibot = arg.method in ("ibot", "dinov2")
  config = config_lib.load_config(
      f"{QUICKSTART}:variant={arg.variant},image_size={arg.image_size},steps={arg.steps}")
  patch_size = 4
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(
        name="dino",
        variant=arg.variant,  # A ViT size (big_vision's table); patch 4 on 16 px: 16 patches.
        image_size=arg.image_size,
        head_out_dim=arg.out_dim,
        head_hidden_dim=256,
        head_bottleneck_dim=64,
        head_layers=3,
        norm_last_layer=True,
        patch_head="shared" if ibot else None,
        drop_path_rate=0.1,
        attention_impl=None,
        dtype="float32",
    ))
    config.input.random_crop_padding = 0  # The crops below do the cropping.
    config.input.multicrop = ml_collections.ConfigDict(dict(
        global_crops=2,
        global_size=arg.image_size,
        global_scale=(0.5, 1.0),
        local_crops=arg.local_crops,
        local_size=arg.local_size,
        local_scale=(0.2, 0.5),
        flip=False,
        jitter_probability=0.8,
        color_jitter=(0.4, 0.4, 0.2, 0.1),
        grayscale_probability=0.2,
        blur=(1.0, 0.1, 0.5),  # First global crop, the other global crops, local crops.
        blur_sigma=(0.1, 0.5),
        solarize=(0.0, 0.0, 0.0),
        masks="ibot" if ibot else None,
        mask_patch_size=patch_size,
        mask_ratio=(0.1, 0.5),
        mask_probability=0.5,
    ))
    config.task = "dino"
    config.dino = ml_collections.ConfigDict(dict(
        student_temperature=0.1,
        teacher_temperature=0.04,
        warmup_teacher_temperature=0.04,
        warmup_teacher_temperature_steps=arg.steps // 10,
        centering="sinkhorn_knopp" if arg.method == "dinov2" else "center",
        center_momentum=0.9,
        teacher_momentum=0.99,
        ibot_weight=1.0 if ibot else 0.0,
        ibot_teacher_temperature=0.07 if ibot else 0.04,
        ibot_warmup_teacher_temperature=0.04,
        koleo_weight=0.1 if arg.method == "dinov2" else 0.0,
    ))
  config.init_head = "error"
  config.label_smoothing = 0.0
  # Weighted k-NN and a linear probe on the frozen class token (of the student and the teacher).
  config.evaluators = dict(knn=dict(), linear_probe=dict())

  config.batch_size = arg.batch_size
  config.optimizer.update(
      learning_rate=5e-4,  # DINO's 5e-4 x batch / 256 would be 2.5e-4.
      weight_decay=0.04,  # DINO's starting value (it rises to 0.4 there; fixed here).
      grad_clip_norm=3.0,  # DINO's clip_grad.
      warmup_steps=arg.steps // 10,
  )
  config.log_every = 50
  config.eval_every = arg.steps // 2
  config.checkpoint_every = arg.steps // 2
  config.keep_checkpoints = 1
  return config
