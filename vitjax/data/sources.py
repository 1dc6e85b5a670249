"""Splits read from disk by record index: what TFDS, image folders and WebDataset share.

A `RecordSource` is one split with random access: `load(indices)` gives resized
float images in [0, 1] for evaluation, `load_raw(indices)` the decoded uint8
images as stored, for per-example augmentation. Subclasses say how record `i` is
read (`_record`) and named in errors (`_where`); decoding errors, skipping bad
records and resizing are here, once.

With `skip_bad_images`, a record that cannot be read is replaced by the next
readable one. Which records were skipped travels with the result
(`ReadResult.skipped`), so the count stays right when batches are built in other
processes (grain's multiprocessing workers).
"""

import copy
import dataclasses
import threading

import numpy as np

from vitjax.data import preprocess


class BadImageError(RuntimeError):
  """A record whose image cannot be decoded (and skip_bad_images is off)."""


class SplitError(ValueError):
  """A split name or slice that cannot be read ('train[:90%]' is one that can)."""


def parse_split(split: str) -> tuple[str, str | None]:
  """'train[:90%]' -> ('train', ':90%'); 'val' -> ('val', None)."""
  split = split.strip()
  if split.endswith("]") and "[" in split:
    name, _, rest = split.partition("[")
    return name.strip(), rest[:-1].strip()
  return split, None


def _bound(text: str, length: int, split: str) -> int | None:
  text = text.strip()
  if not text:
    return None
  try:
    if text.endswith("%"):
      # TFDS rounds percent boundaries to the closest example.
      return int(round(float(text[:-1]) * length / 100))
    return int(text)
  except ValueError:
    raise SplitError(f"Cannot read the slice of split {split!r}: {text!r} is neither "
                      "a number nor a percentage. Write e.g. 'train[:90%]' or "
                      "'val[:1000]'.") from None


def slice_indices(length: int, spec: str | None, split: str) -> range:
  """The indices a TFDS-style slice ('10%:', ':-500', '100:200') keeps of `length`."""
  if spec is None:
    return range(length)
  if spec.count(":") != 1:
    raise SplitError(f"Split {split!r}: a slice needs one ':', as in 'train[:90%]'.")
  start, stop = (_bound(text, length, split) for text in spec.split(":"))
  return range(length)[slice(start, stop)]


@dataclasses.dataclass
class ReadResult:
  """Records read by `RecordSource.read`: images as decoded, int32 labels, and the
  (split, index) of each bad record skipped on the way."""
  images: list
  labels: np.ndarray
  skipped: list
  indices: np.ndarray  # The records read: a bad one's replacement in its place.


