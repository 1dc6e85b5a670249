"""Datasets and deterministic input pipelines for vitjax.

    from vitjax import data
    ds = data.get_dataset(config)
    batch = next(ds.train_iter(128, seed=0))  # {'image', 'label'}

'digits' (scikit-learn's 8x8 digits, no download) is the default; any TFDS
image-classification dataset prepared in the array_record format works by name,
image folders as 'folder:PATH' and WebDataset shards as 'wds:PATTERN'.
With config.input.multicrop, training batches are self-supervised views instead
({'global_crops', 'local_crops', 'label'} and masks; see `data.multicrop`).
tensorflow_datasets is imported only when a TFDS dataset is read.
"""

from vitjax.data import augment
from vitjax.data import digits
from vitjax.data import multicrop
from vitjax.data import preprocess
from vitjax.data.pipeline import ArraySource
from vitjax.data.pipeline import Dataset
from vitjax.data.pipeline import InputConfig
from vitjax.data.pipeline import get_dataset
from vitjax.data.pipeline import shuffled_indices
from vitjax.data.sources import BadImageError
from vitjax.data.sources import RecordSource


def __getattr__(name):
  # The TFDS errors live with the TFDS reader, which imports tensorflow_datasets.
  if name in ("DatasetNotPreparedError", "UnknownDatasetError"):
    from vitjax.data import tfds  # pylint: disable=g-import-not-at-top
    return getattr(tfds, name)
  raise AttributeError(f"module 'vitjax.data' has no attribute {name!r}")


__all__ = [
    "ArraySource",
    "BadImageError",
    "Dataset",
    "DatasetNotPreparedError",
    "InputConfig",
    "RecordSource",
    "UnknownDatasetError",
    "augment",
    "digits",
    "get_dataset",
    "multicrop",
    "preprocess",
    "shuffled_indices",
]
