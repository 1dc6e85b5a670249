"""Deterministic, resumable input pipelines: `get_dataset(config)` -> `Dataset`.

The batch of training step `s` is a pure function of (seed, s): the examples
are positions [s * B, (s + 1) * B) of an endless stream in which epoch e is a
permutation of the split seeded by (seed, e), and the augmentation of that
batch is seeded by (seed, s). So resuming at step s needs no iterator state,
only s, and each host computes its slice of the global batch independently.

The pipeline never uses TensorFlow: images are numpy arrays from scikit-learn
(digits), `tfds.data_source` (TFDS names), image folders (`folder:PATH`) or
WebDataset shards (`wds:PATTERN`), and grain runs the batch function over steps,
in threads (input.num_threads) and optionally worker processes (input.num_workers).

Training augmentation, in timm's order (see `vitjax.data.augment`):
  per example, uint8:   Inception crop (or resize), flip, RandAugment
  per example, float:   normalize, random erasing
  per batch:            Mixup / CutMix (labels become soft targets [B, C])
Per-example randomness is seeded by (seed, stream position) and per-batch
randomness by (seed, step), so a host's slice of a batch is augmented exactly
as in the whole batch. Without Inception crop or RandAugment the cheaper
float path (pad and crop, flip) of the quickstart runs instead.

On the per-example path, grain maps examples and then batches them, and with
input.device_preprocess (the default) the host stops at uint8: normalization,
erasing and mixing run on the device in the jitted step (`vitjax.data.device`),
from parameters drawn here.

With input.multicrop (`vitjax.data.multicrop`), training examples become global
and local crops (and masks) for self-supervised training, finished on the host;
evaluation batches are as without it.
"""

import dataclasses
import functools
import math
import numbers
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Protocol

import grain
from absl import flags
import numpy as np
from PIL import Image

from vitjax.data import augment
from vitjax.data import device
from vitjax.data import digits
from vitjax.data import folder as folder_data
from vitjax.data import multicrop as multicrop_lib
from vitjax.data import packing as packing_lib
from vitjax.data import preprocess
from vitjax.data import sources
from vitjax.data import webdataset

Batch = dict[str, np.ndarray]

# Distinct tags keep the shuffle and augmentation random streams independent
# even where an epoch number equals a step number.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_EXAMPLE_STREAM = 2  # Inception crop, flip, RandAugment: per stream position.
_ERASE_STREAM = 3  # Random erasing: per stream position.
_MIX_STREAM = 4  # Mixup / CutMix: per step.
# 5: packing's (vitjax.data.packing).
_MULTICROP_STREAM = 6  # Multi-crop's crops: per stream position.
_MASK_STREAM = 7  # Multi-crop's masks: per stream position.
_PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _get(config: Any, key: str, default: Any = None) -> Any:
  """config[key] for dicts, config.key for ConfigDicts and the like."""
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return augment.stream_rng(_SHUFFLE_STREAM, seed, epoch).permutation(num_examples)


