"""TFDS image-classification datasets by name, read without TensorFlow.

`tfds.data_source` gives random access to a prepared dataset in the
array_record format and decodes images with PIL (or OpenCV), so reading needs no
TensorFlow; random access is what lets the pipeline build the batch of any
step directly (deterministic, resumable input). Preparing a dataset is a
separate, one-off step; see `DatasetNotPreparedError`.
"""

import copy
import difflib
import os
import threading

import numpy as np
import tensorflow_datasets as tfds

from vitjax.data import preprocess


class DatasetNotPreparedError(RuntimeError):
  """The TFDS dataset is not on disk in the array_record format."""


class UnknownDatasetError(ValueError):
  """No dataset of that name: neither 'digits' nor a registered TFDS builder."""


class BadImageError(RuntimeError):
  """A record whose image cannot be decoded (and skip_bad_images is off)."""


def _data_dir_for_humans(data_dir: str | None) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _not_prepared_message(name: str, data_dir: str | None, looked_in: str,
                          file_format: str | None) -> str:
  shown_dir = _data_dir_for_humans(data_dir)
  if file_format is None:
    problem = f"TFDS dataset {name!r} is not prepared in data_dir {shown_dir!r}"
  else:
    problem = (f"TFDS dataset {name!r} in data_dir {shown_dir!r} is prepared "
               f"in the {file_format} format")
  return (
      f"{problem} (looked in {looked_in}). vitjax reads TFDS datasets with "
      "tfds.data_source, which needs the array_record file format. Prepare it "
      "once (this downloads the data; generating most datasets needs "
      "TensorFlow installed, reading them afterwards does not):\n"
      f"  tfds build {name} --data_dir {shown_dir} --file_format array_record\n"
      "or in Python:\n"
      "  import tensorflow_datasets as tfds\n"
      f"  tfds.builder({name!r}, data_dir={shown_dir!r}).download_and_prepare("
      "file_format='array_record')\n"
      "A dataset already prepared as tfrecord can be converted in place with "
      f"`tfds convert_format --root_data_dir {shown_dir} "
      "--out_file_format array_record`.")


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """tfds.builder, with a short error that suggests close names."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    # Community datasets are left out: listing them needs the network.
    known = tfds.list_builders(with_community_datasets=False) + ["digits"]
    base_name = name.split("/")[0].split(":")[0]
    close = difflib.get_close_matches(base_name, known, n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else ""
    raise UnknownDatasetError(
        f"Unknown dataset {name!r}: it is neither 'digits' nor a registered "
        f"TFDS builder.{hint} (tfds.list_builders() lists them all.)") from None


class TfdsSplit:
  """One split of a TFDS dataset: random access to resized [0, 1] images.

  Attributes:
    name: the TFDS name.
    split: the split as given, e.g. 'train[:90%]'.
    num_classes: from the label feature's ClassLabel.
    image_size: side of the images that `load` returns.
    channels: channels of the dataset's images (1 for MNIST, 3 for CIFAR).
    bad_indices: records found undecodable and skipped (skip_bad_images);
      shared with the copies that `resized` makes.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None,
               image_size: int | None, image_key: str = "image",
               label_key: str = "label", crop_pct: float = 1.0,
               interpolation: str = "bilinear", skip_bad_images: bool = False):
    builder = _builder(name, data_dir)
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                      download=False)
    except Exception as error:  # TFDS raises several types for "not there".
      if not builder.is_prepared():
        file_format = None
      elif builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        file_format = builder.info.file_format.value
      else:
        raise
      message = _not_prepared_message(name, data_dir, builder.data_dir,
                                      file_format)
      raise DatasetNotPreparedError(message) from error
    features = builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise KeyError(f"{name!r} has no feature {key!r}; it has "
                       f"{list(features.keys())}. Set config.input.image_key "
                       "or config.input.label_key.")
    image_shape = features[image_key].shape
    if image_size is None:
      if None in image_shape[:2]:
        raise ValueError(f"{name!r} images differ in size; set "
                         "config.input.image_size.")
      image_size = min(image_shape[:2])
    self.name = name
    self.split = split
    self.crop_pct = crop_pct
    self.interpolation = interpolation
    self.skip_bad_images = skip_bad_images
    self.bad_indices = set()
    self._bad_indices_lock = threading.Lock()
    self.num_classes = features[label_key].num_classes
    self.image_size = image_size
    self.channels = image_shape[-1] if len(image_shape) == 3 else 1
    self._image_key = image_key
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._source)

  def _to_float(self, image: np.ndarray) -> np.ndarray:
    """One decoded image -> float32 [H, W, C] in [0, 1]."""
    if image.ndim == 2:
      image = image[..., None]
    if np.issubdtype(image.dtype, np.integer):
      return image.astype(np.float32) / np.iinfo(image.dtype).max
    return image.astype(np.float32, copy=False)

  def resized(self, crop_pct: float, interpolation: str) -> "TfdsSplit":
    """The same records, loaded with another crop_pct and interpolation."""
    split = copy.copy(self)  # Shares the open files and the bad-record set.
    split.crop_pct, split.interpolation = crop_pct, interpolation
    return split

  def _fit(self, images: np.ndarray) -> np.ndarray:
    """[n, H, W, C] -> [n, image_size, image_size, C]."""
    if (images.shape[1:3] == (self.image_size, self.image_size)
        and self.crop_pct == 1):
      return images
    return preprocess.resize_shorter_side_and_center_crop(
        images, self.image_size, self.crop_pct, self.interpolation)

  def _read_record(self, index: int) -> dict | None:
    """The decoded example, or None if it is bad and bad images are skipped."""
    try:
      return self._source[index]
    except Exception as error:  # pylint: disable=broad-except
      # PIL alone raises OSError, SyntaxError or ValueError on bad bytes.
      if not self.skip_bad_images:
        raise BadImageError(
            f"Cannot decode record {index} of TFDS dataset {self.name!r}, "
            f"split {self.split!r}: {type(error).__name__}: {error}. Set "
            "config.input.skip_bad_images=True to skip undecodable records "
            "(each is replaced by the next readable one and counted in "
            "dataset.bad_images_skipped).") from error
      with self._bad_indices_lock:
        self.bad_indices.add(index)
      return None

  def _read(self, index: int) -> dict:
    """Record `index`, or with skip_bad_images the next readable one after it."""
    for offset in range(len(self)):
      example = self._read_record((index + offset) % len(self))
      if example is not None:
        return example
    raise BadImageError(f"No record of TFDS dataset {self.name!r}, split "
                        f"{self.split!r} can be decoded.")

  def load_raw(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Decoded images as they are stored (uint8 [H, W, C], sizes vary), labels."""
    examples = [self._read(int(index)) for index in indices]
    labels = np.asarray([example[self._label_key] for example in examples],
                        np.int32)
    images = [preprocess.to_uint8(example[self._image_key])
              for example in examples]
    return images, labels

  def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads and decodes: (float32 [n, S, S, C] in [0, 1], int32 labels [n])."""
    # One record at a time: batched `__getitems__` would be faster on real
    # files but is broken under tfds.testing.mock_data, which the tests use.
    # The pipeline reads several batches in parallel threads instead.
    examples = [self._read(int(index)) for index in indices]
    labels = np.asarray([example[self._label_key] for example in examples],
                        np.int32)
    images = [self._to_float(example[self._image_key]) for example in examples]
    if not images:
      return np.zeros((0, self.image_size, self.image_size, self.channels),
                      np.float32), labels
    if len({image.shape for image in images}) == 1:
      # Fixed-size datasets (MNIST, CIFAR): one batched resize is much faster.
      return self._fit(np.stack(images)), labels
    return np.concatenate([self._fit(image[None]) for image in images]), labels
