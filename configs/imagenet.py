r"""DeiT-S/16 on ImageNet-1k from scratch: DeiT's recipe (Touvron et al., 2021).

Prepare the data once (needs TensorFlow to build; reading it needs none). ImageNet
cannot be downloaded automatically: get ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar from https://image-net.org, put them in
$TFDS_DATA_DIR/downloads/manual/, then

    tfds build imagenet2012 --data_dir $TFDS_DATA_DIR --file_format array_record

Train (DeiT: 300 epochs at batch 1024; DeiT-B's 53 hours on 8 V100s is about 2,000
images/s of input, see BENCHMARKS.md "Input pipeline" for what the pipeline gives):

    python -m vitjax.train --config configs/imagenet.py --workdir workdirs/deit_s \
        --config.data_dir=$TFDS_DATA_DIR

ImageNet kept as folders of JPEGs (train/CLASS/*.JPEG, val/CLASS/*.JPEG) needs no
preparation; add worker processes to decode on more cores:

    python -m vitjax.train --config configs/imagenet.py --workdir workdirs/deit_s \
        --config.dataset=folder:/data/imagenet --config.input.num_workers=8

Expected (DeiT paper, Table 7): 79.8% top-1 on the 50,000 validation images for
DeiT-S, 72.2% for DeiT-Ti (`:variant=Ti/16`), 81.8% for DeiT-B (`:variant=B/16`).
Nothing here has been run on ImageNet by vitjax: these are the paper's numbers.
DeiT's repeated augmentation (3 repeats, which DeiT reports worth about +0.8% for
DeiT-B) is on. An EMA of the weights as DeiT's code keeps one (decay 0.99996) is
`--config.ema.decay=0.99996`, off in this config.

Training preprocessing is timm's `rand-m9-mstd0.5-inc1`, Mixup 0.8 / CutMix 1.0,
random erasing 0.25 and label smoothing 0.1; evaluation resizes the shorter side to
224 / 0.875 = 256 and centre-crops 224 (bicubic), DeiT's eval transform.

Arguments after the colon: `variant`, `epochs`, `batch_size`, `image_size`.
"""

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S/16", epochs=300, batch_size=1024,
                             image_size=224)
  # Every key the trainer reads, from the quickstart; the experiment changes below.
  config = config_lib.load_config(QUICKSTART)
  config.unlock()

  config.dataset = "imagenet2012"
  config.data_dir = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.train_split = "train"
  config.eval_split = "validation"
  config.input.update(
      image_size=arg.image_size,
      random_crop_padding=0,
      flip=True,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      inception_crop=True,
      randaugment_ops=2,  # rand-m9-mstd0.5-inc1
      randaugment_increasing=True,
      mixup_alpha=0.8,
      cutmix_alpha=1.0,
      random_erasing_prob=0.25,
      crop_pct=0.875,
      interpolation="bicubic",
      repeated_augmentation=3,  # DeiT's RASampler: each image 3 times per batch.
  )

  config.model = dict(
      name="vit",
      variant=arg.variant,
      num_classes=1000,
      image_size=arg.image_size,
      pool_type="token",
      posemb="learn",
      dropout=0.0,
      drop_path_rate=0.1,
      attention_impl=None,
      dtype="bfloat16",
  )
  config.label_smoothing = 0.1

  steps_per_epoch = NUM_TRAIN_IMAGES // arg.batch_size
  config.batch_size = arg.batch_size
  config.eval_batch_size = 1000  # 50 batches cover the 50,000 validation images.
  config.total_steps = arg.epochs * steps_per_epoch
  config.optimizer.update(dict(
      name="adamw",
      learning_rate=5e-4 * arg.batch_size / 512,  # DeiT's linear scaling rule.
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      grad_clip_norm=0.0,  # DeiT clips nothing.
      schedule="cosine",
      warmup_steps=5 * steps_per_epoch,
      end_learning_rate=1e-5,
  ))

  config.log_every = 100
  config.eval_every = 5 * steps_per_epoch
  config.checkpoint_every = 1000
  return config
