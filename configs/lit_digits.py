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

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, loss="sigmoid", steps=600, locked=True,
                             image_init="workdirs/quickstart")
  # Data (digits at 16 px), input and mesh as in the quickstart.
  config = config_lib.load_config(f"{QUICKSTART}:variant=mu/4,image_size=16,steps={arg.steps}")

  # The quickstart's ViT (mu/4) without its classifier: its pooled features are the image
  # embedding (LiT's locked tower has no projection); the text tower projects to them.
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(
        name="two_towers",
        image=dict(variant="mu/4", image_size=16, pool_type="gap", posemb="learn"),
        text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, max_length=48,
                  vocab_size=259, pool_type="last", causal=False),
        embed_dim=64,
        image_projection=False,
        # SigLIP's initial logit scale exp(t) = 10 and bias -10; CLIP's 1/0.07 and no bias.
        temperature_init=2.302585 if arg.loss == "sigmoid" else 2.659260,
        bias_init=-10.0 if arg.loss == "sigmoid" else None,
    ))
    config.contrastive = dict(
        loss=arg.loss,
        tokenizer="bytes",
        class_names=None,  # None: the digits' names ('zero', ...).
        templates=None,  # None: contrastive.DIGIT_TEMPLATES.
        eval_template=0,  # Retrieval captions: "a photo of the digit {name}." for every image.
    )
  # An image model's checkpoint (workdir or file) initialises the image tower; the text
  # tower starts fresh. Its classifier is dropped (init_head='reinit').
  config.init = arg.image_init
  config.init_head = "reinit"
  config.task = "contrastive"
  config.evaluators = None  # None: zeroshot and retrieval.
  config.label_smoothing = 0.0  # Unused by the contrastive losses.

  config.optimizer.update(
      learning_rate=1e-3, weight_decay=1e-4, warmup_steps=50,
      freeze="^img/" if arg.locked else None)  # LiT: the image tower is locked.
  config.eval_every = 200
  config.checkpoint_every = 200
  return config
