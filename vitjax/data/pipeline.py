"""Deterministic, resumable input pipelines: `get_dataset(config)` -> `Dataset`.

The batch of training step `s` is a pure function of (seed, s): the examples
are positions [s * B, (s + 1) * B) of an endless stream in which epoch e is a
permutation of the split seeded by (seed, e), and the augmentation of that
batch is seeded by (seed, s). So resuming at step s needs no iterator state,
only s, and each host computes its slice of the global batch independently.

The pipeline never uses TensorFlow: images are numpy arrays from scikit-learn
(digits) or `tfds.data_source` (everything else), and grain runs the batch
function over steps, in parallel threads for datasets read from disk.
"""

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Protocol

import grain
import numpy as np

from vitjax.data import digits
from vitjax.data import preprocess
from vitjax.data import tfds as tfds_data

Batch = dict[str, np.ndarray]

# Distinct tags keep the shuffle and augmentation random streams independent
# even where an epoch number equals a step number.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def _rng(stream: int, seed: int, counter: int) -> np.random.Generator:
  # SeedSequence hashes the whole list, so nearby seeds and counters give
  # unrelated streams. It wants non-negative Python integers.
  return np.random.default_rng([stream, int(seed) % 2**64, int(counter)])


def _get(config: Any, key: str, default: Any = None) -> Any:
  """config[key] for dicts, config.key for ConfigDicts and the like."""
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return _rng(_SHUFFLE_STREAM, seed, epoch).permutation(num_examples)


def shuffled_indices(positions: np.ndarray, *, seed: int,
                     num_examples: int) -> np.ndarray:
  """Example indices at `positions` of the endless training stream.

  Positions [e * N, (e + 1) * N) form epoch e, a permutation of range(N)
  seeded by (seed, e): every example is seen exactly once per epoch, and a
  batch may straddle two epochs.
  """
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    permutation = _epoch_permutation(seed, int(epoch), num_examples)
    indices[in_epoch] = permutation[offsets[in_epoch]]
  return indices


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """The `config.input` keys the pipeline reads, with their defaults.

  Attributes:
    image_size: side of the output images; None keeps the dataset's own size
      (8 for digits, 28 for MNIST), which datasets of mixed sizes lack.
    random_crop_padding: train only: pad by this many pixels, then crop a
      random image_size window back out (random translation). 0 turns it off.
    pad_mode: "constant" (zeros, i.e. black) or "edge" padding for the crop.
    flip: train only: mirror left-right with probability 1/2.
    mean, std: per channel (or one value for all), applied to pixels in [0, 1].
      The defaults map [0, 1] to [-1, 1], as big_vision's ViTs expect.
    channels: 3 repeats grayscale to RGB so ImageNet-style models apply; 1
      keeps (or makes) images single-channel.
    image_key, label_key: TFDS feature names.
    num_threads: threads building batches ahead of the trainer; None picks 0
      for in-memory datasets and up to 8 for datasets read from disk.
  """
  image_size: int | None = None
  random_crop_padding: int = 0
  pad_mode: str = "constant"
  flip: bool = False
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.5,)
  channels: int = 3
  image_key: str = "image"
  label_key: str = "label"
  num_threads: int | None = None

  @classmethod
  def from_config(cls, input_config: Any) -> "InputConfig":
    """Reads `config.input`; missing keys (or a missing config) get defaults."""
    values = {field.name: _get(input_config, field.name, field.default)
              for field in dataclasses.fields(cls)}
    values["mean"] = tuple(np.atleast_1d(values["mean"]).tolist())
    values["std"] = tuple(np.atleast_1d(values["std"]).tolist())
    return cls(**values)

  def __post_init__(self):
    for key in ("mean", "std"):
      if len(getattr(self, key)) not in (1, self.channels):
        raise ValueError(f"input.{key} has {len(getattr(self, key))} values; "
                         f"give one, or one per channel ({self.channels}).")


class Source(Protocol):
  """One split with random access to examples."""

  def __len__(self) -> int:
    ...

  def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [n, H, W, C], labels int32 [n]) of examples `indices`."""


class ArraySource:
  """A split held in memory as arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


