"""TFDS image-classification datasets by name, read without TensorFlow.

`tfds.data_source` gives random access to a prepared dataset in the
array_record format and decodes images with PIL (or OpenCV), so reading needs no
TensorFlow; random access is what lets the pipeline build the batch of any
step directly (deterministic, resumable input). Preparing a dataset is a
separate, one-off step; see `DatasetNotPreparedError`.
"""

import difflib
import os

import tensorflow_datasets as tfds

from vitjax.data import sources
from vitjax.data.sources import BadImageError  # pylint: disable=unused-import


class DatasetNotPreparedError(RuntimeError):
  """The TFDS dataset is not on disk in the array_record format."""


class UnknownDatasetError(ValueError):
  """No dataset of that name: neither 'digits' nor a registered TFDS builder."""


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


class TfdsSplit(sources.RecordSource):
  """One split of a TFDS dataset: random access to decoded images.

  Attributes (besides `sources.RecordSource`'s):
    channels: channels of the dataset's images (1 for MNIST, 3 for CIFAR).
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
    super().__init__(
        name=name, split=split, num_classes=features[label_key].num_classes,
        image_size=image_size,
        channels=image_shape[-1] if len(image_shape) == 3 else 1,
        crop_pct=crop_pct, interpolation=interpolation, skip_bad_images=skip_bad_images)
    self._image_key = image_key
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._source)

  def _where(self, index: int) -> str:
    return f"record {index} of TFDS dataset {self.name!r}, split {self.split!r}"

  def _record(self, index: int):
    # One record at a time: batched `__getitems__` would be faster on real
    # files but is broken under tfds.testing.mock_data, which the tests use.
    # The pipeline reads several examples in parallel threads instead.
    example = self._source[index]
    return example[self._image_key], example[self._label_key]
