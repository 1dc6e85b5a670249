"""PyTorch reference input pipeline for `python -m vitjax.data.throughput --compare timm`.

timm's DeiT training transform (RandomResizedCrop, flip, RandAugment
rand-m9-mstd0.5-inc1, ToTensor, Normalize, RandomErasing 0.25 in pixel mode) in a
torch DataLoader over an image folder (torchvision ImageFolder layout:
folder/CLASS/IMAGE.jpg): the images/s that vitjax's own pipeline is measured against.

Needs torch, torchvision and timm, which are not among vitjax's extras; install them
in a separate venv, e.g. `pip install torch==2.14.1 torchvision==0.29.1 timm`.
They are imported inside the functions so that vitjax imports without them.
"""

import time


def _posterize_zero_bits_to_black():
  """timm's PosterizeIncreasing asks for 0 bits at high magnitudes; Pillow >= 12 refuses.

  Pillow before that masked every bit (a black image); this restores it, in this
  process and in the DataLoader's forked workers. vitjax's RandAugment does the same.
  """
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  original = ImageOps.posterize
  if getattr(original, "zero_bits_black", False):
    return

  def posterize(image, bits):
    return Image.new(image.mode, image.size) if bits < 1 else original(image, bits)

  posterize.zero_bits_black = True
  ImageOps.posterize = posterize


def deit_transform(image_size: int, *, mean, std, interpolation="bicubic",
                   randaugment="rand-m9-mstd0.5-inc1", re_prob=0.25):
  """timm's training transform with DeiT's settings (DeiT's `build_transform`)."""
  from timm.data import create_transform  # pylint: disable=g-import-not-at-top
  _posterize_zero_bits_to_black()
  return create_transform(
      image_size, is_training=True,
      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
      # DeiT passes 0.4, but timm drops color jitter when RandAugment is on.
      color_jitter=0.4, auto_augment=randaugment, interpolation=interpolation,
      mean=tuple(mean), std=tuple(std), re_prob=re_prob, re_mode="pixel",
      re_count=1)


def _one_thread(worker_id):
  del worker_id
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)


def images_per_second(folder: str, *, image_size: int, batch_size: int,
                      steps: int, num_workers: int, mean, std,
                      interpolation="bicubic", seed=0, warmup=1) -> float:
  """Training images/s of `steps` batches after `warmup` batches.

  num_workers=0 does all the work in this process; otherwise N worker processes.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  dataset = torchvision.datasets.ImageFolder(
      folder, transform=deit_transform(image_size, mean=mean, std=std,
                                       interpolation=interpolation))
  if len(dataset) < batch_size:
    raise ValueError(f"{folder} has {len(dataset)} images, fewer than one "
                     f"batch of {batch_size}.")
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=batch_size, shuffle=True,
      generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
      drop_last=True, persistent_workers=num_workers > 0, pin_memory=False,
      worker_init_fn=_one_thread)

  def batches():  # Folders smaller than (steps + 1) batches: more epochs.
    while True:
      yield from loader

  # One intra-op thread per process, so that N workers use N cores (torch's
  # default would give each process every core and oversubscribe them).
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    iterator = batches()
    for _ in range(warmup):
      next(iterator)  # Workers start and the first batches are prefetched.
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    seconds = time.perf_counter() - start
  finally:
    torch.set_num_threads(threads)
  return steps * batch_size / seconds
