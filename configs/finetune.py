r"""Fine-tuning a pretrained ViT on CIFAR-10, CIFAR-100, Oxford-IIIT Pets or Flowers-102.

The transfer recipe of the ViT and AugReg papers (big_vision's transfer configs): SGD
with momentum 0.9, no weight decay, gradient clipping at norm 1, a short linear
warmup and cosine decay, batch 512, 384x384 inputs (the position embeddings are
resized when the weights load), a fresh zero-initialised head; training images
get an Inception crop and a flip, test images are resized to 384 (crop_pct 1).

Prepare a dataset once (the download needs the network; building needs TensorFlow,
reading afterwards does not):

    tfds build cifar10 --data_dir $TFDS_DATA_DIR --file_format array_record
    # likewise cifar100, oxford_iiit_pet, oxford_flowers102

Fine-tune from published weights (an AugReg .npz, or timm / HF .safetensors):

    python -m vitjax.train --config configs/finetune.py:dataset=cifar10 \
        --workdir workdirs/vit_b16_cifar10 --config.data_dir=$TFDS_DATA_DIR \
        --config.init=ViT-B_16-i21k.npz

Expected top-1 on the test split for ViT-B/16 pretrained on ImageNet-21k and
fine-tuned at 384 (ViT paper, Dosovitskiy et al. 2021, Table 5; quoted from memory
of the table, so check it before citing): CIFAR-10 98.95, CIFAR-100 91.67, Oxford-IIIT
Pets 94.43, Oxford Flowers-102 99.38. AugReg's
ImageNet-21k checkpoints (Steiner et al.) are trained longer with more augmentation
and should match or beat these. None of these runs has been made by vitjax: no
weights or datasets can be downloaded where it is developed.

Arguments after the colon: `dataset` (cifar10, cifar100, pets, flowers102),
`variant`, `image_size`, `init` (same as --config.init), `steps` (None: the
paper's schedule for that dataset).
"""

import os

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")

# name: (TFDS name, train split, test split, classes, steps, learning rate, warmup).
# Steps and learning rates from the ViT paper's transfer setup (Table 4, appendix B.1.1).
DATASETS = {
    "cifar10": ("cifar10", "train", "test", 10, 10_000, 0.01, 500),
    "cifar100": ("cifar100", "train", "test", 100, 10_000, 0.01, 500),
    "pets": ("oxford_iiit_pet", "train", "test", 37, 500, 0.003, 100),
    "flowers102": ("oxford_flowers102", "train+validation", "test", 102, 500, 0.003,
                   100),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dataset="cifar10", variant="B/16", image_size=384,
                             init="", steps=0)
  if arg.dataset not in DATASETS:
    raise config_lib.ConfigError(f"Unknown dataset {arg.dataset!r} for finetune.py; "
                                 f"one of {', '.join(DATASETS)}.")
  tfds_name, train_split, test_split, num_classes, steps, learning_rate, warmup = (
      DATASETS[arg.dataset])
  # Every key the trainer reads, from the quickstart; the experiment changes below.
  config = config_lib.load_config(QUICKSTART)
  config.unlock()

  config.dataset = tfds_name
  config.data_dir = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.train_split = train_split
  config.eval_split = test_split
  config.input.update(
      image_size=arg.image_size,
      random_crop_padding=0,
      flip=True,
      mean=(0.5, 0.5, 0.5),  # AugReg / original ViT weights expect [-1, 1].
      std=(0.5, 0.5, 0.5),
      inception_crop=True,
      crop_pct=1.0,
      interpolation="bilinear",
  )

  config.model = dict(
      name="vit",
      variant=arg.variant,
      num_classes=num_classes,
      image_size=arg.image_size,
      pool_type="token",
      posemb="learn",
      dropout=0.0,
      drop_path_rate=0.0,
      attention_impl=None,
      dtype="bfloat16",
  )
  config.init = arg.init or None
  config.init_head = "reinit"
  config.label_smoothing = 0.0

  config.batch_size = 512
  config.eval_batch_size = 512
  config.total_steps = arg.steps or steps
  config.optimizer.update(dict(
      name="sgd",
      learning_rate=learning_rate,
      weight_decay=0.0,
      momentum=0.9,
      grad_clip_norm=1.0,
      schedule="cosine",
      warmup_steps=warmup,
      end_learning_rate=0.0,
  ))
  config.log_every = 50
  config.eval_every = max(config.total_steps // 10, 50)
  config.checkpoint_every = max(config.total_steps // 10, 50)
  return config
