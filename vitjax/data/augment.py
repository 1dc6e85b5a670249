"""Training augmentations with timm's semantics, as numpy/PIL functions.

Per example, on uint8 images (what timm does with PIL before `ToTensor`):
  `inception_crop_box`  RandomResizedCrop's box, torchvision's sampling and fallback.
  `rand_augment`        RandAugment: N random ops at magnitude M (timm's
                        'rand-m9-mstd0.5' op set; `increasing=True` is '-inc1').
Per example, on normalized float images:
  `erase_box`, `random_erase`  timm's RandomErasing (one box, per-pixel normal noise).
Per batch, on normalized float images and integer labels:
  `mixup_parameters`, `mix_batch`  Mixup / CutMix with mixed soft targets.

Every random function takes a `np.random.Generator`; the pipeline seeds one per
(seed, step, example position), so augmentations are reproducible and
independent of how many hosts share a batch.
"""

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

# timm's magnitude scale: levels run from 0 to 10.
_MAX_LEVEL = 10.0
# RandAugment applies each chosen op with this probability (timm's default).
_OP_PROBABILITY = 0.5
_RESAMPLES = (Image.BILINEAR, Image.BICUBIC)


def stream_rng(stream: int, seed: int, counter: int) -> np.random.Generator:
  """The random stream `stream` (a tag) of run `seed` at `counter` (a step or a position).

  The input pipeline's randomness is all drawn from these, so a batch is a function of
  (seed, step). SeedSequence hashes the whole list, so nearby seeds and counters give
  unrelated streams. It wants non-negative Python integers.
  """
  return np.random.default_rng([stream, int(seed) % 2**64, int(counter)])


