"""NaViT's packed input ("Patch n' Pack", Dehghani et al. 2023): images of any size, packed.

Each image is cut into patches at its own resolution and aspect ratio (for
training, a side length drawn per image; optionally capped to a token budget),
some of its tokens may be dropped, and images are packed greedily, first fit,
into sequences of a fixed number of tokens. Batches keep static shapes:

    image['patches']      float32 (S, L, p * p * C)  patch pixels, (row, col, channel) order
    image['segment_ids']  int32 (S, L)     1..K: the image a token is of; 0: padding
    image['coords']       int32 (S, L, 2)  (row, col) of the patch in its image's grid
    image['grid_sizes']   int32 (S, K, 2)  (rows, cols) of image k's whole grid; 0: no image
    label                 int32 (S, K)     the image's class (0 for an empty slot)
    mask                  bool (S, K)      True where a slot holds an image

S is config.batch_size (sequences per step), L `packing.seq_len`, K
`packing.max_images`. The patch order is that of a (p, p, C, width) patch
embedding kernel reshaped to (p * p * C, width), and of SigLIP 2's processor.

Training step s draws `packing.images_per_step` images: stream positions
[s * N, (s + 1) * N) of the same shuffled stream as every other batch, each
resized, flipped and thinned by randomness seeded by (seed, position), and
packs them in stream order; an image that fits in none of the S sequences
waits for no later step (the batch stays a pure function of (seed, s), so a
resumed run packs alike): the train step logs how many were packed
(`train/packed_images`) and the padding fraction (`train/padding_fraction`).
Evaluation packs the split in order, every image once, at its native
resolution (or `packing.eval_size`).
"""

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from vitjax.data import augment
from vitjax.data import preprocess
from vitjax.models.navit import SequencePacker, first_fit, pack_examples, patchify

Batch = dict[str, Any]
_PACK_STREAM = 5  # Per stream position: side lengths, flip, dropped tokens.
_PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def unpack(image: Batch, sequence: int, patch_size: int) -> list[np.ndarray]:
  """The images of packed `sequence` of a batch's `image` dict, [rows * p, cols * p, C] each;
  dropped tokens are zeros. The inverse of packing, for looking at a batch."""
  patches, ids = image["patches"][sequence], image["segment_ids"][sequence]
  coords, grids = image["coords"][sequence], image["grid_sizes"][sequence]
  channels = patches.shape[-1] // patch_size ** 2
  images = []
  for slot, (rows, cols) in enumerate(grids):
    if not rows:
      continue
    grid = np.zeros((rows, cols, patch_size, patch_size, channels), patches.dtype)
    tokens = ids == slot + 1
    grid[coords[tokens, 0], coords[tokens, 1]] = patches[tokens].reshape(
        -1, patch_size, patch_size, channels)
    images.append(grid.transpose(0, 2, 1, 3, 4).reshape(rows * patch_size, cols * patch_size,
                                                        channels))
  return images


def fit_grid(rows: int, cols: int, max_tokens: int | None) -> tuple[int, int]:
  """(rows, cols) scaled down, aspect ratio kept, to at most `max_tokens` patches."""
  if max_tokens is None or rows * cols <= max_tokens:
    return rows, cols
  scale = math.sqrt(max_tokens / (rows * cols))
  rows, cols = max(1, int(rows * scale)), max(1, int(cols * scale))
  while rows * cols > max_tokens:  # Rounding of the clamped side can still overshoot.
    if rows >= cols:
      rows -= 1
    else:
      cols -= 1
  return rows, cols


