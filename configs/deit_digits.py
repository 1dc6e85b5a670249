r"""DeiT distillation on the digits: a small ViT student learns from a larger ViT teacher.

First the teacher (the quickstart's ViT mu/4, ~98% test top-1, ~4 minutes on a 2-core CPU):

    python -m vitjax.train --config configs/quickstart.py --workdir workdirs/deit_teacher

Then the distilled student (soft distillation through the distillation token,
temperature 4, alpha 0.5; `:type=hard` for DeiT's hard-label variant):

    python -m vitjax.train --config configs/deit_digits.py --workdir workdirs/deit_student

and, for comparison, the same student trained on the labels alone for as many steps
(no teacher, no distillation token, as DeiT's non-distilled models):

    python -m vitjax.train --config configs/deit_digits.py:distill=False \
        --workdir workdirs/deit_baseline

Expected: the distilled student ahead of the baseline on the 360 test digits; the
numbers, over several seeds, are in experiments/distillation.md.

Arguments after the colon: `teacher` (a training workdir or an .npz / .safetensors
file of the quickstart's model), `type` ('hard' or 'soft'), `alpha`, `tau`,
`steps`, `seed`, `distill` (False: the baseline).
"""

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, teacher="workdirs/deit_teacher", type="soft", alpha=0.5,
                             tau=4.0, steps=400, seed=0, distill=True)
  teacher_config = config_lib.load_config(QUICKSTART)  # The model the teacher run trained.
  config = config_lib.load_config(f"{QUICKSTART}:steps={arg.steps}")
  config.unlock()
  config.seed = arg.seed

  # The student: a quarter of the teacher's compute (width 32, depth 2 against 64, 4).
  config.model = dict(
      name="vit",
      variant="mu/4",
      width=32,
      depth=2,
      mlp_dim=128,
      num_heads=2,
      num_classes=10,
      image_size=teacher_config.input.image_size,
      pool_type="token",  # The class token, and the distillation token beside it.
      distilled=arg.distill,
      posemb="learn",
      dropout=0.0,
      drop_path_rate=0.0,
      attention_impl=None,
      dtype="float32",
  )
  config.task = "distill" if arg.distill else "supervised"
  config.teacher = ml_collections.ConfigDict(dict(
      model=dict(teacher_config.model),
      init=arg.teacher,  # A training workdir, or an .npz / .safetensors file.
      mean=None,  # The teacher's input normalisation, when not the student's.
      std=None,
  ))
  config.distill = dict(type=arg.type, alpha=arg.alpha, tau=arg.tau)
  config.evaluators = {"classification": {}}
  config.eval_every = arg.steps
  config.checkpoint_every = arg.steps
  return config
