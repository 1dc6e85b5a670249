"""Multi-crop input for self-supervised joint-embedding training (DINO, iBOT, DINOv2, I-JEPA).

With `config.input.multicrop` set (a dict of `MulticropConfig` keys), each training
example becomes G global and L local crops, each cropped, flipped, colour-jittered,
turned gray, blurred and solarised on its own (DINO's recipe, Caron et al. 2021), and
optionally masks for its global crops. A training batch (this host's B examples) is

    global_crops   float32 [B, G, S, S, C]  normalised with input.mean / input.std
    local_crops    float32 [B, L, s, s, C]  only when L > 0
    label          int32 [B]                kept; the self-supervised tasks do not use it
    ibot_mask      bool [B, G, n]           masks='ibot': iBOT's block-wise masks
    context_index  int32 [B, Kc]            masks='ijepa': the context block's patches
    target_index   int32 [B, M, Kt]         masks='ijepa': M target blocks' patches

Patch indices are row-major over the (S // mask_patch_size) ** 2 grid of n patches,
sorted within each row. JAX wants fixed shapes, so I-JEPA's token counts are fixed per
config (`ijepa_token_counts`; the dataset has them as `num_context_tokens` and
`num_target_tokens`): Kt is the smallest target block the scale and aspect ranges can
make on the grid, and a larger block keeps Kt of its patches at random (I-JEPA truncates
to the batch's smallest); Kc is the 1st percentile of the context's size over seeded
simulated draws, a draw with a smaller context is redrawn, a larger one keeps Kc of its
patches at random. Evaluation batches stay plain `image` batches.

Everything here is a function of a `np.random.Generator`, which the pipeline seeds by
(seed, stream position): an example's crops and masks are the same whatever the host,
thread or step a run resumes from.
"""

import dataclasses
import difflib
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter
from PIL import ImageOps

from vitjax.data import augment
from vitjax.data import preprocess

MASK_CHOICES = (None, "ibot", "ijepa")
# RandomResizedCrop's aspect ratios (torchvision's default, DINO's and I-JEPA's).
_CROP_RATIO = (3 / 4, 4 / 3)
# iBOT's block masks: aspect ratios of a masked rectangle (pred_aspect_ratio), and the
# tries per rectangle of BEiT's masking generator.
_MASK_ASPECT = (0.3, 1 / 0.3)
_MASK_TRIES = 10
# I-JEPA: draws simulated to fix the context size, the percentile of them it is, and
# the redraws an example may take before giving up (each succeeds with p >= 0.99).
_SIMULATED_DRAWS = 4096
_CONTEXT_PERCENTILE = 1
_MAX_REDRAWS = 1000
_SIMULATION_STREAM = 1000  # Seeds the simulation: Kc is a function of the config only.