@dataclasses.dataclass(frozen=True)
class PackingConfig:
  """`config.input.packing`: how images become packed sequences (see the module docstring).

  Attributes:
    patch_size: side of a patch in pixels; None takes the model's.
    seq_len: tokens per sequence (L).
    max_images: image slots per sequence (K): per-image logits come out (S, K, classes).
    images_per_step: training: images drawn per step (global); None: as many as
      fill batch_size sequences on average (batch_size * seq_len / the mean
      tokens per image).
    resolution: training: (min, max) side in pixels, each side of each image drawn
      uniformly from the multiples of the patch in that range (NaViT's random
      sizes and aspect ratios); None: the image's own size, rounded to whole patches.
    max_tokens: the token budget of one image: larger ones are scaled down, aspect
      ratio kept; None: seq_len.
    token_drop_rate: training: the fraction of each image's tokens dropped at
      random (NaViT's token dropping): a number, or (low, high) for a rate drawn
      uniformly per image. At least one token of an image stays.
    eval_size: evaluation: images resized to eval_size x eval_size; None: their
      own size (native resolution), rounded to whole patches, capped at max_tokens.
  """
  patch_size: int | None = None
  seq_len: int = 256
  max_images: int = 16
  images_per_step: int | None = None
  resolution: tuple[int, int] | None = None
  max_tokens: int | None = None
  token_drop_rate: float | tuple[float, float] = 0.0
  eval_size: int | None = None

  @classmethod
  def from_config(cls, packing: Any, patch_size: int | None = None) -> "PackingConfig":
    """From `config.input.packing` (a dict or ConfigDict); unknown keys are an error."""
    values = dict(packing)
    unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"input.packing has no key {', '.join(map(repr, unknown))}; its keys: "
                       f"{', '.join(field.name for field in dataclasses.fields(cls))}.")
    values = {key: value for key, value in values.items() if value is not None}
    if values.get("patch_size") is None:
      values["patch_size"] = patch_size
    for key in ("resolution", "token_drop_rate"):
      if isinstance(values.get(key), (list, tuple)):
        values[key] = tuple(values[key])
    return cls(**values)

  def __post_init__(self):
    patch = self.patch_size
    if not isinstance(patch, int) or patch < 1:
      raise ValueError(f"input.packing needs the patch size (a positive int), got {patch!r}: "
                       "set input.packing.patch_size or give the model a patch_size.")
    for key in ("seq_len", "max_images"):
      if getattr(self, key) < 1:
        raise ValueError(f"input.packing.{key} must be >= 1, not {getattr(self, key)}.")
    if self.images_per_step is not None and self.images_per_step < 1:
      raise ValueError(f"input.packing.images_per_step must be >= 1, not "
                       f"{self.images_per_step}.")
    if self.max_tokens is not None and not 1 <= self.max_tokens <= self.seq_len:
      raise ValueError(f"input.packing.max_tokens={self.max_tokens} must be in [1, seq_len="
                       f"{self.seq_len}]: an image has to fit in one sequence.")
    if self.resolution is not None:
      if len(self.resolution) != 2 or not patch <= self.resolution[0] <= self.resolution[1]:
        raise ValueError(f"input.packing.resolution={self.resolution!r} must be (min, max) "
                         f"pixels with {patch} (the patch) <= min <= max.")
    low, high = self.drop_range
    if not 0 <= low <= high < 1:
      raise ValueError(f"input.packing.token_drop_rate={self.token_drop_rate!r} must be a "
                       "rate in [0, 1), or (low, high) with 0 <= low <= high < 1.")
    if self.eval_size is not None and self.eval_size < patch:
      raise ValueError(f"input.packing.eval_size={self.eval_size} is smaller than one "
                       f"{patch}x{patch} patch.")

  @property
  def token_budget(self) -> int:
    return self.max_tokens or self.seq_len

  @property
  def drop_range(self) -> tuple[float, float]:
    rate = self.token_drop_rate
    return tuple(float(r) for r in rate) if isinstance(rate, tuple) else (float(rate),) * 2

  def mean_tokens(self, native_grid: tuple[int, int]) -> float:
    """Expected tokens of a training image (after dropping); `native_grid` without resolution."""
    if self.resolution is None:
      grids = [fit_grid(*native_grid, self.token_budget)]
    else:
      sides = range(-(-self.resolution[0] // self.patch_size),
                    self.resolution[1] // self.patch_size + 1)
      grids = [fit_grid(rows, cols, self.token_budget) for rows in sides for cols in sides]
    keep = 1.0 - sum(self.drop_range) / 2
    return float(np.mean([max(1.0, rows * cols * keep) for rows, cols in grids]))


class PackedDataset:
  """A `vitjax.data.Dataset` whose batches are packed sequences (see the module docstring).

  Exposes what the trainer and the classification evaluator use: `train_iter`,
  `eval_iter`, `num_classes`, ...; everything else is the wrapped dataset's.
  """

  def __init__(self, dataset, packing: PackingConfig):
    self._dataset = dataset
    self.packing = packing
    self._input = dataset._input  # pylint: disable=protected-access
    raw = dataset._sources  # pylint: disable=protected-access
    self._train_raw, self._eval_raw = raw[0], raw[1]

  def __getattr__(self, name: str):
    return getattr(self._dataset, name)

  def __repr__(self) -> str:
    return f"PackedDataset({self._dataset!r}, {self.packing})"

  @property
  def device_fn(self):
    return None  # The host finishes packed batches.

  def images_per_step(self, batch_size: int) -> int:
    """Images drawn per training step: `packing.images_per_step`, or as many as fill up
    `batch_size` sequences on average."""
    if self.packing.images_per_step:
      return self.packing.images_per_step
    native = self._grid(self._dataset.image_shape[:2], None)
    return max(1, int(batch_size * self.packing.seq_len / self.packing.mean_tokens(native)))

  def _grid(self, shape: Sequence[int], rng: np.random.Generator | None) -> tuple[int, int]:
    """(rows, cols) an image of `shape` (H, W) is cut into: drawn with `rng` (training,
    `resolution`), else its own size in whole patches; within the token budget."""
    patch, packing = self.packing.patch_size, self.packing
    if rng is not None and packing.resolution is not None:
      low, high = -(-packing.resolution[0] // patch), packing.resolution[1] // patch
      rows, cols = (int(side) for side in rng.integers(low, high + 1, size=2))
    elif rng is None and packing.eval_size is not None:
      rows = cols = packing.eval_size // patch
    else:
      rows, cols = (max(1, round(side / patch)) for side in shape[:2])
    return fit_grid(rows, cols, packing.token_budget)

  def _image_tokens(self, image: np.ndarray, rng: np.random.Generator | None):
    """One decoded image -> (patches, coords, (rows, cols)), normalized; `rng`: training."""
    config, patch = self._input, self.packing.patch_size
    image = preprocess.to_channels(preprocess.to_uint8(image), config.channels)
    if rng is not None and config.random_crop_padding:
      padding = config.random_crop_padding
      padded = preprocess.pad(image[None], padding, config.pad_mode)
      top, left = rng.integers(0, 2 * padding + 1, size=2)
      image = padded[0, top:top + image.shape[0], left:left + image.shape[1]]
    rows, cols = self._grid(image.shape, rng)
    if image.shape[:2] != (rows * patch, cols * patch):
      pil = Image.fromarray(image[..., 0] if config.channels == 1 else image)
      pil = pil.resize((cols * patch, rows * patch), _PIL_RESAMPLE[config.interpolation])
      image = np.asarray(pil).reshape(rows * patch, cols * patch, config.channels)
    if rng is not None and config.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    image = preprocess.normalize(image.astype(np.float32) / 255.0, config.mean, config.std)
    patches, coords, _ = patchify(image, patch)
    if rng is not None:
      low, high = self.packing.drop_range
      rate = rng.uniform(low, high) if high > low else low
      keep = max(1, int(round(len(patches) * (1.0 - rate))))
      if keep < len(patches):
        kept = np.sort(rng.choice(len(patches), keep, replace=False))
        patches, coords = patches[kept], coords[kept]
    return patches, coords, (rows, cols)

  def _pack(self, examples: list, labels: np.ndarray, num_sequences: int,
            placements: list) -> Batch:
    """The batch of `examples` [(patches, coords, grid)] placed as `placements` say."""
    packing = self.packing
    image = pack_examples(examples, placements, length=packing.seq_len,
                          max_images=packing.max_images, num_sequences=num_sequences)
    packed_labels = np.zeros((num_sequences, packing.max_images), np.int32)
    for label, placement in zip(labels, placements):
      if placement is not None:
        packed_labels[placement] = label
    return {"image": image, "label": packed_labels, "mask": image["grid_sizes"][..., 0] > 0}

  def train_batch(self, step: int, batch_size: int, *, seed: int, process_index: int = 0,
                  process_count: int = 1) -> Batch:
    """This host's batch_size / process_count sequences of training step `step`."""
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by process_count "
                       f"{process_count}.")
    images_per_step = self.images_per_step(batch_size)
    per_host = images_per_step // process_count
    start = step * images_per_step + process_index * per_host
    positions = np.arange(start, start + per_host)
    indices = self._dataset._indices(positions, seed)  # pylint: disable=protected-access
    result = self._train_raw.read(indices)
    examples = [self._image_tokens(image, augment.stream_rng(_PACK_STREAM, seed, position))
                for image, position in zip(result.images, positions)]
    num_sequences = batch_size // process_count
    placements = first_fit([len(tokens) for tokens, _, _ in examples], self.packing.seq_len,
                           num_sequences, self.packing.max_images)
    batch = self._pack(examples, result.labels, num_sequences, placements)
    batch["_skipped"] = np.asarray([index for _, index in result.skipped], np.int64)
    return batch

  def train_iter(self, batch_size: int, *, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1):
    """Endless packed training batches from `start_step` on, as `Dataset.train_iter`."""
    batches = grain.MapDataset.range(start_step, np.iinfo(np.int64).max // (
        self.images_per_step(batch_size) + 1)).map(functools.partial(
            self.train_batch, batch_size=batch_size, seed=seed, process_index=process_index,
            process_count=process_count))
    return self._dataset.train_batches(batches)

  def _eval_source(self, split: str):
    if split == "eval":
      return self._eval_raw
    if split == "train":
      return self._train_raw
    raise ValueError(f"split must be 'eval' or 'train', not {split!r}.")

  def eval_iter(self, batch_size: int, *, process_index: int = 0, process_count: int = 1,
                split: str = "eval") -> Iterator[Batch]:
    """One pass over the split, each image once, packed in order into batch_size sequences.

    A batch takes images in order while they fit (first fit); the first that fits in
    none starts the next batch. Images at their own size (or `packing.eval_size`).
    """
    if process_count != 1:
      raise ValueError("Packed evaluation runs in one process: the batches of a host "
                       "depend on the sizes of its images, so hosts would disagree on "
                       "their number. Evaluate with one process.")
    del process_index
    source = self._eval_source(split)
    pending, labels, placements = [], [], []
    packer = SequencePacker(self.packing.seq_len, batch_size, self.packing.max_images)
    # Reads a few images at a time: sizes (and so batches) are known only once decoded.
    chunk = max(1, batch_size * self.packing.max_images)
    for start in range(0, len(source), chunk):
      result = source.read(np.arange(start, min(start + chunk, len(source))))
      for image, label in zip(result.images, result.labels):
        example = self._image_tokens(image, None)
        placement = packer.place(len(example[0]))
        if placement is None:  # The batch is full: it goes, and a new one starts.
          yield self._pack(pending, np.asarray(labels), batch_size, placements)
          pending, labels, placements = [], [], []
          packer = SequencePacker(self.packing.seq_len, batch_size, self.packing.max_images)
          placement = packer.place(len(example[0]))
        pending.append(example)
        labels.append(label)
        placements.append(placement)
    if pending:
      yield self._pack(pending, np.asarray(labels), batch_size, placements)
