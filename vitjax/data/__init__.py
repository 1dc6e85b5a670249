"""Datasets and deterministic input pipelines for vitjax.

    from vitjax import data
    ds = data.get_dataset(config)
    batch = next(ds.train_iter(128, seed=0))  # {'image', 'label'}

'digits' (scikit-learn's 8x8 digits, no download) is the default; any TFDS
image-classification dataset prepared in the array_record format works by name.
"""

from vitjax.data import augment
from vitjax.data import digits
from vitjax.data import preprocess
from vitjax.data.pipeline import ArraySource
from vitjax.data.pipeline import Dataset
from vitjax.data.pipeline import InputConfig
from vitjax.data.pipeline import get_dataset
from vitjax.data.pipeline import shuffled_indices
from vitjax.data.tfds import BadImageError
from vitjax.data.tfds import DatasetNotPreparedError
from vitjax.data.tfds import UnknownDatasetError

__all__ = [
    "ArraySource",
    "BadImageError",
    "Dataset",
    "DatasetNotPreparedError",
    "InputConfig",
    "UnknownDatasetError",
    "augment",
    "digits",
    "get_dataset",
    "preprocess",
    "shuffled_indices",
]
