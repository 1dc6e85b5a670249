r"""LiT on the digits: a locked, supervised digits ViT and a text tower trained to match it.

First the image tower, the quickstart's supervised ViT (mu/4, 98% test top-1):

    python -m vitjax.train --config configs/quickstart.py --workdir workdirs/quickstart

then LiT-tuning of a text tower against it, zero-shot on the 360 test digits:

    python -m vitjax.train --config configs/lit_digits.py --workdir workdirs/lit_digits

`init` (here the image tower's) may be a training workdir (its latest
checkpoint) or any file `vitjax.load_weights` reads. Arguments: `configs/lit_digits.py:loss=softmax,steps=600`
(loss='sigmoid' is SigLIP's, 'softmax' CLIP's); `locked=False` trains both towers
from the checkpoint. Expected: see experiments/contrastive.md.
"""

import ml_collections

from vitjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, loss="sigmoid", steps=600, locked=True,
                             image_init="workdirs/quickstart")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = "digits"
  config.data_dir = None
  config.train_split = "train"
  config.eval_split = "test"
  config.input = dict(image_size=16, random_crop_padding=2, flip=False, channels=3,
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

  # The quickstart's ViT (mu/4) without its classifier: its pooled features are the image
  # embedding (LiT's locked tower has no projection); the text tower projects to them.
  config.model = dict(
      name="two_towers",
      image=dict(variant="mu/4", image_size=16, pool_type="gap", posemb="learn"),
      text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, max_length=48, vocab_size=259,
                pool_type="last", causal=False),
      embed_dim=64,
      image_projection=False,
      # SigLIP's initial logit scale exp(t) = 10 and bias -10; CLIP's 1/0.07 and no bias.
      temperature_init=2.302585 if arg.loss == "sigmoid" else 2.659260,
      bias_init=-10.0 if arg.loss == "sigmoid" else None,
  )
  # An image model's checkpoint (workdir or file) initialises the image tower; the text
  # tower starts fresh. Its classifier is dropped (init_head='reinit').
  config.init = arg.image_init
  config.init_head = "reinit"

  config.task = "contrastive"
  config.contrastive = dict(
      loss=arg.loss,
      tokenizer="bytes",
      class_names=None,  # None: the digits' names ('zero', ...).
      templates=None,  # None: contrastive.DIGIT_TEMPLATES.
      eval_template=0,  # Retrieval captions: "a photo of the digit {name}." for every image.
  )
  config.evaluators = None  # None: zeroshot and retrieval.

  config.batch_size = 128
  config.eval_batch_size = 360
  config.total_steps = arg.steps
  config.optimizer = dict(
      name="adamw", learning_rate=1e-3, weight_decay=1e-4, b1=0.9, b2=0.999, momentum=0.9,
      grad_clip_norm=1.0, schedule="cosine", warmup_steps=50, end_learning_rate=1e-5,
      freeze="^img/" if arg.locked else None,  # LiT: the image tower is locked.
      lr_multipliers=None)

  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "dp"
  config.sharding_rules = None
  config.grad_accum_steps = 1
  config.distributed = dict(enabled=False, coordinator_address=None, num_processes=None,
                            process_id=None, cpu_collectives=None)

  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  return config