@dataclasses.dataclass(frozen=True)
class MulticropConfig:
  """`config.input.multicrop`: the crops, their augmentation and the masks.

  The defaults are DINO's (ViT, ImageNet) and iBOT's. I-JEPA's: global_crops=1,
  local_crops=0, global_scale=(0.3, 1.0), jitter_probability=0, grayscale_probability=0,
  blur=0, solarize=0, masks='ijepa'.

  Attributes:
    global_crops: G, global crops per example (the teacher's views).
    global_size: S, their side; None: input.image_size (the eval images' side).
    global_scale: area fraction of a global crop (RandomResizedCrop's scale).
    local_crops: L, local crops per example; 0: none (and no `local_crops` key).
    local_size: s, their side.
    local_scale: area fraction of a local crop.
    flip: mirror each crop left-right with probability 1/2.
    jitter_probability: probability of colour jitter, per crop.
    color_jitter: (brightness, contrast, saturation, hue) strengths of torchvision's
      ColorJitter, applied in a random order; saturation and hue leave 1-channel
      images as they are.
    grayscale_probability: probability of turning a crop gray (RGB only).
    blur: probability of a Gaussian blur for (the first global crop, the other global
      crops, the local crops); one number sets all three.
    blur_sigma: (min, max) of the blur's sigma in pixels, drawn uniformly.
    solarize: probability of solarisation (threshold 128) for the same three kinds.
    masks: None, 'ibot' (block-wise masks of the global crops) or 'ijepa' (I-JEPA's
      context and target blocks of the first global crop).
    mask_patch_size: the patch the masks' grid is made of; must divide global_size.
    mask_ratio: iBOT: (min, max) of a masked crop's masked fraction, drawn uniformly.
    mask_probability: iBOT: probability that a global crop is masked at all.
    num_targets: I-JEPA: M, target blocks per example.
    target_scale: I-JEPA: (min, max) of a target block's area fraction of the grid.
    target_aspect: I-JEPA: (min, max) of a target block's aspect ratio (height / width).
    context_scale: I-JEPA: (min, max) of the context block's area fraction (square).
  """
  global_crops: int = 2
  global_size: int | None = None
  global_scale: tuple[float, float] = (0.4, 1.0)
  local_crops: int = 8
  local_size: int = 96
  local_scale: tuple[float, float] = (0.05, 0.4)
  flip: bool = True
  jitter_probability: float = 0.8
  color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
  grayscale_probability: float = 0.2
  blur: tuple[float, float, float] = (1.0, 0.1, 0.5)
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize: tuple[float, float, float] = (0.0, 0.2, 0.0)
  masks: str | None = None
  mask_patch_size: int = 16
  mask_ratio: tuple[float, float] = (0.1, 0.5)
  mask_probability: float = 0.5
  num_targets: int = 4
  target_scale: tuple[float, float] = (0.15, 0.2)
  target_aspect: tuple[float, float] = (0.75, 1.5)
  context_scale: tuple[float, float] = (0.85, 1.0)

  @classmethod
  def from_config(cls, multicrop: Any, *, image_size: int | None) -> "MulticropConfig":
    """From `config.input.multicrop` (a dict or ConfigDict); global_size defaults to
    `image_size` (None: unknown yet, checked once the dataset knows it)."""
    if isinstance(multicrop, cls):
      multicrop = dataclasses.asdict(multicrop)
    if not isinstance(multicrop, Mapping) and not hasattr(multicrop, "items"):
      raise ValueError(f"input.multicrop must be a dict of multi-crop options (its keys: "
                       f"{', '.join(_KEYS)}), or None to turn it off; not {multicrop!r}.")
    values = dict(multicrop.items())
    for key in values:
      if key not in _KEYS:
        close = difflib.get_close_matches(key, _KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"input.multicrop has no key {key!r}{hint}; its keys: "
                         f"{', '.join(_KEYS)}.")
    # A key set to None means its default, as in config.input.
    values = {key: value for key, value in values.items() if value is not None}
    values.setdefault("global_size", image_size)
    for key in ("blur", "solarize"):  # One probability for every kind of crop.
      if _is_number(values.get(key)):
        values[key] = (values[key],) * 3
    for key, value in values.items():
      if isinstance(value, Sequence) and not isinstance(value, str):
        values[key] = tuple(value)
    return cls(**values)

  def __post_init__(self):
    for key, low in (("global_crops", 1), ("local_crops", 0), ("local_size", 1),
                     ("mask_patch_size", 1), ("num_targets", 1)):
      _check(key, getattr(self, key), _is_int(getattr(self, key))
             and getattr(self, key) >= low, f"an integer >= {low}")
    if self.global_size is not None:
      _check("global_size", self.global_size,
             _is_int(self.global_size) and self.global_size >= 1,
             "an integer >= 1, or None for input.image_size")
    for key in ("jitter_probability", "grayscale_probability", "mask_probability"):
      _check(key, getattr(self, key), _is_probability(getattr(self, key)),
             "a probability in [0, 1]; 0 turns it off")
    for key in ("blur", "solarize"):
      value = getattr(self, key)
      _check(key, value, _numbers(value, 3) and all(map(_is_probability, value)),
             "three probabilities in [0, 1] (first global crop, other global crops, "
             "local crops), or one for all; 0 turns it off")
    for key in ("global_scale", "local_scale", "mask_ratio", "target_scale", "context_scale"):
      value = getattr(self, key)
      _check(key, value, _numbers(value, 2) and 0 < value[0] <= value[1] <= 1,
             "(min, max) with 0 < min <= max <= 1")
    for key in ("target_aspect", "blur_sigma"):
      value = getattr(self, key)
      _check(key, value, _numbers(value, 2) and 0 < value[0] <= value[1],
             "(min, max) with 0 < min <= max")
    _check("color_jitter", self.color_jitter,
           _numbers(self.color_jitter, 4) and min(self.color_jitter) >= 0
           and self.color_jitter[3] <= 0.5,
           "(brightness, contrast, saturation, hue), each >= 0, hue <= 0.5; "
           "jitter_probability=0 turns jitter off")
    _check("flip", self.flip, isinstance(self.flip, (bool, np.bool_)), "True or False")
    _check("masks", self.masks, self.masks in MASK_CHOICES,
           f"one of {', '.join(map(repr, MASK_CHOICES))}")
    if self.masks is not None and self.global_size is not None:
      if self.global_size % self.mask_patch_size:
        raise ValueError(
            f"input.multicrop.global_size={self.global_size} is not a whole number of "
            f"mask_patch_size={self.mask_patch_size} patches: set global_size to a "
            f"multiple of {self.mask_patch_size}, or mask_patch_size to a divisor of "
            f"{self.global_size} (the model's patch size).")
      if self.masks == "ijepa" and self.grid_size < 2:
        raise ValueError(
            f"input.multicrop.masks='ijepa' needs a grid of at least 2x2 patches, and "
            f"global_size={self.global_size} / mask_patch_size={self.mask_patch_size} "
            f"makes {self.grid_size}x{self.grid_size}: lower mask_patch_size.")

  @property
  def grid_size(self) -> int:
    """Side of the masks' patch grid, S // mask_patch_size."""
    return self.global_size // self.mask_patch_size