def inception_crop_box(rng: np.random.Generator, height: int, width: int,
                       scale: Sequence[float] = (0.08, 1.0),
                       ratio: Sequence[float] = (3 / 4, 4 / 3)
                       ) -> tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) of a RandomResizedCrop.

  Area fraction uniform in `scale`, aspect ratio (width / height) log-uniform
  in `ratio`; ten tries, then the fallback of torchvision: the largest centred
  crop with an aspect ratio clipped to `ratio`.
  """
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
    crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_width = width
    crop_height = int(round(crop_width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_height = height
    crop_width = int(round(crop_height * max(ratio)))
  else:
    crop_width, crop_height = width, height
  return ((height - crop_height) // 2, (width - crop_width) // 2, crop_height,
          crop_width)


# RandAugment. Each op is (apply(image, argument, resample, fill), level_to_argument).


def _negate_half(rng: np.random.Generator, value: float) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple, resample: int,
            fill) -> Image.Image:
  return image.transform(image.size, Image.AFFINE, matrix, resample=resample,
                         fillcolor=fill)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128):
  pixels = np.asarray(image).astype(np.int16)
  added = np.minimum(255, pixels + add)
  return Image.fromarray(np.where(pixels < threshold, added, pixels)
                         .astype(np.uint8), image.mode)


def _posterize(image: Image.Image, bits: int) -> Image.Image:
  """Keeps the `bits` high bits; 0 bits (timm's level < 2.5) is black."""
  if bits >= 8:
    return image
  mask = (0xFF << (8 - bits)) & 0xFF  # PIL's posterize refuses 0 bits.
  return image.point(lambda value: value & mask)


def _enhance(enhancer) -> Callable:
  return lambda image, factor, resample, fill: enhancer(image).enhance(factor)


def _no_argument(function) -> Callable:
  return lambda image, argument, resample, fill: function(image)


def _operations(increasing: bool) -> dict[str, tuple[Callable, Callable]]:
  """timm's RandAugment ops and how a level in [0, 10] maps to their argument."""
  def fraction(level):
    return level / _MAX_LEVEL

  if increasing:  # Stronger with the level in both directions from identity.
    def enhance_factor(level, rng):
      return 1.0 + _negate_half(rng, fraction(level) * 0.9)

    def posterize_bits(level, rng):
      return 4 - int(fraction(level) * 4)

    def solarize_threshold(level, rng):
      return 256 - min(256, int(fraction(level) * 256))
  else:
    def enhance_factor(level, rng):
      return fraction(level) * 1.8 + 0.1

    def posterize_bits(level, rng):
      return int(fraction(level) * 4)

    def solarize_threshold(level, rng):
      return min(256, int(fraction(level) * 256))

  def none(level, rng):
    return None

  def rotate_degrees(level, rng):
    return _negate_half(rng, fraction(level) * 30.0)

  def shear(level, rng):
    return _negate_half(rng, fraction(level) * 0.3)

  def translate_fraction(level, rng):
    return _negate_half(rng, fraction(level) * 0.45)

  def solarize_add(level, rng):
    return min(128, int(fraction(level) * 110))

  return {
      "AutoContrast": (_no_argument(ImageOps.autocontrast), none),
      "Equalize": (_no_argument(ImageOps.equalize), none),
      "Invert": (_no_argument(ImageOps.invert), none),
      "Rotate": (lambda image, degrees, resample, fill: image.rotate(
          degrees, resample=resample, fillcolor=fill), rotate_degrees),
      "Posterize": (lambda image, bits, resample, fill: _posterize(image, bits),
                    posterize_bits),
      "Solarize": (lambda image, threshold, resample, fill: ImageOps.solarize(
          image, threshold), solarize_threshold),
      "SolarizeAdd": (lambda image, add, resample, fill: _solarize_add(
          image, add), solarize_add),
      "Color": (_enhance(ImageEnhance.Color), enhance_factor),
      "Contrast": (_enhance(ImageEnhance.Contrast), enhance_factor),
      "Brightness": (_enhance(ImageEnhance.Brightness), enhance_factor),
      "Sharpness": (_enhance(ImageEnhance.Sharpness), enhance_factor),
      "ShearX": (lambda image, factor, resample, fill: _affine(
          image, (1, factor, 0, 0, 1, 0), resample, fill), shear),
      "ShearY": (lambda image, factor, resample, fill: _affine(
          image, (1, 0, 0, factor, 1, 0), resample, fill), shear),
      "TranslateXRel": (lambda image, shift, resample, fill: _affine(
          image, (1, 0, shift * image.size[0], 0, 1, 0), resample, fill),
                        translate_fraction),
      "TranslateYRel": (lambda image, shift, resample, fill: _affine(
          image, (1, 0, 0, 0, 1, shift * image.size[1]), resample, fill),
                        translate_fraction),
  }


RAND_AUGMENT_OPS = tuple(_operations(increasing=False))
_OPERATIONS = {False: _operations(False), True: _operations(True)}


def apply_operation(name: str, image: Image.Image, level: float,
                    rng: np.random.Generator, *, increasing: bool = False,
                    fill: int | tuple[int, ...] = 128) -> Image.Image:
  """One RandAugment op at `level` in [0, 10] (signs and resampling from rng)."""
  apply, level_to_argument = _OPERATIONS[increasing][name]
  if image.mode == "L" and isinstance(fill, tuple):
    fill = fill[0]
  resample = _RESAMPLES[int(rng.integers(len(_RESAMPLES)))]
  return apply(image, level_to_argument(level, rng), resample, fill)


def rand_augment(rng: np.random.Generator, image: Image.Image, *,
                 num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, increasing: bool = False,
                 fill: int | tuple[int, ...] = 128) -> Image.Image:
  """timm's RandAugment: `num_ops` ops drawn with replacement, each applied
  with probability 1/2 at a magnitude drawn from N(magnitude, magnitude_std)
  clipped to [0, 10] (uniform in [0, magnitude] when magnitude_std is inf).
  `fill` colours the corners that rotations, shears and translations uncover.
  """
  for op_index in rng.integers(0, len(RAND_AUGMENT_OPS), size=num_ops):
    if rng.random() > _OP_PROBABILITY:
      continue
    level = magnitude
    if magnitude_std == float("inf"):
      level = rng.uniform(0.0, magnitude)
    elif magnitude_std > 0:
      level = rng.normal(magnitude, magnitude_std)
    level = min(max(level, 0.0), _MAX_LEVEL)
    image = apply_operation(RAND_AUGMENT_OPS[op_index], image, level, rng,
                            increasing=increasing, fill=fill)
  return image


RANDOM_ERASING_MODES = ("pixel", "rand", "const")  # Noise per pixel, per channel, zeros.


def erase_box(rng: np.random.Generator, height: int, width: int, *,
              probability: float = 0.25, area: Sequence[float] = (0.02, 1 / 3),
              aspect: Sequence[float] = (0.3, 1 / 0.3)
              ) -> tuple[int, int, int, int] | None:
  """(top, left, box_height, box_width) of timm's RandomErasing, or None (not erased).

  With `probability`, one box of area fraction uniform in `area` and aspect
  ratio log-uniform in `aspect`; ten tries, then none.
  """
  if rng.random() > probability:
    return None
  log_aspect = np.log(aspect)
  for _ in range(10):
    target_area = rng.uniform(area[0], area[1]) * height * width
    aspect_ratio = math.exp(rng.uniform(log_aspect[0], log_aspect[1]))
    box_height = int(round(math.sqrt(target_area * aspect_ratio)))
    box_width = int(round(math.sqrt(target_area / aspect_ratio)))
    if box_width < width and box_height < height:
      top = int(rng.integers(0, height - box_height + 1))
      left = int(rng.integers(0, width - box_width + 1))
      return top, left, box_height, box_width
  return None


def random_erase(rng: np.random.Generator, image: np.ndarray, *,
                 probability: float = 0.25, mode: str = "pixel",
                 area: Sequence[float] = (0.02, 1 / 3),
                 aspect: Sequence[float] = (0.3, 1 / 0.3)) -> np.ndarray:
  """timm's RandomErasing on one normalized float [H, W, C] image.

  The box of `erase_box` is filled with standard normal noise per pixel
  ('pixel'), per channel ('rand') or zeros ('const').
  """
  if mode not in RANDOM_ERASING_MODES:
    raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', "
                     f"not {mode!r}.")
  height, width, channels = image.shape
  box = erase_box(rng, height, width, probability=probability, area=area, aspect=aspect)
  if box is None:
    return image
  top, left, box_height, box_width = box
  shape = {"pixel": (box_height, box_width, channels),
           "rand": (1, 1, channels), "const": None}[mode]
  image = image.copy()
  image[top:top + box_height, left:left + box_width] = (
      0.0 if shape is None else rng.standard_normal(shape, np.float32))
  return image