class RecordSource:
  """One split of records with random access, decoded to uint8 [H, W, C].

  Attributes:
    name: the dataset's name, for messages.
    split: the split's name, for messages.
    num_classes: number of label classes.
    image_size: side of the images that `load` returns.
    channels: channels of the decoded images.
    crop_pct, interpolation: `load`'s resize (see preprocess.resize_shorter_side_and_center_crop).
    skip_bad_images: replace undecodable records by the next readable one.
    bad_indices: records found undecodable in this process; shared with the
      copies that `resized` makes.
  """

  def __init__(self, *, name: str, split: str, num_classes: int, image_size: int,
               channels: int = 3, crop_pct: float = 1.0,
               interpolation: str = "bilinear", skip_bad_images: bool = False):
    self.name = name
    self.split = split
    self.num_classes = num_classes
    self.image_size = image_size
    self.channels = channels
    self.crop_pct = crop_pct
    self.interpolation = interpolation
    self.skip_bad_images = skip_bad_images
    self.bad_indices = set()
    self._bad_indices_lock = threading.Lock()

  # What a subclass gives.

  def __len__(self) -> int:
    raise NotImplementedError

  def _record(self, index: int) -> tuple[np.ndarray, int]:
    """(decoded image, label) of record `index`; raises on a bad record."""
    raise NotImplementedError

  def _where(self, index: int) -> str:
    """Record `index` in words: 'record 3 of TFDS dataset 'mnist', split 'train''."""
    return f"record {index} of {self.name!r}, split {self.split!r}"

  # Shared.

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_bad_indices_lock"]  # Locks do not pickle (grain's worker processes).
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._bad_indices_lock = threading.Lock()

  def resized(self, crop_pct: float, interpolation: str) -> "RecordSource":
    """The same records, loaded with another crop_pct and interpolation."""
    source = copy.copy(self)  # Shares the open files and the bad-record set.
    source.crop_pct, source.interpolation = crop_pct, interpolation
    return source

  def _read_one(self, index: int) -> tuple[np.ndarray, int] | None:
    """The record, or None if it is bad and bad images are skipped."""
    try:
      return self._record(index)
    except Exception as error:  # pylint: disable=broad-except
      # PIL alone raises OSError, SyntaxError or ValueError on bad bytes.
      if not self.skip_bad_images:
        raise BadImageError(
            f"Cannot decode {self._where(index)}: {type(error).__name__}: {error}. "
            "Set config.input.skip_bad_images=True to skip undecodable records "
            "(each is replaced by the next readable one and counted in "
            "dataset.bad_images_skipped).") from error
      with self._bad_indices_lock:
        self.bad_indices.add(index)
      return None

  def read(self, indices: np.ndarray) -> ReadResult:
    """Records `indices` (with skip_bad_images, the next readable one for a bad one)."""
    images, labels, skipped, read = [], [], [], []
    for index in indices:
      index = int(index)
      for offset in range(len(self)):
        position = (index + offset) % len(self)
        example = self._read_one(position)
        if example is not None:
          break
        skipped.append((self.split, position))
      else:
        raise BadImageError(f"No record of {self.name!r}, split {self.split!r} can "
                            "be decoded.")
      images.append(example[0])
      labels.append(example[1])
      read.append(position)
    return ReadResult(images, np.asarray(labels, np.int32).reshape(-1), skipped,
                      np.asarray(read, np.int64))

  def load_raw(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Decoded images as they are stored (uint8 [H, W, C], sizes vary), labels."""
    result = self.read(indices)
    return [preprocess.to_uint8(image) for image in result.images], result.labels

  @staticmethod
  def _to_float(image: np.ndarray) -> np.ndarray:
    """One decoded image -> float32 [H, W, C] in [0, 1] (integers scaled by their range)."""
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if np.issubdtype(image.dtype, np.integer):
      return image.astype(np.float32) / np.iinfo(image.dtype).max
    return image.astype(np.float32, copy=False)

  def fit(self, images: np.ndarray) -> np.ndarray:
    """float32 [n, H, W, C] in [0, 1] -> [n, image_size, image_size, C]."""
    if images.shape[1:3] == (self.image_size, self.image_size) and self.crop_pct == 1:
      return images
    return preprocess.resize_shorter_side_and_center_crop(
        images, self.image_size, self.crop_pct, self.interpolation)

  def load_tracked(self, indices: np.ndarray) -> ReadResult:
    """`load`'s images and labels in a ReadResult, with the records skipped and read."""
    result = self.read(indices)
    images = [self._to_float(image) for image in result.images]
    if not images:
      images = np.zeros((0, self.image_size, self.image_size, self.channels), np.float32)
    elif len({image.shape for image in images}) == 1:
      # Fixed-size datasets (MNIST, CIFAR): one batched resize is much faster.
      images = self.fit(np.stack(images))
    else:
      images = np.concatenate([self.fit(image[None]) for image in images])
    return dataclasses.replace(result, images=images)

  def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads and decodes: (float32 [n, S, S, C] in [0, 1], int32 labels [n])."""
    result = self.load_tracked(indices)
    return result.images, result.labels


class ClassSubset(RecordSource):
  """The records of `source` whose labels are in `class_ids`, relabelled 0..K-1 in that order.

  config.input.classes on datasets read from disk: `source` must list its labels
  without decoding (`source.labels`: image folders, WebDataset shards), so the subset
  is an index filter. Bad records are skipped within the subset, so a replacement
  always has one of the kept labels.
  """

  def __init__(self, source: RecordSource, class_ids, kept: np.ndarray, labels: np.ndarray):
    """`kept`: the records of `source` to keep, in order; `labels`: their new labels."""
    super().__init__(name=source.name, split=source.split, num_classes=len(class_ids),
                     image_size=source.image_size, channels=source.channels,
                     crop_pct=source.crop_pct, interpolation=source.interpolation,
                     skip_bad_images=source.skip_bad_images)
    self.source = source
    self.class_ids = tuple(class_ids)
    self._kept = np.asarray(kept, np.int64)
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._kept)

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  @property
  def has_captions(self) -> bool:
    return bool(getattr(self.source, "has_captions", False))

  @property
  def num_cut(self) -> int:
    return getattr(self.source, "num_cut", 0)

  def captions(self, indices: np.ndarray) -> list[str]:
    return self.source.captions(self._kept[np.asarray(indices, np.int64)])

  def _where(self, index: int) -> str:
    return self.source._where(int(self._kept[index]))  # pylint: disable=protected-access

  def _record(self, index: int) -> tuple[np.ndarray, int]:
    image, _ = self.source._record(int(self._kept[index]))  # pylint: disable=protected-access
    return image, int(self._labels[index])