_KEYS = tuple(field.name for field in dataclasses.fields(MulticropConfig))


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))


def _is_probability(value) -> bool:
  return _is_number(value) and 0 <= value <= 1


def _numbers(value, count: int) -> bool:
  return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == count
          and all(map(_is_number, value)))


def _check(key: str, value, ok: bool, allowed: str):
  if not ok:
    raise ValueError(f"input.multicrop.{key}={value!r} must be {allowed}.")


# Crops: DINO's DataAugmentationDINO, per crop, on PIL images.


def _happens(rng: np.random.Generator, probability: float) -> bool:
  """True with `probability`; draws nothing when it is 0."""
  return probability > 0 and rng.random() < probability


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
  """torchvision's adjust_hue on PIL: the HSV hue channel shifted by `shift` of a turn."""
  hue, saturation, value = image.convert("HSV").split()
  shifted = (np.asarray(hue, np.int16) + int(shift * 255)) % 256
  hue = Image.fromarray(shifted.astype(np.uint8), "L")
  return Image.merge("HSV", (hue, saturation, value)).convert(image.mode)


def jitter_colors(rng: np.random.Generator, image: Image.Image,
                  strengths: Sequence[float]) -> Image.Image:
  """torchvision's ColorJitter: brightness, contrast, saturation and hue, in a random order.

  Factors are uniform in [max(0, 1 - x), 1 + x] (a hue shift in [-x, x] of a turn); a
  strength of 0 leaves that one out. Saturation and hue leave grayscale ('L') images be.
  """
  brightness, contrast, saturation, hue = strengths
  order = rng.permutation(4)

  def factor(strength):
    return rng.uniform(max(0.0, 1 - strength), 1 + strength) if strength else None

  factors = (factor(brightness), factor(contrast), factor(saturation),
             rng.uniform(-hue, hue) if hue else None)
  enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  for operation in order:
    value = factors[operation]
    if value is None or (operation >= 2 and image.mode != "RGB"):
      continue
    if operation < 3:
      image = enhancers[operation](image).enhance(value)
    else:
      image = _shift_hue(image, value)
  return image


