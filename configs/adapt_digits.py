r"""Pre-train on the digits 0-4, adapt to 5-9: full fine-tuning against LoRA, VPT, adapters.

    python -m vitjax.train --config configs/adapt_digits.py:pretrain=True \
        --workdir workdirs/digits_0to4
    python -m vitjax.train --config configs/adapt_digits.py:method=lora,rank=4 \
        --workdir workdirs/adapt_lora4

Pre-training: the quickstart's ViT (mu/4, 16 px) on the training images of 0-4 only
(5 classes). Adaptation: the same model from `init` (the pre-training workdir), a fresh
5-way head for the digits 5-9 (renumbered 0-4), all of their training images, scored on
their test images. `method`:

  full        every parameter trains
  probe       the head only (linear probe)
  bitfit      the head and every bias (BitFit)
  norm        the head and the LayerNorms
  lora        LoRA of `rank` on `lora_targets` (query and value by default), and the head
  vpt         `tokens` shallow prompts (VPT-shallow), and the head
  vpt_deep    `tokens` prompts in every block (VPT-deep), and the head
  adapter     AdaptFormer adapters of width `dim` beside every MLP, and the head

Other arguments: `variant` / `image_size` (the pre-trained model's), `steps`, `lr` (None:
1e-3 for full fine-tuning, 1e-2 otherwise), `seed`, `init`; `width`, `depth`, `num_heads`,
`mlp_dim` override the variant's size, and `pretrain=True,all_classes=True` trains on all
ten digits (the larger model of the quantization table:

    python -m vitjax.train --workdir workdirs/digits_w128d8 --config \
        configs/adapt_digits.py:pretrain=True,all_classes=True,width=128,depth=8,mlp_dim=512
).
Results (accuracy against trainable parameters): experiments/adapt_compress.md.
"""

import os

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
METHODS = ("full", "probe", "bitfit", "norm", "lora", "vpt", "vpt_deep", "adapter")
# What trains beside the adapters (config.peft.train).
TRAIN = {"probe": "^head/", "bitfit": "^head/|/bias$", "norm": "^head/|LayerNorm|encoder_norm"}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, pretrain=False, method="lora", rank=4, alpha=None,
                             lora_targets="MultiHeadDotProductAttention_0/(query|value)$",
                             tokens=10, dim=16, variant="mu/4", image_size=16, steps=None,
                             lr=None, seed=0, init="workdirs/digits_0to4", all_classes=False,
                             width=0, depth=0, num_heads=0, mlp_dim=0)
  if arg.method not in METHODS:
    raise config_lib.ConfigError(f"adapt_digits.py: method={arg.method!r}; use one of "
                                 f"{', '.join(METHODS)}.")
  steps = arg.steps or (1200 if arg.pretrain else 600)
  config = config_lib.load_config(
      f"{QUICKSTART}:variant={arg.variant},image_size={arg.image_size},steps={steps}")
  config.seed = arg.seed
  size = {key: arg[key] for key in ("width", "depth", "num_heads", "mlp_dim") if arg[key]}
  if size:  # Fields of the model that win over the variant (config.model has no such keys).
    with config.unlocked():
      config.model.update(size)
  if arg.pretrain and arg.all_classes:
    return config
  config.model.num_classes = 5
  if arg.pretrain:
    config.input.classes = (0, 1, 2, 3, 4)
    return config

  config.input.classes = (5, 6, 7, 8, 9)
  config.init = arg.init
  config.init_head = "reinit"
  config.model.drop_path_rate = 0.0 if arg.method != "full" else 0.1
  peft = config.peft
  if arg.method == "lora":
    peft.lora.update(rank=arg.rank, alpha=arg.alpha, targets=arg.lora_targets)
  elif arg.method in ("vpt", "vpt_deep"):
    peft.prompts.update(num_tokens=arg.tokens, deep=arg.method == "vpt_deep")
  elif arg.method == "adapter":
    peft.adapter.dim = arg.dim
  elif arg.method in TRAIN:
    peft.train = TRAIN[arg.method]
  config.optimizer.update(
      learning_rate=arg.lr or (1e-3 if arg.method == "full" else 1e-2),
      warmup_steps=50,
      weight_decay=0.05 if arg.method == "full" else 0.0,
  )
  config.eval_every = 300
  config.checkpoint_every = steps
  config.keep_checkpoints = 1
  return config
