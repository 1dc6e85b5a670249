r"""Fine-tuning from pretrained weights: big_vision's transfer recipe.

    python -m vitjax.train --config configs/transfer.py:image_size=16 \
        --workdir workdirs/transfer --config.init=pretrained.npz

`config.init` is any `vitjax.load_weights` source: a big_vision / AugReg .npz, a
timm or Hugging Face .safetensors / .pth / .bin, or an .npz that `vitjax.save_weights`
wrote. The recipe: SGD with momentum 0.9, no weight decay, gradient clipping at
global norm 1, a short linear warmup and cosine decay; the model at `image_size`
(usually higher than in pretraining: the position embeddings are resized when the
weights load) with a fresh head (`init_head='reinit'`). The model keys must
describe the pretrained model (variant, pool_type, posemb).

The defaults fine-tune on the embedded digits, e.g. from the quickstart's weights
pretrained at 8x8 (97.2% top-1 at 8x8): 300 steps at 16x16 reach 93.3% top-1
(the quickstart from scratch at 16x16: 88.9% after 300 steps); commands in
experiments/transfer.md. For CIFAR, Pets or Flowers through TFDS at 384 see
configs/finetune.py.

Arguments after the colon: `variant`, `image_size`, `steps`, `init`, `pool_type`.
Everything else (data, input normalisation, mesh) is the quickstart's.
"""

import os

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", image_size=16, steps=300, init="",
                             pool_type="gap")
  # Data, model and mesh as in the quickstart; what differs is the recipe below.
  config = config_lib.load_config(
      f"{QUICKSTART}:variant={arg.variant},image_size={arg.image_size},steps={arg.steps}")
  config.model.pool_type = arg.pool_type  # 'token' for the AugReg / ViT paper checkpoints.
  config.model.drop_path_rate = 0.0
  config.label_smoothing = 0.0
  config.init = arg.init or None  # Weights to start from: any vitjax.load_weights source.
  config.init_head = "reinit"  # A fresh head for the new classes.

  config.optimizer.update(
      name="sgd",
      # Best of {0.01, 0.03, 0.1} on digits (experiments/transfer.md); big_vision sweeps
      # {0.003, 0.01, 0.03} for ImageNet-scale models at batch 512.
      learning_rate=0.1,
      momentum=0.9,
      weight_decay=0.0,
      grad_clip_norm=1.0,
      schedule="cosine",
      warmup_steps=max(arg.steps // 20, 1),  # Short: the weights are already trained.
      end_learning_rate=0.0,
      # Regex(es) over parameter names that are never updated, e.g. the patch embedding
      # and the first block: ('^embedding/', '^Transformer/encoderblock_0/').
      freeze=None,
      # ((regex, factor), ...), first match wins: e.g. (('^head/', 10.0),) for a head that
      # learns faster than the pretrained body, or (('^Transformer/', 0.1),).
      lr_multipliers=None,
  )
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100
  return config
