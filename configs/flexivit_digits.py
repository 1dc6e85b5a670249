r"""FlexiViT on the digits: one ViT trained at patch sizes 2, 4 and 8, evaluated at each.

    python -m vitjax.train --config configs/flexivit_digits.py --workdir workdirs/flexivit

The quickstart's setup (ViT mu, 16x16 digits, 1,200 steps) with the patch size of each
step drawn uniformly from `patch_sizes` (FlexiViT, Beyer et al. 2023): the patch
embedding is stored at 4x4 (`variant`'s patch) and PI-resized to the step's size, the
4x4 grid of position embeddings resized to the step's grid. The classification
evaluator reports `top1@p2`, `top1@p4`, `top1@p8` beside `top1` (the stored size).

The fixed-patch baselines of experiments/flexi_navit.md are the same config with one
size, evaluated at all three through PI-resize alone:

    python -m vitjax.train --config configs/flexivit_digits.py:variant=mu/2,patch_sizes=none \
        --workdir workdirs/vit_p2

Expected (experiments/flexi_navit.md, 2-core CPU, about 5 minutes): 97.8 / 97.2 / 96.7%
test top-1 at patches 2 / 4 / 8, within 1-2 points of a ViT trained at each size alone,
where each fixed ViT falls to 12-64% at the sizes it was not trained at.

Arguments after the colon: `variant`, `patch_sizes` ('2-4-8', or 'none': a fixed ViT),
`eval_patch_sizes` ('2-4-8'), `steps`, `image_size`.
"""

import os

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def _sizes(text):
  return None if str(text).lower() == "none" else tuple(int(p) for p in str(text).split("-"))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", patch_sizes="2-4-8", eval_patch_sizes="2-4-8",
                             steps=1200, image_size=16)
  config = config_lib.load_config(
      f"{QUICKSTART}:variant={arg.variant},steps={arg.steps},image_size={arg.image_size}")
  config.unlock()
  # The training set of patch sizes, one drawn per step from (seed, step); the kernel
  # stays stored at the variant's patch size. None: a plain ViT at that size.
  config.model.patch_sizes = _sizes(arg.patch_sizes)
  config.evaluators = {"classification": {"patch_sizes": _sizes(arg.eval_patch_sizes) or ()}}
  config.lock()
  return config