class _MappedSource:
  """A source whose images go through `function` as they are loaded."""

  def __init__(self, source: Source,
               function: Callable[[np.ndarray], np.ndarray]):
    self._source = source
    self._function = function

  def __len__(self) -> int:
    return len(self._source)

  def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = self._source.load(indices)
    return self._function(images), labels


class Dataset:
  """A train and an eval split behind deterministic batch iterators.

  Attributes:
    name: the dataset's name.
    num_classes: number of label classes.
    num_train, num_eval: examples in the train and eval splits.
    image_shape: (H, W, C) of the images in every batch.
  """

  def __init__(self, name: str, *, train_source: Source, eval_source: Source,
               num_classes: int, image_size: int, input_config: InputConfig,
               num_threads: int = 0):
    """Sources' images: float32 [image_size, image_size, C] in [0, 1]."""
    self.name = name
    self.num_classes = num_classes
    self.num_train = len(train_source)
    self.num_eval = len(eval_source)
    self.image_shape = (image_size, image_size, input_config.channels)
    self._input = input_config
    self._num_threads = num_threads
    # Channels, padding and normalization commute with picking examples, so
    # they are applied before augmentation; in-memory splits get them once
    # here, which leaves only a crop and a flip per training batch.
    self._train = self._prepared(train_source, input_config.random_crop_padding)
    self._train_unaugmented = self._prepared(train_source, padding=0)
    self._eval = self._prepared(eval_source, padding=0)

  def _prepared(self, source: Source, padding: int) -> Source:
    def prepare(images: np.ndarray) -> np.ndarray:
      images = preprocess.to_channels(images, self._input.channels)
      images = preprocess.pad(images, padding, self._input.pad_mode)
      return preprocess.normalize(images, self._input.mean, self._input.std)

    if isinstance(source, ArraySource):
      return ArraySource(prepare(source.images), source.labels)
    return _MappedSource(source, prepare)

  def __repr__(self) -> str:
    return (f"Dataset({self.name!r}, num_classes={self.num_classes}, "
            f"num_train={self.num_train}, num_eval={self.num_eval}, "
            f"image_shape={self.image_shape})")

  @staticmethod
  def _host_positions(step: int, batch_size: int, process_index: int,
                      process_count: int) -> tuple[np.ndarray, slice]:
    """Stream positions of this host's slice of global batch `step`."""
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by "
                       f"process_count {process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in "
                       f"[0, {process_count}).")
    local_batch_size = batch_size // process_count
    start = process_index * local_batch_size
    positions = step * batch_size + start + np.arange(local_batch_size)
    return positions, slice(start, start + local_batch_size)

  def train_batch(self, step: int, batch_size: int, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> Batch:
    """This host's slice of the global training batch number `step`."""
    positions, host_slice = self._host_positions(
        step, batch_size, process_index, process_count)
    indices = shuffled_indices(positions, seed=seed,
                               num_examples=self.num_train)
    images, labels = self._train.load(indices)

    padding = self._input.random_crop_padding
    if padding or self._input.flip:
      # Drawn for the whole global batch, then sliced: an example gets the
      # same augmentation however many hosts share the batch.
      rng = _rng(_AUGMENT_STREAM, seed, step)
      offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
      flips = rng.random(batch_size) < 0.5
      if padding:
        images = preprocess.crop(images, offsets[host_slice],
                                 self.image_shape[0])
      if self._input.flip:
        images = preprocess.flip(images, flips[host_slice])
    return {"image": images, "label": labels}

  def _split_source(self, split: str) -> tuple[Source, int]:
    if split == "eval":
      return self._eval, self.num_eval
    if split == "train":
      return self._train_unaugmented, self.num_train
    raise ValueError(f"split must be 'eval' or 'train', not {split!r}.")

  def eval_batch(self, step: int, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, split: str = "eval") -> Batch:
    """This host's slice of eval batch `step`; `mask` is False on padding."""
    source, num_examples = self._split_source(split)
    positions, _ = self._host_positions(
        step, batch_size, process_index, process_count)
    mask = positions < num_examples
    valid_images, labels = source.load(positions[mask])
    num_valid = len(labels)
    # Padding is zeros; the mask keeps it out of every metric.
    images = np.zeros((len(positions), *self.image_shape), np.float32)
    images[:num_valid] = valid_images
    padded_labels = np.zeros(len(positions), np.int32)
    padded_labels[:num_valid] = labels
    return {"image": images, "label": padded_labels, "mask": mask}

  def num_eval_steps(self, batch_size: int, split: str = "eval") -> int:
    """Batches in one pass over the eval (or train) split (the last one padded)."""
    return math.ceil(self._split_source(split)[1] / batch_size)

  def _iterate(self, batch_fn: Callable[[int], Batch], start: int,
               stop: int) -> Iterator[Batch]:
    steps = grain.MapDataset.range(start, stop).map(batch_fn)
    # Each element is a whole batch, so a thread builds one batch at a time
    # and the buffer holds finished batches. Order is kept either way.
    read_options = grain.ReadOptions(
        num_threads=self._num_threads,
        prefetch_buffer_size=max(1, self._num_threads))
    return iter(steps.to_iter_dataset(read_options))

  def train_iter(self, batch_size: int, *, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[Batch]:
    """Endless training batches from `start_step` on.

    Yields dicts {'image': float32 [b, H, W, C], 'label': int32 [b]} where
    b = batch_size // process_count is this host's slice of the global batch.
    Starting at step s yields exactly what the s-th batch onwards of a run
    from step 0 yields.
    """
    self._host_positions(0, batch_size, process_index, process_count)  # Checks.
    batch_fn = functools.partial(
        self.train_batch, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count)
    return self._iterate(batch_fn, start_step, sys.maxsize)

  def eval_iter(self, batch_size: int, *, process_index: int = 0,
                process_count: int = 1, split: str = "eval") -> Iterator[Batch]:
    """One ordered pass over the eval split, without augmentation.

    Yields dicts {'image', 'label', 'mask': bool [b]}; the last batch is padded
    to full size with mask False, so that summing masked metrics counts every
    example exactly once. All hosts yield the same number of batches.
    `split='train'` makes the same pass over the training split, unaugmented
    and in order (for few-shot and linear-probe evaluators).
    """
    self._host_positions(0, batch_size, process_index, process_count)  # Checks.
    batch_fn = functools.partial(
        self.eval_batch, batch_size=batch_size,
        process_index=process_index, process_count=process_count, split=split)
    return self._iterate(batch_fn, 0, self.num_eval_steps(batch_size, split))


def _digits_dataset(config: Any, input_config: InputConfig) -> Dataset:
  image_size = input_config.image_size or digits.IMAGE_SHAPE[0]

  def source(split: str) -> ArraySource:
    images, labels = digits.load_digits(split)
    # Resized once here rather than per batch: the whole split is ~20 MB.
    return ArraySource(preprocess.resize(images, image_size), labels)

  return Dataset(
      "digits",
      train_source=source(_get(config, "train_split") or "train"),
      eval_source=source(_get(config, "eval_split") or "test"),
      num_classes=digits.NUM_CLASSES, image_size=image_size,
      input_config=input_config, num_threads=input_config.num_threads or 0)


def _tfds_dataset(name: str, config: Any, input_config: InputConfig) -> Dataset:
  data_dir = _get(config, "data_dir")
  keys = dict(image_key=input_config.image_key,
              label_key=input_config.label_key)
  train = tfds_data.TfdsSplit(
      name, _get(config, "train_split") or "train", data_dir=data_dir,
      image_size=input_config.image_size, **keys)
  eval_split = tfds_data.TfdsSplit(
      name, _get(config, "eval_split") or "test", data_dir=data_dir,
      image_size=train.image_size, **keys)
  num_threads = input_config.num_threads
  if num_threads is None:
    num_threads = min(8, os.cpu_count() or 1)
  return Dataset(
      name, train_source=train, eval_source=eval_split,
      num_classes=train.num_classes,
      image_size=train.image_size, input_config=input_config,
      num_threads=num_threads)


def get_dataset(config: Any) -> Dataset:
  """The dataset that `config` names, with its input pipeline.

  Reads config.dataset ('digits', the default, or a TFDS name such as 'mnist',
  'cifar10', 'imagenet2012'), config.data_dir, config.train_split,
  config.eval_split and config.input (see `InputConfig`).
  """
  name = _get(config, "dataset") or "digits"
  input_config = InputConfig.from_config(_get(config, "input"))
  if name == "digits":
    return _digits_dataset(config, input_config)
  return _tfds_dataset(name, config, input_config)
