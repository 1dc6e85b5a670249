r"""Fine-tunes a MAE-pre-trained ViT on 10% of the digits labels (layer-wise lr decay).

    python -m vitjax.train --config configs/mae_digits.py --workdir workdirs/mae_digits
    python -m vitjax.train --config configs/mae_finetune_digits.py \
        --workdir workdirs/mae_finetune_digits

`init` is the pre-training workdir (or a saved .npz / HF ViTMAE file):
`vitjax.load_weights` gives the ViT the MAE's encoder and a fresh head. The
baseline, the same model from scratch on the same 144 labelled images:

    python -m vitjax.train --config configs/mae_finetune_digits.py:scratch \
        --workdir workdirs/scratch_digits

Results: experiments/mae.md.
"""

import ml_collections

from vitjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=600, image_size=16, labelled="10%",
                             init="workdirs/mae_digits", scratch=False, layer_decay=0.75)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = "digits"
  config.data_dir = None
  # The first 10% of the training split (144 images, every class) keep their labels.
  config.train_split = f"train[:{arg.labelled}]" if arg.labelled != "100%" else "train"
  config.eval_split = "test"
  config.input = dict(
      image_size=arg.image_size,
      random_crop_padding=arg.image_size // 8,
      flip=False,
      channels=3,
      mean=(0.5, 0.5, 0.5),
      std=(0.5, 0.5, 0.5),
  )

  config.model = dict(
      name="vit",
      variant=arg.variant,
      num_classes=10,
      image_size=arg.image_size,
      pool_type="token",  # The MAE encoder's class token.
      posemb="learn",  # Starts from MAE's sin-cos values, then trained.
      dropout=0.0,
      drop_path_rate=0.1,
      attention_impl=None,
      dtype="float32",
  )
  config.init = None if arg.scratch else arg.init
  config.init_head = "reinit"

  config.task = "supervised"
  config.evaluators = None
  config.label_smoothing = 0.1

  config.batch_size = 64
  config.eval_batch_size = 360
  config.total_steps = arg.steps
  config.optimizer = dict(
      name="adamw",
      learning_rate=1e-3,
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      momentum=0.9,
      grad_clip_norm=1.0,
      schedule="cosine",
      warmup_steps=50,
      end_learning_rate=1e-5,
      freeze=None,
      lr_multipliers=None,
      # Block i learns at layer_decay^(depth - i) of the rate, the embedding at
      # layer_decay^(depth + 1); the head at the full rate. Not for the scratch baseline.
      layer_decay=None if arg.scratch else arg.layer_decay,
  )

  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "dp"
  config.sharding_rules = None
  config.grad_accum_steps = 1
  config.distributed = dict(enabled=False, coordinator_address=None, num_processes=None,
                            process_id=None, cpu_collectives=None)

  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 600
  config.keep_checkpoints = 1
  return config