def augment_crop(rng: np.random.Generator, image: Image.Image, config: MulticropConfig, *,
                 size: int, scale: Sequence[float], blur: float, solarize: float,
                 resample: int) -> np.ndarray:
  """One crop, DINO's way: random resized crop, flip, colour jitter, grayscale, blur,
  solarisation. uint8 [size, size, channels] of the image's channels."""
  width, height = image.size
  top, left, crop_height, crop_width = augment.inception_crop_box(
      rng, height, width, scale, _CROP_RATIO)
  crop = image.resize((size, size), resample,
                      box=(left, top, left + crop_width, top + crop_height))
  if config.flip and rng.random() < 0.5:
    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
  if _happens(rng, config.jitter_probability):
    crop = jitter_colors(rng, crop, config.color_jitter)
  if _happens(rng, config.grayscale_probability) and crop.mode == "RGB":
    crop = crop.convert("L").convert("RGB")
  if _happens(rng, blur):
    crop = crop.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*config.blur_sigma)))
  if _happens(rng, solarize):
    crop = ImageOps.solarize(crop, threshold=128)
  return np.asarray(crop).reshape(size, size, -1)


def crops(rng: np.random.Generator, image: np.ndarray, config: MulticropConfig, *,
          mean: Sequence[float], std: Sequence[float],
          resample: int = Image.BILINEAR) -> dict[str, np.ndarray]:
  """uint8 [H, W, C] (C = 1 or 3) -> {'global_crops': [G, S, S, C], 'local_crops':
  [L, s, s, C] (when L > 0)}, float32, normalised: (x / 255 - mean) / std."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  mean, std = 255 * np.asarray(mean, np.float32), 255 * np.asarray(std, np.float32)
  global_blur, other_blur, local_blur = config.blur
  global_solarize, other_solarize, local_solarize = config.solarize
  views = [augment_crop(rng, pil, config, size=config.global_size, scale=config.global_scale,
                        blur=global_blur if i == 0 else other_blur,
                        solarize=global_solarize if i == 0 else other_solarize,
                        resample=resample)
           for i in range(config.global_crops)]
  result = {"global_crops": preprocess.normalize(np.stack(views).astype(np.float32),
                                                 mean, std)}
  if config.local_crops:
    views = [augment_crop(rng, pil, config, size=config.local_size, scale=config.local_scale,
                          blur=local_blur, solarize=local_solarize, resample=resample)
             for _ in range(config.local_crops)]
    result["local_crops"] = preprocess.normalize(np.stack(views).astype(np.float32),
                                                 mean, std)
  return result


# iBOT: BEiT's block-wise masking generator, as iBOT's ImageFolderMask runs it.


def block_mask(rng: np.random.Generator, height: int, width: int, num_masked: float
               ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
  """(bool [height, width] mask, its rectangles (top, left, h, w)): up to `num_masked`
  patches masked as rectangles of random area and aspect ratio.

  Rectangles of area uniform in [(min side // 3) ** 2, patches still to mask] and aspect
  ratio log-uniform in (0.3, 1 / 0.3), smaller than the grid on both sides, each adding
  at least one and at most the patches still to mask; it stops when the count is
  reached or ten tries in a row fail (so it may mask a little less).
  """
  mask = np.zeros((height, width), bool)
  boxes = []
  count = 0
  low = (min(height, width) // 3) ** 2
  log_aspect = np.log(_MASK_ASPECT)
  while count < num_masked:
    remaining = num_masked - count
    added = 0
    for _ in range(_MASK_TRIES):
      area = rng.uniform(*sorted((low, remaining)))
      aspect = math.exp(rng.uniform(*log_aspect))
      box_height = int(round(math.sqrt(area * aspect)))
      box_width = int(round(math.sqrt(area / aspect)))
      if box_width < width and box_height < height:
        top = int(rng.integers(0, height - box_height + 1))
        left = int(rng.integers(0, width - box_width + 1))
        window = mask[top:top + box_height, left:left + box_width]
        new = box_height * box_width - int(window.sum())
        if 0 < new <= remaining:
          window[...] = True
          boxes.append((top, left, box_height, box_width))
          added = new
          break
    if not added:
      break
    count += added
  return mask, boxes


def ibot_masks(rng: np.random.Generator, config: MulticropConfig) -> np.ndarray:
  """bool [G, n]: each global crop masked with `mask_probability`, a fraction uniform in
  `mask_ratio` of its n patches (`block_mask`); unmasked crops are all False."""
  side = config.grid_size
  masks = np.zeros((config.global_crops, side * side), bool)
  for crop in range(config.global_crops):
    if _happens(rng, config.mask_probability):
      ratio = rng.uniform(*config.mask_ratio)
      masks[crop] = block_mask(rng, side, side, ratio * side * side)[0].ravel()
  return masks


# I-JEPA: multi-block masking (its MaskCollator), per example.


class IjepaDraw(NamedTuple):
  """One example's I-JEPA masks: indices as in the batch, and the blocks they are of."""
  context_index: np.ndarray  # int32 [Kc], sorted
  target_index: np.ndarray  # int32 [M, Kt], each row sorted
  target_boxes: list[tuple[int, int, int, int]]  # (top, left, height, width)
  context_box: tuple[int, int, int, int]


def _block_shape(side: int, keep: int, aspect: float) -> tuple[int, int]:
  """I-JEPA's block of about `keep` patches at `aspect` (height / width) on a side x side
  grid: each side rounded, at least 1 and, as I-JEPA has it, less than the grid's."""
  height = int(round(math.sqrt(keep * aspect)))
  width = int(round(math.sqrt(keep / aspect)))
  return min(max(height, 1), side - 1), min(max(width, 1), side - 1)


def ijepa_boxes(rng: np.random.Generator, config: MulticropConfig
                ) -> tuple[list[tuple[int, int, int, int]], tuple[int, int, int, int]]:
  """(M target blocks, the context block), each (top, left, height, width).

  One target shape per example (I-JEPA draws one per batch): area fraction uniform in
  `target_scale` and aspect ratio uniform in `target_aspect` (the paper's ranges; its
  code draws both from one uniform number); M positions. Then one square context
  block of area fraction uniform in `context_scale`.
  """
  side = config.grid_size
  cells = side * side
  height, width = _block_shape(side, int(cells * rng.uniform(*config.target_scale)),
                               rng.uniform(*config.target_aspect))
  targets = [(int(rng.integers(0, side - height + 1)), int(rng.integers(0, side - width + 1)),
              height, width) for _ in range(config.num_targets)]
  size, _ = _block_shape(side, int(cells * rng.uniform(*config.context_scale)), 1.0)
  context = (int(rng.integers(0, side - size + 1)), int(rng.integers(0, side - size + 1)),
             size, size)
  return targets, context


def _grid_mask(side: int, box: tuple[int, int, int, int]) -> np.ndarray:
  top, left, height, width = box
  mask = np.zeros((side, side), bool)
  mask[top:top + height, left:left + width] = True
  return mask


def _context_patches(side: int, targets, context) -> np.ndarray:
  """Patches of the context block that no target block covers, sorted."""
  mask = _grid_mask(side, context)
  for box in targets:
    mask &= ~_grid_mask(side, box)
  return np.flatnonzero(mask)


def _smallest_target(side: int, scale: Sequence[float], aspect: Sequence[float]) -> int:
  """The fewest patches a target block of `scale` and `aspect` can have on the grid.

  Exact: for each patch count the scale range gives, the block's sides only change
  where sqrt(keep * aspect) or sqrt(keep / aspect) crosses a half-integer, so the
  range's ends, those crossings and the points between them cover every shape.
  """
  cells = side * side
  smallest = cells
  for keep in range(int(cells * scale[0]), int(cells * scale[1]) + 1):
    points = {float(aspect[0]), float(aspect[1])}
    for half in (m + 0.5 for m in range(side + 1)):
      if keep:
        points.update(a for a in (half ** 2 / keep, keep / half ** 2)
                      if aspect[0] < a < aspect[1])
    points = sorted(points)
    for point in points + [(a + b) / 2 for a, b in zip(points, points[1:])]:
      height, width = _block_shape(side, keep, point)
      smallest = min(smallest, height * width)
  return smallest


@functools.lru_cache(maxsize=8)
def ijepa_token_counts(config: MulticropConfig) -> tuple[int, int]:
  """(Kc, Kt): the context's and each target block's patch counts in every batch.

  Kt is `_smallest_target`; Kc the 1st percentile (at least 1) of the context's size
  over 4,096 draws of `ijepa_boxes` from a fixed seed, so a function of the config.
  """
  rng = augment.stream_rng(_SIMULATION_STREAM, 0, 0)
  sizes = np.asarray([len(_context_patches(config.grid_size, *ijepa_boxes(rng, config)))
                      for _ in range(_SIMULATED_DRAWS)])
  context = max(1, int(np.percentile(sizes, _CONTEXT_PERCENTILE, method="lower")))
  if np.mean(sizes >= context) < 0.5:
    raise ValueError(
        f"input.multicrop: I-JEPA's target blocks cover the whole context block in most "
        f"draws on this {config.grid_size}x{config.grid_size} grid (num_targets="
        f"{config.num_targets}, target_scale={config.target_scale}, context_scale="
        f"{config.context_scale}): lower num_targets or target_scale, or use a finer grid "
        f"(a smaller mask_patch_size).")
  target = _smallest_target(config.grid_size, config.target_scale, config.target_aspect)
  return context, target


def ijepa_masks(rng: np.random.Generator, config: MulticropConfig, *,
                context_tokens: int, target_tokens: int) -> IjepaDraw:
  """One example's context and target indices; a draw whose context (after removing
  every target block) has fewer than `context_tokens` patches is redrawn."""
  side = config.grid_size
  for _ in range(_MAX_REDRAWS):
    targets, context = ijepa_boxes(rng, config)
    patches = _context_patches(side, targets, context)
    if len(patches) >= context_tokens:
      break
  else:
    raise RuntimeError(f"No I-JEPA draw in {_MAX_REDRAWS} had a context of "
                       f"{context_tokens} patches; `ijepa_token_counts` gives the count.")
  context_index = np.sort(rng.choice(patches, context_tokens, replace=False))
  target_index = np.stack([
      np.sort(rng.choice(np.flatnonzero(_grid_mask(side, box)), target_tokens,
                         replace=False)) for box in targets])
  return IjepaDraw(context_index.astype(np.int32), target_index.astype(np.int32),
                   targets, context)


def masks(rng: np.random.Generator, config: MulticropConfig, *,
          context_tokens: int | None = None,
          target_tokens: int | None = None) -> dict[str, np.ndarray]:
  """The mask keys of one example ({} without `masks`), drawn from `rng`."""
  if config.masks == "ibot":
    return {"ibot_mask": ibot_masks(rng, config)}
  if config.masks == "ijepa":
    draw = ijepa_masks(rng, config, context_tokens=context_tokens,
                       target_tokens=target_tokens)
    return {"context_index": draw.context_index, "target_index": draw.target_index}
  return {}
