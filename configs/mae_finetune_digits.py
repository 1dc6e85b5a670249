r"""Fine-tunes a MAE-pre-trained ViT on 10% of the digits labels (layer-wise lr decay).

    python -m vitjax.train --config configs/mae_digits.py --workdir workdirs/mae_digits
    python -m vitjax.train --config configs/mae_finetune_digits.py \
        --workdir workdirs/mae_finetune_digits

`init` is the pre-training workdir (or a saved .npz / HF ViTMAE file):
`vitjax.load_weights` gives the ViT the MAE's encoder and a fresh head. The
baseline, the same model from scratch on the same 144 labelled images:

    python -m vitjax.train --config configs/mae_finetune_digits.py:scratch \
        --workdir workdirs/scratch_digits

The same recipe fine-tunes the self-supervised encoders of configs/dino_digits.py
(`init=workdirs/dino_digits:teacher`) and configs/ijepa_digits.py
(`init=workdirs/ijepa_digits:target_encoder,pool_type=gap,posemb=sincos2d`).

Results: experiments/mae.md, experiments/self_distillation.md.
"""

import os

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=600, image_size=16, labelled="10%",
                             init="workdirs/mae_digits", scratch=False, layer_decay=0.75,
                             pool_type="token", posemb="learn", seed=0)
  # Data, input, mesh as in the quickstart; the labelled fraction and the recipe differ.
  config = config_lib.load_config(
      f"{QUICKSTART}:variant={arg.variant},image_size={arg.image_size},steps={arg.steps}")
  # The first 10% of the training split (144 images, every class) keep their labels.
  config.train_split = f"train[:{arg.labelled}]" if arg.labelled != "100%" else "train"
  # The MAE (and DINO) encoder's class token; I-JEPA's mean token: pool_type=gap.
  config.model.pool_type = arg.pool_type
  # MAE's sin-cos values, then trained; I-JEPA's fixed sin-cos: posemb=sincos2d.
  config.model.posemb = arg.posemb
  config.seed = arg.seed
  config.init = None if arg.scratch else arg.init
  config.init_head = "reinit"

  config.batch_size = 64
  config.optimizer.update(
      learning_rate=1e-3,
      warmup_steps=50,
      # Block i learns at layer_decay^(depth - i) of the rate, the embedding at
      # layer_decay^(depth + 1); the head at the full rate. Not for the scratch baseline.
      layer_decay=None if arg.scratch else arg.layer_decay,
  )
  config.eval_every = 200
  config.checkpoint_every = 600
  config.keep_checkpoints = 1
  return config