def mixup_parameters(rng: np.random.Generator, *, mixup_alpha: float,
                     cutmix_alpha: float, probability: float = 1.0,
                     switch_probability: float = 0.5
                     ) -> tuple[float, bool]:
  """(lambda, use_cutmix) for one batch, timm's Mixup in 'batch' mode.

  With `probability` the batch is mixed; with both alphas set, CutMix is
  chosen with `switch_probability`. lambda ~ Beta(alpha, alpha) of the chosen
  one; an unmixed batch has lambda 1.
  """
  if rng.random() >= probability:
    return 1.0, False
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = bool(rng.random() < switch_probability)
  else:
    use_cutmix = cutmix_alpha > 0
  alpha = cutmix_alpha if use_cutmix else mixup_alpha
  return float(rng.beta(alpha, alpha)), use_cutmix


def cutmix_box(rng: np.random.Generator, lam: float, height: int,
               width: int) -> tuple[tuple[int, int, int, int], float]:
  """((top, bottom, left, right), corrected lambda) of CutMix, timm's way.

  The box has sides sqrt(1 - lam) of the image's, centred at a uniform pixel
  and clipped to the image; lambda is corrected to 1 - box area / image area,
  the share of each image that is still its own.
  """
  cut_ratio = math.sqrt(1.0 - lam)
  cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
  center_y = int(rng.integers(0, height))
  center_x = int(rng.integers(0, width))
  top = int(np.clip(center_y - cut_height // 2, 0, height))
  bottom = int(np.clip(center_y + cut_height // 2, 0, height))
  left = int(np.clip(center_x - cut_width // 2, 0, width))
  right = int(np.clip(center_x + cut_width // 2, 0, width))
  corrected = 1.0 - (bottom - top) * (right - left) / (height * width)
  return (top, bottom, left, right), corrected


def mix_batch(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
              lam: float, box: tuple[int, int, int, int] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """Mixes each image with its pair partner: (images, soft targets [B, C]).

  Partners are neighbours (0 with 1, 2 with 3, ...), so a host's slice of a
  global batch is mixed exactly as in the whole batch. Mixup blends whole
  images; CutMix (`box` given, lam already corrected) pastes the partner's box.
  Targets are lam * one_hot(label) + (1 - lam) * one_hot(partner's label).
  """
  if len(images) % 2:
    raise ValueError(f"Mixup/CutMix pairs neighbouring examples and needs an "
                     f"even (per-host) batch size, not {len(images)}.")
  partner = np.arange(len(images)) ^ 1
  if box is None:
    images = lam * images + (1.0 - lam) * images[partner]
  else:
    top, bottom, left, right = box
    images = images.copy()
    images[:, top:bottom, left:right] = images[partner, top:bottom, left:right]
  one_hot = np.eye(num_classes, dtype=np.float32)[labels]
  targets = lam * one_hot + (1.0 - lam) * one_hot[partner]
  return images.astype(np.float32, copy=False), targets.astype(np.float32)
