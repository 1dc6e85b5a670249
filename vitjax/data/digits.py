"""The embedded default dataset: scikit-learn's 8x8 handwritten digits.

1,797 real images in 10 classes that ship inside scikit-learn, so the
quickstart and the tests need no download. scikit-learn has no train/test
split for them; this module fixes one: stratified, 20% test (1,437 train, 360
test), the same on every machine and independent of the training seed.
"""

import functools
import math
import re

import numpy as np

from sklearn import datasets as sklearn_datasets

from vitjax.data import sources

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
SPLITS = ("train", "test")
# Seeds the train/test split only. Changing it changes which images are test
# images, and so every reported digits accuracy: leave it alone.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
# Pixel values in scikit-learn's digits are counts in 0..16.
_MAX_PIXEL_VALUE = 16.0


@functools.cache
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 images as float32 [N, 8, 8, 1] in [0, 1], labels as int32 [N]."""
  digits = sklearn_datasets.load_digits()
  images = (digits.images / _MAX_PIXEL_VALUE).astype(np.float32)[..., None]
  return images, digits.target.astype(np.int32)


def split_indices(split: str, *, seed: int = SPLIT_SEED,
                  test_fraction: float = TEST_FRACTION) -> np.ndarray:
  """Sorted indices into scikit-learn's digits that make up `split`.

  Stratified: each class contributes its share of the ceil(N * test_fraction)
  test images (largest remainders get the leftover slots), picked at random
  within the class.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown digits split {split!r}; choose one of {SPLITS}, or a "
                     "slice of one in load_digits, e.g. 'train[:10%]'.")
  _, labels = _load_all()
  classes, counts = np.unique(labels, return_counts=True)
  num_test = math.ceil(len(labels) * test_fraction)
  quotas = counts * test_fraction
  per_class = np.floor(quotas).astype(int)
  leftover = num_test - per_class.sum()
  # Stable sort so that ties go to the lower class, on every machine.
  per_class[np.argsort(-(quotas - per_class), kind="stable")[:leftover]] += 1

  # The legacy RandomState stream is frozen by NumPy's compatibility policy,
  # unlike `default_rng`, so the split survives NumPy upgrades.
  rng = np.random.RandomState(seed)
  is_test = np.zeros(len(labels), bool)
  for label, count in zip(classes, per_class):
    members = np.flatnonzero(labels == label)
    is_test[rng.permutation(members)[:count]] = True
  return np.flatnonzero(is_test if split == "test" else ~is_test)


def _split_slice(split: str) -> None:
  """Checks 'train', 'test[:50]', 'train[10%:]': TFDS slicing, ends as counts or percents."""
  match = re.fullmatch(r"(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?", split.replace(" ", ""))
  if not match:
    raise ValueError(f"Cannot read the digits split {split!r}: use 'train', 'test' or a "
                     "slice such as 'train[:10%]', 'train[100:]' or 'test[:50]'.")


def load_digits(split: str, *, seed: int = SPLIT_SEED,
                test_fraction: float = TEST_FRACTION
                ) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 8, 8, 1] in [0, 1], labels int32 [N]) of `split`.

  A TFDS-style slice takes part of a split in its fixed order: 'train[:10%]' is
  the first round(10% of 1,437) = 144 training images (a labelled fraction).
  """
  images, labels = _load_all()
  _split_slice(split)  # Digits' own message for a split it cannot read.
  name, spec = sources.parse_split(split)
  indices = split_indices(name, seed=seed, test_fraction=test_fraction)
  indices = indices[sources.slice_indices(len(indices), spec, split)]
  return images[indices], labels[indices]