def shuffled_indices(positions: np.ndarray, *, seed: int, num_examples: int,
                     repeats: int = 1) -> np.ndarray:
  """Example indices at `positions` of the endless training stream.

  Positions [e * N, (e + 1) * N) form epoch e, a permutation of range(N)
  seeded by (seed, e): every example is seen exactly once per epoch, and a
  batch may straddle two epochs.

  With `repeats` r > 1 (DeiT's repeated augmentation), epoch e holds the first
  N / r examples of its permutation, each r times in a row: the copies land in
  one global batch and are augmented apart (augmentation is seeded by
  position), as DeiT's RASampler spreads them over the GPUs of one step.
  """
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    permutation = _epoch_permutation(seed, int(epoch), num_examples)
    indices[in_epoch] = permutation[offsets[in_epoch] // repeats]
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
    num_threads: threads building batches ahead of the trainer (in each worker
      process, with num_workers); None picks 0 for in-memory datasets and up
      to 8 for datasets read from disk.
    num_workers: training: grain worker processes (mp_prefetch) that build
      whole batches, each with num_threads threads; 0 builds them in this
      process. Processes sidestep the GIL that Python's glue between decodes
      holds; they cost a start-up of a few seconds and memory per worker.
    repeated_augmentation: training: each example appears this many times in
      a row in the stream, differently augmented (DeiT's repeated
      augmentation: 3); an epoch keeps its length, so it covers 1 / r of the
      examples. 1 turns it off.
    device_preprocess: per-example path: the host hands over uint8 images and
      the jitted train step normalizes, erases and mixes them
      (`vitjax.data.device`); False does all of it on the host (float32).
    inception_crop: train only: RandomResizedCrop of the decoded image to
      image_size, area fraction in `inception_crop_scale`, aspect ratio in
      `inception_crop_ratio` (timm/torchvision semantics, with the fallback).
    randaugment_ops: train only: RandAugment with this many ops (timm's N;
      0 turns it off) at `randaugment_magnitude` (M, of 10) with std
      `randaugment_magnitude_std` (timm's mstd); `randaugment_increasing` is
      timm's '-inc1'. 'rand-m9-mstd0.5-inc1' is ops=2, magnitude=9, std=0.5,
      increasing=True.
    mixup_alpha, cutmix_alpha: train only: Beta(alpha, alpha) of Mixup and
      CutMix (0 turns each off); with both set, CutMix is picked with
      `mixup_switch_prob`; a batch is mixed with `mixup_prob`. Labels become
      soft targets [B, C].
    random_erasing_prob: train only: timm's RandomErasing probability (reprob),
      after normalization; `random_erasing_mode` 'pixel', 'rand' or 'const'.
    crop_pct: eval: resize the shorter side to image_size / crop_pct, then
      centre-crop image_size (timm's eval transform; 1 resizes only).
    interpolation: 'bilinear' or 'bicubic', for every resize.
    preprocess_from_model: take mean, std, crop_pct and interpolation from the
      model registry's entry of the pretrained weights: 'model' (or True)
      reads config.model.name, another string names the entry
      ('vit_base_patch16_224'); '' (or False) keeps the input keys.
    skip_bad_images: replace undecodable records by the next readable one and
      count them (`Dataset.bad_images_skipped`) instead of raising.
    packing: NaViT's packed sequences (a dict of `vitjax.data.packing.PackingConfig`
      keys): images at their own (or a drawn) resolution and aspect ratio, packed
      several per sequence of `seq_len` tokens; batch_size counts sequences.
      None (the default): fixed-size images.
    multicrop: training: self-supervised multi-crop input (a dict of
      `vitjax.data.multicrop.MulticropConfig` keys; {} takes DINO's defaults):
      batches of `global_crops`, `local_crops` and `label` (and masks), normalized
      on the host, in place of `image`; its crops have their own flip. None (the
      default): off. It replaces the other training augmentations, and
      device_preprocess does not apply.
    classes: keep only the images of these labels (the dataset's own label ids),
      in every split (train, eval, and the unaugmented train pass of few-shot and
      probe evaluators), relabelled 0..K-1 in the order given: (5, 6, 7, 8, 9)
      makes the digits 5-9 labels 0-4 and `Dataset.num_classes` 5. None (the
      default): every label. Digits, image folders and labelled WebDataset shards;
      not TFDS datasets, whose labels cannot be listed without reading every record.
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
  num_workers: int = 0
  repeated_augmentation: int = 1
  device_preprocess: bool = True
  inception_crop: bool = False
  inception_crop_scale: Sequence[float] = (0.08, 1.0)
  inception_crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
  randaugment_ops: int = 0
  randaugment_magnitude: float = 9.0
  randaugment_magnitude_std: float = 0.5
  randaugment_increasing: bool = False
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mixup_prob: float = 1.0
  mixup_switch_prob: float = 0.5
  random_erasing_prob: float = 0.0
  random_erasing_mode: str = "pixel"
  crop_pct: float = 1.0
  interpolation: str = "bilinear"
  preprocess_from_model: bool | str = ""
  skip_bad_images: bool = False
  packing: Any = None
  multicrop: Any = None
  classes: Sequence[int] | None = None

  @classmethod
  def from_config(cls, input_config: Any) -> "InputConfig":
    """Reads `config.input`; missing keys (or a missing config) get defaults."""
    values = {}
    for field in dataclasses.fields(cls):
      value = _get(input_config, field.name)
      # A key the config sets to None means "the default", like a missing one.
      values[field.name] = field.default if value is None else value
    values["mean"] = tuple(np.atleast_1d(values["mean"]).tolist())
    values["std"] = tuple(np.atleast_1d(values["std"]).tolist())
    classes = values["classes"]
    if isinstance(classes, np.ndarray):
      classes = classes.tolist()
    if isinstance(classes, (list, tuple)):  # NumPy integers become ints.
      values["classes"] = tuple(c.item() if isinstance(c, np.generic) else c for c in classes)
    return cls(**values)

  def __post_init__(self):
    for key in ("mean", "std"):
      if len(getattr(self, key)) not in (1, self.channels):
        raise ValueError(f"input.{key} has {len(getattr(self, key))} values; "
                         f"give one, or one per channel ({self.channels}).")
    if self.interpolation not in _PIL_RESAMPLE:
      raise ValueError(f"input.interpolation must be one of "
                       f"{sorted(_PIL_RESAMPLE)}, not {self.interpolation!r}.")
    if self.inception_crop and self.random_crop_padding:
      raise ValueError("input.inception_crop and input.random_crop_padding "
                       "are two random crops; set random_crop_padding=0.")
    if not 0 < self.crop_pct <= 1:
      raise ValueError(f"input.crop_pct must be in (0, 1], not {self.crop_pct}.")
    if self.num_workers < 0 or (self.num_threads is not None and self.num_threads < 0):
      raise ValueError(f"input.num_workers and input.num_threads must be >= 0, not "
                       f"{self.num_workers} and {self.num_threads}.")
    if self.repeated_augmentation < 1:
      raise ValueError(f"input.repeated_augmentation must be >= 1 (1 turns it off), "
                       f"not {self.repeated_augmentation}.")
    if self.has_multicrop:
      self._check_multicrop()
    if self.classes is not None:
      check_class_ids(self.classes)

  @property
  def has_multicrop(self) -> bool:
    return self.multicrop is not None and self.multicrop is not False

  def _check_multicrop(self):
    """input.multicrop's keys and values, and no other training augmentation with it."""
    others = (("mixup_alpha", self.mixup_alpha > 0, "0"),
              ("cutmix_alpha", self.cutmix_alpha > 0, "0"),
              ("randaugment_ops", self.randaugment_ops > 0, "0"),
              ("random_erasing_prob", self.random_erasing_prob > 0, "0"),
              ("packing", bool(self.packing), "None"),
              ("repeated_augmentation", self.repeated_augmentation > 1, "1"),
              ("inception_crop", self.inception_crop, "False"),
              ("random_crop_padding", self.random_crop_padding > 0, "0"))
    for key, is_set, off in others:
      if is_set:
        value = "" if key == "packing" else f"={getattr(self, key)!r}"
        raise ValueError(
            f"input.multicrop and input.{key}{value} do not combine: "
            f"multi-crop makes its own crops and augmentations. Set input.{key}={off}, "
            f"or input.multicrop=None.")
    multicrop_lib.MulticropConfig.from_config(self.multicrop, image_size=self.image_size)

  @property
  def augments_per_example(self) -> bool:
    """Whether training images take the per-example uint8 path (PIL)."""
    return self.inception_crop or self.randaugment_ops > 0 or self.has_multicrop

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class ClassesError(ValueError):
  """input.classes that the dataset cannot keep: labels it lacks, or a TFDS dataset."""


_CLASSES_FIX = ("Give distinct label ids of the dataset, e.g. "
                "--config.input.classes='(5,6,7,8,9)', or None for every label.")


def check_class_ids(class_ids: Any):
  """input.classes' form: a non-empty sequence of distinct integer label ids >= 0."""
  problem = None
  if isinstance(class_ids, (str, bytes)) or not isinstance(class_ids, Sequence):
    problem = "is not a sequence of label ids"
  elif not class_ids:
    problem = "is empty: it would keep no image"
  elif not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in class_ids):
    others = [c for c in class_ids if not isinstance(c, numbers.Integral) or isinstance(c, bool)]
    problem = f"holds {', '.join(map(repr, others))}: label ids are integers"
  elif min(class_ids) < 0:
    problem = f"holds {', '.join(str(c) for c in class_ids if c < 0)}: label ids are >= 0"
  elif len(set(class_ids)) < len(class_ids):
    repeated = sorted({c for c in class_ids if list(class_ids).count(c) > 1})
    problem = f"repeats {', '.join(map(str, repeated))}: each label can be kept once"
  if problem:
    raise ValueError(f"input.classes={class_ids!r} {problem}. {_CLASSES_FIX}")


def class_subset(labels: np.ndarray, class_ids: Sequence[int], num_classes: int, *,
                 dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """input.classes over one split: (indices of the examples kept, their new labels).

  The examples whose label is in `class_ids`, in their order in the split; label
  class_ids[k] becomes k. `num_classes` is the dataset's: ids beyond it are errors.
  """
  check_class_ids(class_ids)
  missing = [c for c in class_ids if c >= num_classes]
  if missing:
    raise ClassesError(
        f"input.classes={tuple(class_ids)!r}: dataset {dataset!r} has labels 0..{num_classes - 1}, "
        f"not {', '.join(map(str, missing))}. {_CLASSES_FIX}")
  labels = np.asarray(labels, np.int64)
  table = np.full(max(num_classes, int(labels.max(initial=-1)) + 1), -1, np.int64)
  table[list(class_ids)] = np.arange(len(class_ids))
  new_labels = table[labels]
  kept = np.flatnonzero(new_labels >= 0)
  if not len(kept):
    raise ClassesError(
        f"input.classes={tuple(class_ids)!r}: split {split!r} of dataset {dataset!r} holds no "
        "image of these labels. Keep labels the split has, or take a larger split.")
  return kept, new_labels[kept].astype(np.int32)


def refuse_tfds_classes(name: str, class_ids: Sequence[int] | None):
  """TFDS datasets do not take input.classes: their labels are in the records."""
  if class_ids is not None:
    raise ClassesError(
        f"input.classes={tuple(class_ids)!r}: TFDS dataset {name!r} cannot keep a subset of "
        "its labels (they are not listed without reading every record). input.classes "
        "works on the digits, image folders (folder:PATH) and labelled WebDataset shards "
        "(wds:PATTERN); for a TFDS dataset set --config.input.classes=None.")


def _record_subset(source: sources.RecordSource, class_ids: Sequence[int], num_classes: int,
                   name: str) -> sources.ClassSubset:
  """input.classes over a split read from disk: an index filter over its listed labels."""
  labels = getattr(source, "labels", None)
  if labels is None or not getattr(source, "has_labels", True):
    raise ClassesError(
        f"input.classes={tuple(class_ids)!r}: split {source.split!r} of {name!r} has no "
        "label for every record (WebDataset shards need a .cls file per sample). Set "
        "--config.input.classes=None.")
  kept, new_labels = class_subset(labels, class_ids, num_classes, dataset=name,
                                  split=source.split)
  return sources.ClassSubset(source, class_ids, kept, new_labels)


def _to_pil(image: np.ndarray) -> Image.Image:
  """uint8 [H, W, 1 or 3] -> a PIL image ('L' or 'RGB')."""
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


class Source(Protocol):
  """One split with random access to examples (`sources.RecordSource` for files)."""

  def __len__(self) -> int:
    ...

  def load_tracked(self, indices: np.ndarray) -> sources.ReadResult:
    """Images float32 [n, H, W, C] and labels int32 [n] of examples `indices`."""

  def read(self, indices: np.ndarray) -> sources.ReadResult:
    """Images as stored ([H_i, W_i, C]) and labels, for per-example augmentation."""


class ArraySource:
  """A split held in memory as arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def load_tracked(self, indices: np.ndarray) -> sources.ReadResult:
    return sources.ReadResult(self.images[indices], self.labels[indices], [], indices)

  def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def read(self, indices: np.ndarray) -> sources.ReadResult:
    """uint8 [H, W, C] images (from [0, 1] floats) for the per-example path."""
    return sources.ReadResult(list(preprocess.to_uint8(self.images[indices])),
                              self.labels[indices], [], indices)


class _MappedSource:
  """A source whose images go through `function` as they are loaded."""

  def __init__(self, source: Source,
               function: Callable[[np.ndarray], np.ndarray]):
    self._source = source
    self._function = function

  def __len__(self) -> int:
    return len(self._source)

  def __getattr__(self, name: str):
    if name.startswith("_"):  # Not found on this object (also while unpickling).
      raise AttributeError(name)
    return getattr(self._source, name)  # captions, split, bad_indices, ...

  def load_tracked(self, indices: np.ndarray) -> sources.ReadResult:
    result = self._source.load_tracked(indices)
    return dataclasses.replace(result, images=self._function(result.images))

  def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    result = self.load_tracked(indices)
    return result.images, result.labels


class Batches:
  """The batches of `Dataset.train_iter`: an iterator to `close()` when done with it.

  Closing ends grain's worker processes (input.num_workers) now rather than at
  interpreter exit, where their clean-up fails noisily.
  """

  def __init__(self, iterator: Iterator[Batch], on_batch: Callable[[Batch], Batch]):
    self._iterator = iterator
    self._on_batch = on_batch

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> Batch:
    return self._on_batch(next(self._iterator))

  def close(self):
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


class Dataset:
  """A train and an eval split behind deterministic batch iterators.

  Attributes:
    name: the dataset's name.
    num_classes: number of label classes.
    classes: class names where the data has them (image folders), else None.
    class_ids: with input.classes, the dataset's own label of each label
      0..num_classes-1 (input.classes itself); else None.
    num_train, num_eval: examples in the train and eval splits.
    image_shape: (H, W, C) of the images in every batch.
    bad_images_skipped: undecodable records skipped so far (input.skip_bad_images),
      each counted once, whichever thread or worker process read it; samples
      of truncated WebDataset shards count too.
    with_captions: batches also carry `caption` (strings) from sources that
      have captions (WebDataset); the contrastive task sets it.
    device_fn: what the jitted step applies to a training batch first (uint8
      images -> normalized, erased, mixed), or None when the host did it all.
    multicrop: input.multicrop as a `vitjax.data.multicrop.MulticropConfig`, its
      global_size filled in (input.image_size by default), or None: training
      batches are then {'global_crops', 'local_crops', 'label'} and the masks.
    num_context_tokens, num_target_tokens: with multicrop.masks='ijepa', Kc and
      Kt, the fixed sizes of `context_index` [b, Kc] and `target_index`
      [b, M, Kt] (`vitjax.data.multicrop.ijepa_token_counts`); else None.
  """

  def __init__(self, name: str, *, train_source: Source, eval_source: Source,
               num_classes: int, image_size: int, input_config: InputConfig,
               num_threads: int = 0, train_eval_source: Source | None = None,
               classes: Sequence[str] | None = None,
               class_ids: Sequence[int] | None = None):
    """Sources' images: float32 [image_size, image_size, C] in [0, 1].

    `train_eval_source` is the train split with the eval preprocessing (for
    the unaugmented pass over it); by default `train_source`.
    """
    self.name = name
    self.num_classes = num_classes
    self.classes = list(classes) if classes is not None else None
    self.class_ids = tuple(class_ids) if class_ids is not None else None
    self.num_train = len(train_source)
    self.num_eval = len(eval_source)
    self.image_shape = (image_size, image_size, input_config.channels)
    self.with_captions = False
    self._input = input_config
    self._num_threads = num_threads
    self._sources = [train_source, eval_source, train_eval_source]
    self._skipped_in_batches = set()  # (split, index) reported by batches.
    # Channels, padding and normalization commute with picking examples, so
    # they are applied before augmentation; in-memory splits get them once
    # here, which leaves only a crop and a flip per training batch.
    self._train_raw = train_source
    self._train = self._prepared(train_source, input_config.random_crop_padding)
    self._train_unaugmented = self._prepared(train_eval_source or train_source,
                                             padding=0)
    self._eval = self._prepared(eval_source, padding=0)
    mean = np.broadcast_to(input_config.mean, (input_config.channels,))
    # RandAugment fills uncovered corners with the mean colour, as timm does.
    self._fill = tuple(int(round(255 * value)) for value in mean)
    self.multicrop = None
    self.num_context_tokens = self.num_target_tokens = None
    if input_config.has_multicrop:
      self.multicrop = multicrop_lib.MulticropConfig.from_config(
          input_config.multicrop, image_size=image_size)
      if self.multicrop.masks == "ijepa":
        self.num_context_tokens, self.num_target_tokens = (
            multicrop_lib.ijepa_token_counts(self.multicrop))

  @property
  def bad_images_skipped(self) -> int:
    bad = set(self._skipped_in_batches)
    for source in self._sources:
      split = getattr(source, "split", None)
      bad.update((split, index) for index in getattr(source, "bad_indices", ()))
      bad.update((split, "cut", i) for i in range(getattr(source, "num_cut", 0)))
    return len(bad)

  @property
  def has_captions(self) -> bool:
    """Whether every training example has a caption (WebDataset `.txt` / `.json`)."""
    return bool(getattr(self._train_raw, "has_captions", False))

  @property
  def device_fn(self) -> Callable[[Batch], Batch] | None:
    config = self._input
    if not (config.augments_per_example and config.device_preprocess) or self.multicrop:
      return None
    return functools.partial(device.finish_batch, mean=config.mean, std=config.std,
                             num_classes=self.num_classes,
                             erase_mode=config.random_erasing_mode)

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

  def _indices(self, positions: np.ndarray, seed: int) -> np.ndarray:
    return shuffled_indices(positions, seed=seed, num_examples=self.num_train,
                            repeats=self._input.repeated_augmentation)

  def _captions(self, source: Source, read: np.ndarray) -> dict:
    if not self.with_captions:
      return {}
    if not hasattr(source, "captions"):
      raise ValueError(f"Dataset {self.name!r} has no captions (WebDataset shards with "
                       ".txt or .json files have them).")
    return {"caption": np.asarray(source.captions(read), dtype=object)}

  def _record_skipped(self, batch: Batch) -> Batch:
    """Moves a batch's `_skipped` (records it replaced) into bad_images_skipped."""
    split = getattr(self._train_raw, "split", None)
    self._skipped_in_batches.update((split, int(i)) for i in batch.pop("_skipped"))
    return batch

  # The per-example path: grain maps `_train_example` over stream positions,
  # batches, then `_finish_train_batch` mixes.

  def _augment_example(self, image: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, C] of any size -> augmented uint8 [S, S, channels]."""
    config = self._input
    size = self.image_shape[0]
    image = preprocess.to_channels(image, config.channels)
    image = preprocess.to_uint8(image)  # RGB -> gray gives floats.
    height, width = image.shape[:2]
    pil = _to_pil(image)
    if config.inception_crop:
      top, left, crop_height, crop_width = augment.inception_crop_box(
          rng, height, width, config.inception_crop_scale,
          config.inception_crop_ratio)
    else:  # The largest centred square, as the unaugmented images.
      crop_height = crop_width = min(height, width)
      top, left = (height - crop_height) // 2, (width - crop_width) // 2
    pil = pil.resize((size, size), _PIL_RESAMPLE[config.interpolation],
                     box=(left, top, left + crop_width, top + crop_height))
    padding = config.random_crop_padding
    if padding:  # In pixel space here: pad_mode 'constant' pads black.
      padded = preprocess.pad(
          np.asarray(pil).reshape(1, size, size, config.channels), padding,
          config.pad_mode)
      offsets = rng.integers(0, 2 * padding + 1, size=(1, 2))
      pil = _to_pil(preprocess.crop(padded, offsets, size)[0])
    if config.flip and rng.random() < 0.5:
      pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if config.randaugment_ops:
      pil = augment.rand_augment(
          rng, pil, num_ops=config.randaugment_ops,
          magnitude=config.randaugment_magnitude,
          magnitude_std=config.randaugment_magnitude_std,
          increasing=config.randaugment_increasing, fill=self._fill)
    return np.asarray(pil).reshape(size, size, config.channels)

  def _multicrop_example(self, position: int, *, seed: int) -> dict:
    """Training example at stream `position` as multi-crop views (and masks)."""
    config = self._input
    index = self._indices(np.asarray([position]), seed)
    result = self._train_raw.read(index)
    image = preprocess.to_channels(preprocess.to_uint8(result.images[0]), config.channels)
    image = preprocess.to_uint8(image)  # RGB -> gray gives floats.
    example = multicrop_lib.crops(
        augment.stream_rng(_MULTICROP_STREAM, seed, position), image, self.multicrop,
        mean=config.mean, std=config.std, resample=_PIL_RESAMPLE[config.interpolation])
    example.update(multicrop_lib.masks(
        augment.stream_rng(_MASK_STREAM, seed, position), self.multicrop,
        context_tokens=self.num_context_tokens, target_tokens=self.num_target_tokens))
    example.update({
        "label": result.labels[0], "_position": np.int64(position),
        "_skip_from": np.int64(index[0]), "_skip_count": np.int64(len(result.skipped)),
        **{k: v[0] for k, v in self._captions(self._train_raw, result.indices).items()}})
    return example

  def _train_example(self, position: int, *, seed: int) -> dict:
    """Training example at stream `position`, augmented (the per-example path)."""
    if self.multicrop is not None:
      return self._multicrop_example(position, seed=seed)
    config = self._input
    index = self._indices(np.asarray([position]), seed)
    result = self._train_raw.read(index)
    image = self._augment_example(preprocess.to_uint8(result.images[0]),
                                  augment.stream_rng(_EXAMPLE_STREAM, seed, position))
    example = {"label": result.labels[0], "_position": np.int64(position),
               "_skip_from": np.int64(index[0]), "_skip_count": np.int64(len(result.skipped)),
               **{k: v[0] for k, v in self._captions(self._train_raw, result.indices).items()}}
    erase_rng = augment.stream_rng(_ERASE_STREAM, seed, position)
    if config.device_preprocess:
      example["image"] = image
      if config.random_erasing_prob:
        box = augment.erase_box(erase_rng, *image.shape[:2],
                                probability=config.random_erasing_prob)
        example["_erase_box"] = np.asarray(box or (0, 0, 0, 0), np.int32)
        example["_erase_seed"] = np.uint32(erase_rng.integers(2**32))
      return example
    # (x / 255 - mean) / std in one pass.
    image = preprocess.normalize(image[None].astype(np.float32),
                                 255 * np.asarray(config.mean),
                                 255 * np.asarray(config.std))[0]
    if config.random_erasing_prob:
      image = augment.random_erase(erase_rng, image, probability=config.random_erasing_prob,
                                   mode=config.random_erasing_mode)
    example["image"] = image
    return example

  def _finish_train_batch(self, batch: Batch, *, seed: int, batch_size: int) -> Batch:
    """Stacked `_train_example`s -> the batch: skipped records listed, mixed."""
    batch = dict(batch)
    step = int(batch.pop("_position")[0]) // batch_size
    skip_from, skip_count = batch.pop("_skip_from"), batch.pop("_skip_count")
    batch["_skipped"] = np.asarray(
        [(first + offset) % self.num_train
         for first, count in zip(skip_from, skip_count) for offset in range(count)], np.int64)
    if self._input.mixes:
      lam, box = self._mix_parameters(step, seed)
      if self._input.device_preprocess:
        count = len(batch["label"])
        batch["_mix_lam"] = np.full(count, lam, np.float32)
        batch["_mix_box"] = np.tile(np.asarray(box or (0, 0, 0, 0), np.int32), (count, 1))
      else:
        batch["image"], batch["label"] = augment.mix_batch(
            batch["image"], batch["label"], self.num_classes, lam=lam, box=box)
    return batch

  def _train_example_at(self, k: int, *, seed: int, batch_size: int, local_batch_size: int,
                        host_start: int) -> dict:
    """`_train_example` of this host's k-th example of the stream."""
    step, offset = divmod(k, local_batch_size)
    return self._train_example(step * batch_size + host_start + offset, seed=seed)

  # The batch path (no per-example augmentation): whole batches, vectorized.

  def _train_batch_tracked(self, step: int, batch_size: int, *, seed: int,
                           process_index: int = 0, process_count: int = 1) -> Batch:
    positions, host_slice = self._host_positions(
        step, batch_size, process_index, process_count)
    if self._input.augments_per_example:
      examples = [self._train_example(int(p), seed=seed) for p in positions]
      stacked = {key: np.stack([example[key] for example in examples])
                 for key in examples[0]}
      return self._finish_train_batch(stacked, seed=seed, batch_size=batch_size)
    result = self._train.load_tracked(self._indices(positions, seed))
    images = self._crop_and_flip(result.images, step, batch_size, seed, host_slice)
    batch = self._erase_and_mix(images, result.labels, step, positions, seed)
    batch.update(self._captions(self._train_raw, result.indices))
    batch["_skipped"] = np.asarray([index for _, index in result.skipped], np.int64)
    return batch

  def train_batch(self, step: int, batch_size: int, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> Batch:
    """This host's slice of the global training batch number `step`."""
    return self._record_skipped(self._train_batch_tracked(
        step, batch_size, seed=seed, process_index=process_index,
        process_count=process_count))

  def _mix_parameters(self, step: int, seed: int) -> tuple[float, tuple | None]:
    """(lambda, CutMix box or None) of global batch `step`.

    One draw per global batch: every host mixes its slice alike.
    """
    config = self._input
    rng = augment.stream_rng(_MIX_STREAM, seed, step)
    lam, use_cutmix = augment.mixup_parameters(
        rng, mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
        probability=config.mixup_prob, switch_probability=config.mixup_switch_prob)
    box = None
    if use_cutmix:
      box, lam = augment.cutmix_box(rng, lam, *self.image_shape[:2])
    return lam, box

  def _erase_and_mix(self, images: np.ndarray, labels: np.ndarray, step: int,
                     positions: np.ndarray, seed: int) -> Batch:
    """Random erasing per example, then Mixup / CutMix over the batch."""
    config = self._input
    if config.random_erasing_prob:
      images = np.stack([
          augment.random_erase(augment.stream_rng(_ERASE_STREAM, seed, position), image,
                               probability=config.random_erasing_prob,
                               mode=config.random_erasing_mode)
          for image, position in zip(images, positions)])
    if config.mixes:
      lam, box = self._mix_parameters(step, seed)
      images, labels = augment.mix_batch(images, labels, self.num_classes,
                                         lam=lam, box=box)
    return {"image": images, "label": labels}

  def _crop_and_flip(self, images: np.ndarray, step: int, batch_size: int,
                     seed: int, host_slice: slice) -> np.ndarray:
    """The float path's random translation and flip (the quickstart's)."""
    padding = self._input.random_crop_padding
    if padding or self._input.flip:
      # Drawn for the whole global batch, then sliced: an example gets the
      # same augmentation however many hosts share the batch.
      rng = augment.stream_rng(_AUGMENT_STREAM, seed, step)
      offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
      flips = rng.random(batch_size) < 0.5
      if padding:
        images = preprocess.crop(images, offsets[host_slice],
                                 self.image_shape[0])
      if self._input.flip:
        images = preprocess.flip(images, flips[host_slice])
    return images

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
    result = source.load_tracked(positions[mask])
    num_valid = len(result.labels)
    # Padding is zeros; the mask keeps it out of every metric.
    images = np.zeros((len(positions), *self.image_shape), np.float32)
    images[:num_valid] = result.images
    padded_labels = np.zeros(len(positions), np.int32)
    padded_labels[:num_valid] = result.labels
    batch = {"image": images, "label": padded_labels, "mask": mask}
    captions = self._captions(source, result.indices)
    if captions:
      batch["caption"] = np.concatenate(
          [captions["caption"], np.full(len(positions) - num_valid, "", dtype=object)])
    return batch

  def num_eval_steps(self, batch_size: int, split: str = "eval") -> int:
    """Batches in one pass over the eval (or train) split (the last one padded)."""
    return math.ceil(self._split_source(split)[1] / batch_size)

  def _iterate(self, batches: grain.MapDataset, num_workers: int = 0) -> Iterator[Batch]:
    # Order is kept whatever the threads and processes: element i is batch i.
    read_options = grain.ReadOptions(num_threads=self._num_threads,
                                     prefetch_buffer_size=max(1, self._num_threads))
    dataset = batches.to_iter_dataset(read_options)
    if num_workers:
      # grain (before its fix of issue #1355) reads an absl flag in mp_prefetch, which
      # fails in programs that never parse absl flags, as vitjax's CLI does not.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      # Batches come back pickled, not in shared memory: grain frees shared memory
      # asynchronously, and blocks still pending at exit are reported as leaked. A
      # copy of a batch costs a few ms against the hundreds a worker spends making it.
      dataset = grain.experimental.WithOptionsIterDataset(
          dataset, grain.experimental.DatasetOptions(min_shm_size=2**62))
      # Worker w builds batches w, w + n, ...; each batch is one worker's, whole.
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(dataset)

  def train_iter(self, batch_size: int, *, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1) -> Batches:
    """Endless training batches from `start_step` on (`close()` the iterator when done).

    Yields dicts {'image': float32 [b, H, W, C], 'label': int32 [b]} where
    b = batch_size // process_count is this host's slice of the global batch
    (with `device_fn`, uint8 images and the parameters it needs; with
    input.multicrop, 'global_crops', 'local_crops' and masks in place of
    'image', see `vitjax.data.multicrop`). Starting at
    step s yields exactly what the s-th batch onwards of a run from step 0
    yields, whatever input.num_threads and input.num_workers are.
    """
    _, host_slice = self._host_positions(0, batch_size, process_index, process_count)
    local_batch_size = host_slice.stop - host_slice.start
    last_step = sys.maxsize // batch_size
    if self._input.augments_per_example:  # Map examples, then batch them.
      example_fn = functools.partial(
          self._train_example_at, seed=seed, batch_size=batch_size,
          local_batch_size=local_batch_size, host_start=host_slice.start)
      batches = (grain.MapDataset.range(start_step * local_batch_size,
                                        last_step * local_batch_size)
                 .map(example_fn).batch(local_batch_size)
                 .map(functools.partial(self._finish_train_batch, seed=seed,
                                        batch_size=batch_size)))
    else:
      batches = grain.MapDataset.range(start_step, last_step).map(functools.partial(
          self._train_batch_tracked, batch_size=batch_size, seed=seed,
          process_index=process_index, process_count=process_count))
    return self.train_batches(batches)

  def train_batches(self, batches: grain.MapDataset) -> Batches:
    """`batches` (a grain MapDataset of training batches) built as input.num_threads and
    input.num_workers say, their skipped records counted; `close()` when done."""
    return Batches(self._iterate(batches, self._input.num_workers), self._record_skipped)

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
    batches = grain.MapDataset.range(self.num_eval_steps(batch_size, split)).map(
        functools.partial(self.eval_batch, batch_size=batch_size,
                          process_index=process_index, process_count=process_count,
                          split=split))
    return self._iterate(batches)


def _digits_dataset(config: Any, input_config: InputConfig) -> Dataset:
  image_size = input_config.image_size or digits.IMAGE_SHAPE[0]
  interpolation = input_config.interpolation

  class_ids = input_config.classes

  def source(split: str, crop_pct: float = 1.0) -> ArraySource:
    images, labels = digits.load_digits(split)
    if class_ids is not None:
      kept, labels = class_subset(labels, class_ids, digits.NUM_CLASSES, dataset="digits",
                                  split=split)
      images = images[kept]
    # Resized once here rather than per batch: the whole split is ~20 MB.
    return ArraySource(preprocess.resize_shorter_side_and_center_crop(
        images, image_size, crop_pct, interpolation), labels)

  train_split = _get(config, "train_split") or "train"
  crop_pct = input_config.crop_pct
  return Dataset(
      "digits",
      train_source=source(train_split),
      eval_source=source(_get(config, "eval_split") or "test", crop_pct),
      train_eval_source=source(train_split, crop_pct) if crop_pct < 1 else None,
      num_classes=len(class_ids) if class_ids is not None else digits.NUM_CLASSES,
      image_size=image_size, input_config=input_config,
      num_threads=input_config.num_threads or 0, class_ids=class_ids)


def _disk_dataset(name: str, train: sources.RecordSource, eval_source: sources.RecordSource,
                  input_config: InputConfig, classes=None) -> Dataset:
  num_threads = input_config.num_threads
  if num_threads is None:
    num_threads = min(8, os.cpu_count() or 1)
  class_ids = input_config.classes
  if class_ids is not None:
    num_classes = train.num_classes
    train, eval_source = (_record_subset(source, class_ids, num_classes, name)
                          for source in (train, eval_source))
    classes = [classes[c] for c in class_ids] if classes is not None else None
  return Dataset(
      name, train_source=train, eval_source=eval_source,
      train_eval_source=train.resized(input_config.crop_pct, input_config.interpolation),
      num_classes=train.num_classes, image_size=train.image_size,
      input_config=input_config, num_threads=num_threads, classes=classes,
      class_ids=class_ids)


def _tfds_dataset(name: str, config: Any, input_config: InputConfig) -> Dataset:
  # Imported here: digits and file datasets never load tensorflow_datasets.
  from vitjax.data import tfds as tfds_data  # pylint: disable=g-import-not-at-top
  refuse_tfds_classes(name, input_config.classes)
  data_dir = _get(config, "data_dir")
  options = dict(image_key=input_config.image_key,
                 label_key=input_config.label_key,
                 interpolation=input_config.interpolation,
                 skip_bad_images=input_config.skip_bad_images)
  train = tfds_data.TfdsSplit(
      name, _get(config, "train_split") or "train", data_dir=data_dir,
      image_size=input_config.image_size, **options)
  eval_split = tfds_data.TfdsSplit(
      name, _get(config, "eval_split") or "test", data_dir=data_dir,
      image_size=train.image_size, crop_pct=input_config.crop_pct, **options)
  return _disk_dataset(name, train, eval_split, input_config)


def _folder_dataset(root: str, config: Any, input_config: InputConfig) -> Dataset:
  options = dict(image_size=input_config.image_size,
                 interpolation=input_config.interpolation,
                 skip_bad_images=input_config.skip_bad_images)
  root = os.path.expanduser(root)
  train = folder_data.FolderSplit(root, _get(config, "train_split") or "train", **options)
  eval_split = folder_data.FolderSplit(root, _get(config, "eval_split") or "val",
                                       classes=train.classes,
                                       crop_pct=input_config.crop_pct, **options)
  return _disk_dataset(f"folder:{root}", train, eval_split, input_config,
                       classes=train.classes)


def _wds_dataset(pattern: str, config: Any, input_config: InputConfig) -> Dataset:
  options = dict(image_size=input_config.image_size,
                 interpolation=input_config.interpolation,
                 skip_bad_images=input_config.skip_bad_images)
  train_split = _get(config, "train_split") or "train"
  eval_split = _get(config, "eval_split") or "test"

  def check(key, split):
    if sources.parse_split(split)[0] != "train":
      raise webdataset.ShardError(
          f"config.{key}={split!r}: WebDataset shards have one split, 'train' (every "
          "shard of the pattern). Hold examples out with slices, e.g. "
          "--config.train_split='train[:99%]' --config.eval_split='train[99%:]', or "
          "give the eval split its own shards: --config.eval_split='/data/val/*.tar'.")

  check("train_split", train_split)
  train = webdataset.WdsSplit(pattern, train_split, **options)
  if webdataset.is_pattern(eval_split):
    evaluation = webdataset.WdsSplit(eval_split, "train", num_classes=train.num_classes,
                                     crop_pct=input_config.crop_pct, **options)
  else:
    check("eval_split", eval_split)
    evaluation = webdataset.WdsSplit(pattern, eval_split, num_classes=train.num_classes,
                                     crop_pct=input_config.crop_pct, **options)
  return _disk_dataset(f"wds:{pattern}", train, evaluation, input_config)


def _with_model_preprocessing(input_config: InputConfig,
                              config: Any) -> InputConfig:
  """input.preprocess_from_model: mean, std, crop_pct, interpolation of a weight."""
  choice = input_config.preprocess_from_model
  if not choice or (isinstance(choice, str) and choice.strip().lower() in ("false", "none")):
    return input_config
  from vitjax import models  # pylint: disable=g-import-not-at-top
  own = choice is True or choice.strip().lower() in ("model", "true")
  name = _get(_get(config, "model"), "name") if own else choice.strip()
  try:
    entry = models.model_entry(name)
  except models.UnknownModelError as error:
    raise ValueError(
        f"input.preprocess_from_model takes the preprocessing of a registered "
        f"pretrained model, and {name!r} is not one ({error}). Set it to a name "
        "such as 'vit_base_patch16_224', or set input.mean, input.std and "
        "input.crop_pct yourself.") from None
  return dataclasses.replace(
      input_config, mean=entry.mean, std=entry.std, crop_pct=entry.crop_pct,
      interpolation=entry.interpolation)


def get_dataset(config: Any) -> Dataset:
  """The dataset that `config` names, with its input pipeline.

  Reads config.dataset: 'digits' (the default); a TFDS name such as 'mnist',
  'cifar10', 'imagenet2012' (with config.data_dir); 'folder:PATH' (image
  folders, `vitjax.data.folder`); or 'wds:PATTERN' (WebDataset shards,
  `vitjax.data.webdataset`). Also config.train_split, config.eval_split and
  config.input (see `InputConfig`).
  """
  input_config = InputConfig.from_config(_get(config, "input"))
  input_config = _with_model_preprocessing(input_config, config)
  dataset = _image_dataset(config, input_config)
  if not input_config.packing:
    return dataset
  return packing_lib.PackedDataset(dataset, packing_config(config))


def packing_config(config: Any) -> packing_lib.PackingConfig:
  """config.input.packing, its patch size defaulting to the model's (`config.model`)."""
  from vitjax import models  # pylint: disable=g-import-not-at-top
  options = dict(_get(config, "model") or {})
  patch_size = None
  if options.get("name"):
    patch_size = getattr(models.create_model(options.pop("name"), **options), "patch_size", None)
  return packing_lib.PackingConfig.from_config(_get(_get(config, "input"), "packing"),
                                               patch_size=patch_size)


def _image_dataset(config: Any, input_config: InputConfig) -> Dataset:
  name = _get(config, "dataset") or "digits"
  if name == "digits":
    return _digits_dataset(config, input_config)
  kind, _, path = name.partition(":")
  if kind == "folder" and path:
    return _folder_dataset(path, config, input_config)
  if kind == "wds" and path:
    return _wds_dataset(path, config, input_config)
  return _tfds_dataset(name, config, input_config)
