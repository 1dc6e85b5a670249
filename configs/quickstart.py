r"""Quickstart: a small ViT on scikit-learn's handwritten digits, on a CPU, in minutes.

    python -m vitjax.train --config configs/quickstart.py --workdir workdirs/quickstart

(`make quickstart` runs exactly this.) Expected: at least 95% test top-1 on the
360 held-out digits in under 5 minutes on a 2-core CPU; see experiments/quickstart.md.

Arguments after the colon: `configs/quickstart.py:variant=mu/4,steps=300`.
"""

import ml_collections

from vitjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mu/4", steps=1200, image_size=16)
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: the embedded digits (no download), upscaled 8x8 -> image_size.
  config.dataset = "digits"
  config.data_dir = None
  config.train_split = "train"
  config.eval_split = "test"
  config.input = dict(
      image_size=arg.image_size,
      random_crop_padding=arg.image_size // 8,  # Random translation by up to 1/8 of the side.
      flip=False,  # A mirrored digit is another digit.
      channels=3,
      mean=(0.5, 0.5, 0.5),
      std=(0.5, 0.5, 0.5),
      pad_mode="constant",  # Or 'edge', for the random-crop padding.
      image_key="image",  # TFDS feature names.
      label_key="label",
      num_threads=None,  # Batch-building threads; None: 0 in memory, up to 8 from disk.
      num_workers=0,  # Training: grain worker processes building batches (0: this process).
      repeated_augmentation=1,  # DeiT's repeated augmentation: 3.
      device_preprocess=True,  # With per-example augmentation: uint8 batches, float ops in the step.
      # Augmentation (vitjax/data/augment.py, timm's semantics); all off for the digits.
      inception_crop=False,  # RandomResizedCrop with the scale and ratio ranges below.
      inception_crop_scale=(0.08, 1.0),
      inception_crop_ratio=(3 / 4, 4 / 3),
      randaugment_ops=0,  # rand-m9-mstd0.5-inc1 = 2 ops, magnitude 9, std 0.5, increasing.
      randaugment_magnitude=9.0,
      randaugment_magnitude_std=0.5,
      randaugment_increasing=False,
      mixup_alpha=0.0,  # Mixup / CutMix make the labels soft targets.
      cutmix_alpha=0.0,
      mixup_prob=1.0,
      mixup_switch_prob=0.5,
      random_erasing_prob=0.0,
      random_erasing_mode="pixel",
      # Evaluation: resize the shorter side to image_size / crop_pct, centre-crop.
      crop_pct=1.0,
      interpolation="bilinear",
      preprocess_from_model="",  # 'model': mean/std/crop_pct of config.model.name; or a name.
      skip_bad_images=False,  # True: undecodable records are replaced and counted.
      classes=None,  # e.g. (5, 6, 7, 8, 9): only those labels, renumbered 0..4 (every split).
  )

  config.model = dict(
      name="vit",
      variant=arg.variant,
      num_classes=10,
      image_size=arg.image_size,
      pool_type="gap",
      posemb="learn",
      dropout=0.0,
      drop_path_rate=0.1,
      attention_impl=None,
      dtype="float32",  # 'bfloat16' for mixed precision; params stay float32.
      # Fewer tokens per block (vitjax/models/token_merging.py): ToMe with r > 0, or
      # method='evit' / 'topk' pruning; r=0 and keep_rate=None: off, the plain ViT.
      token_merging=dict(method="tome", r=0, schedule="constant", keep_rate=None, layers=None,
                         proportional_attention=None),
  )
  config.init = None  # Optional weights to start from: any vitjax.load_weights source.
  config.init_head = "reinit"  # 'reinit': a fresh head; 'error': the head must fit.
  # Parameter-efficient fine-tuning (vitjax/adapt): all off. LoRA on the dense layers whose
  # path matches `targets` (rank > 0), VPT prompt tokens (num_tokens > 0, `deep` for every
  # block), AdaptFormer MLP adapters (dim > 0); only they and `train` (a regex of parameter
  # names; None: '^head/' when an adapter is on) train. `train` alone: BitFit
  # ('^head/|/bias$'), norm tuning ('^head/|LayerNorm|encoder_norm'), a linear probe
  # ('^head/'). configs/adapt_digits.py uses each.
  config.peft = dict(
      lora=dict(rank=0, alpha=None, dropout=0.0,
                targets="MultiHeadDotProductAttention_0/(query|value)$"),
      prompts=dict(num_tokens=0, deep=False, dropout=0.0),
      adapter=dict(dim=0, scale=0.1, targets="encoderblock[^/]*/MlpBlock_0$"),
      train=None,
  )

  config.task = "supervised"
  config.evaluators = None  # {name: options}; None runs the task's default (classification).
  config.label_smoothing = 0.1

  config.batch_size = 128
  config.eval_batch_size = 360
  config.total_steps = arg.steps
  config.optimizer = dict(
      name="adamw",
      learning_rate=2e-3,
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      momentum=0.9,  # For name='sgd'.
      grad_clip_norm=1.0,
      schedule="cosine",  # 'cosine', 'linear' or 'constant' after the warmup.
      warmup_steps=100,
      end_learning_rate=1e-5,
      freeze=None,  # Regex(es) over parameter names never to update, e.g. '^Transformer/'.
      lr_multipliers=None,  # ((regex, factor), ...): first match scales the learning rate.
      layer_decay=None,  # e.g. 0.75: block i learns at 0.75^(depth - i) (MAE/BEiT fine-tuning).
      sam_rho=0.0,  # > 0: SAM, the update from the gradient at a point rho away (e.g. 0.05).
  )
  # An EMA of the parameters (decay e.g. 0.9998), evaluated beside them as eval_ema/*;
  # warmup: timm's decay min(decay, 1 - (1 + step / warmup_gamma) ** -warmup_power).
  config.ema = dict(decay=None, warmup=False, warmup_gamma=1.0, warmup_power=0.75)
  # Weights of the aux losses a model returns in out['aux_loss'] ({name: weight}, 1.0
  # for a name not given), e.g. a mixture of experts' load balancing.
  config.aux_loss_weights = None

  # Parallelism (vitjax.train.sharding): mesh axis sizes, -1 = all remaining devices,
  # and the rules preset mapping logical axes to them: 'dp', 'fsdp' or 'fsdp_tp'. `expert`
  # splits a mixture of experts' experts (configs/moe_digits.py); elsewhere it is data parallel.
  config.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  config.sharding = "dp"
  config.sharding_rules = None  # An explicit ((logical, mesh_axes), ...) table instead.
  config.grad_accum_steps = 1
  # Multi-host: enabled=True calls jax.distributed.initialize (None = detect).
  config.distributed = dict(enabled=False, coordinator_address=None, num_processes=None,
                            process_id=None, cpu_collectives=None)

  # False: a NaN/inf loss or update stops the run, naming the step. True: such an
  # update is skipped (params and optimizer state unchanged), counted as train/skipped_steps.
  config.skip_nonfinite_steps = False

  config.log_every = 50
  config.eval_every = 300
  config.checkpoint_every = 300
  config.keep_checkpoints = 2
  return config
