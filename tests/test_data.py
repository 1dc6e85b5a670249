"""The input pipeline's contract: fixed splits, deterministic resumable batches.

Everything runs offline: digits ship with scikit-learn, TFDS datasets are
mocked (tfds.testing.mock_data) or built here from a few generated images.
"""

import io
import time

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vitjax import data
from vitjax.data import digits
from vitjax.data import preprocess

NUM_DIGITS = 1797


def make_config(dataset="digits", **input_overrides):
  input_config = dict(image_size=32, random_crop_padding=4, flip=True,
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3)
  input_config.update(input_overrides)
  return ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=None, train_split="train", eval_split="test",
      input=input_config))


@pytest.fixture(scope="module")
def digits_dataset():
  return data.get_dataset(make_config())


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for batch_actual, batch_expected in zip(actual, expected):
    assert batch_actual.keys() == batch_expected.keys()
    for key in batch_actual:
      np.testing.assert_array_equal(batch_actual[key], batch_expected[key])


def indexed_dataset(num_examples):
  """A dataset whose image i is the constant i + 1: batches reveal indices."""
  images = np.arange(1, num_examples + 1, dtype=np.float32)[:, None, None, None]
  images = np.broadcast_to(images, (num_examples, 4, 4, 1)).copy()
  labels = np.arange(num_examples, dtype=np.int32) % 3
  input_config = data.InputConfig(
      image_size=4, mean=(0.0,), std=(1.0,), channels=1)
  source = data.ArraySource(images, labels)
  return data.Dataset("indexed", train_source=source, eval_source=source,
                      num_classes=3, image_size=4, input_config=input_config)


def example_ids(batch):
  """Index of each example of an `indexed_dataset` batch (-1 for padding)."""
  return np.round(batch["image"].max(axis=(1, 2, 3))).astype(int) - 1


# Digits: the embedded default dataset.


def test_digits_split_sizes_and_classes():
  train_images, train_labels = digits.load_digits("train")
  test_images, test_labels = digits.load_digits("test")
  assert train_images.shape == (1437, 8, 8, 1)
  assert test_images.shape == (360, 8, 8, 1)
  for images, labels in [(train_images, train_labels),
                         (test_images, test_labels)]:
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.min() >= 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(np.unique(labels), np.arange(10))
  # Stratified: each class is about 20% test.
  test_share = np.bincount(test_labels) / np.bincount(
      np.concatenate([train_labels, test_labels]))
  assert np.all(np.abs(test_share - 0.2) < 0.01)


def test_digits_split_is_fixed_and_disjoint():
  train = digits.split_indices("train")
  test = digits.split_indices("test")
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])),
                                np.arange(NUM_DIGITS))
  # The same split on every machine: a change here changes every reported
  # digits accuracy.
  np.testing.assert_array_equal(test[:8], [3, 7, 13, 19, 36, 38, 43, 48])
  assert test.sum() == 313_341
  with pytest.raises(ValueError, match="train"):
    digits.load_digits("validation")


def test_digits_dataset_interface(digits_dataset):
  assert digits_dataset.num_classes == 10
  assert digits_dataset.num_train == 1437
  assert digits_dataset.num_eval == 360
  assert digits_dataset.image_shape == (32, 32, 3)
  batch = next(digits_dataset.train_iter(128, seed=0))
  assert batch["image"].shape == (128, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
  # mean = std = 0.5 maps [0, 1] to [-1, 1].
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0


def test_missing_input_keys_fall_back_to_defaults():
  config = ml_collections.ConfigDict(dict(dataset="digits"))
  dataset = data.get_dataset(config)
  assert dataset.image_shape == (8, 8, 3)
  batch = next(dataset.eval_iter(16))
  assert batch["image"].shape == (16, 8, 8, 3)

  config.input = ml_collections.ConfigDict(dict(image_size=16, channels=1))
  assert data.get_dataset(config).image_shape == (16, 16, 1)
  # Plain dicts work too.
  dataset = data.get_dataset({"dataset": "digits", "input": {"image_size": 12}})
  assert dataset.image_shape == (12, 12, 3)
  with pytest.raises(ValueError, match="one per channel"):
    data.get_dataset({"input": {"channels": 1, "mean": (0.5, 0.5, 0.5)}})


# Training batches: deterministic, resumable, every example once per epoch.


def test_train_iter_is_deterministic_and_resumable(digits_dataset):
  stream = take(digits_dataset.train_iter(64, seed=3), 30)
  assert_batches_equal(take(digits_dataset.train_iter(64, seed=3), 30), stream)
  # 30 batches of 64 cross the end of the first epoch (1,437 examples).
  for start_step in [1, 22, 29]:
    resumed = take(digits_dataset.train_iter(64, seed=3, start_step=start_step),
                   30 - start_step)
    assert_batches_equal(resumed, stream[start_step:])
  other_seed = next(digits_dataset.train_iter(64, seed=4))
  assert not np.array_equal(other_seed["image"], stream[0]["image"])


def test_every_train_example_is_seen_once_per_epoch():
  num_examples, batch_size = 50, 8  # Batches straddle epoch boundaries.
  dataset = indexed_dataset(num_examples)
  num_batches = -(-3 * num_examples // batch_size)  # Three epochs and a bit.
  batches = take(dataset.train_iter(batch_size, seed=0), num_batches)
  ids = np.concatenate([example_ids(batch) for batch in batches])
  epochs = [ids[i * num_examples:(i + 1) * num_examples] for i in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_examples))
  # Reshuffled each epoch, and shuffled at all.
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(num_examples))
  # Labels travel with their images.
  labels = np.concatenate([batch["label"] for batch in batches])
  np.testing.assert_array_equal(labels, ids[:len(labels)] % 3)


def test_augmentation_changes_images_but_not_shape_or_labels():
  plain = data.get_dataset(make_config(random_crop_padding=0, flip=False))
  augmented = data.get_dataset(make_config(random_crop_padding=4, flip=True))
  plain_batch = plain.train_batch(5, 128, seed=1)
  augmented_batch = augmented.train_batch(5, 128, seed=1)
  assert augmented_batch["image"].shape == plain_batch["image"].shape
  np.testing.assert_array_equal(augmented_batch["label"], plain_batch["label"])
  changed = np.any(augmented_batch["image"] != plain_batch["image"],
                   axis=(1, 2, 3))
  assert changed.mean() > 0.8
  # Augmentation is random per step, not fixed per example.
  assert not np.array_equal(augmented.train_batch(5, 128, seed=1)["image"],
                            augmented.train_batch(5, 128, seed=2)["image"])
  # Eval batches are never augmented.
  assert_batches_equal(take(augmented.eval_iter(128), 3),
                       take(plain.eval_iter(128), 3))


def test_translation_moves_content_within_padding():
  image = np.zeros((1, 6, 6, 1), np.float32)
  image[0, 2, 3] = 1.0
  rng = np.random.default_rng(0)
  padded = preprocess.pad(image, 2)
  positions = set()
  for _ in range(20):  # As the pipeline crops: offsets in [0, 2 * padding].
    cropped = preprocess.crop(padded, rng.integers(0, 5, size=(1, 2)), size=6)
    assert cropped.shape == image.shape and cropped.sum() == 1.0
    row, column = np.argwhere(cropped[0, :, :, 0])[0]
    assert abs(row - 2) <= 2 and abs(column - 3) <= 2
    positions.add((row, column))
  assert len(positions) > 5
  flipped = preprocess.flip(image, np.array([True]))
  assert flipped[0, 2, 2, 0] == 1.0 and flipped.sum() == 1.0


# Eval batches: the whole split once, in order, padding masked.


@pytest.mark.parametrize("batch_size", [128, 360, 500])
def test_eval_iter_covers_the_split_exactly_once(digits_dataset, batch_size):
  batches = list(digits_dataset.eval_iter(batch_size))
  assert len(batches) == -(-360 // batch_size)
  for batch in batches:
    assert batch["image"].shape == (batch_size, 32, 32, 3)
    assert batch["mask"].dtype == np.bool_
  mask = np.concatenate([batch["mask"] for batch in batches])
  assert mask.sum() == 360 and mask[:360].all()
  labels = np.concatenate([batch["label"] for batch in batches])[mask]
  np.testing.assert_array_equal(labels, digits.load_digits("test")[1])
  # The same images the same examples give without padding in the batch.
  first = next(digits_dataset.eval_iter(10))
  np.testing.assert_array_equal(batches[0]["image"][:10], first["image"])


# Several hosts: disjoint slices whose union is the global batch.


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_make_up_the_global_batch(digits_dataset, process_count):
  global_batch = digits_dataset.train_batch(7, 128, seed=0)
  slices = [digits_dataset.train_batch(7, 128, seed=0, process_index=index,
                                       process_count=process_count)
            for index in range(process_count)]
  for key in ("image", "label"):
    assert all(len(part[key]) == 128 // process_count for part in slices)
    np.testing.assert_array_equal(
        np.concatenate([part[key] for part in slices]), global_batch[key])

  hosts = [list(digits_dataset.eval_iter(128, process_index=index,
                                         process_count=process_count))
           for index in range(process_count)]
  assert len({len(batches) for batches in hosts}) == 1  # Same number of steps.
  global_eval = list(digits_dataset.eval_iter(128))
  for step, global_eval_batch in enumerate(global_eval):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(
          np.concatenate([batches[step][key] for batches in hosts]),
          global_eval_batch[key])


def test_process_slices_are_disjoint():
  dataset = indexed_dataset(40)
  ids = [example_ids(dataset.train_batch(0, 40, seed=0, process_index=index,
                                         process_count=4))
         for index in range(4)]
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(40))
  with pytest.raises(ValueError, match="divisible"):
    dataset.train_iter(10, seed=0, process_count=4)


# Preprocessing.


@pytest.mark.parametrize("size", [32, 5, (3, 12)])
def test_resize_matches_jax_image_resize(size):
  images = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
  height, width = (size, size) if isinstance(size, int) else size
  expected = jax.image.resize(images, (2, height, width, 3), "linear",
                              antialias=True)
  np.testing.assert_allclose(preprocess.resize(images, size), expected,
                             atol=1e-5)


def test_to_channels_and_normalize():
  gray = np.random.default_rng(0).random((2, 4, 4, 1), dtype=np.float32)
  rgb = preprocess.to_channels(gray, 3)
  assert rgb.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(preprocess.to_channels(rgb, 1), gray, atol=1e-6)
  normalized = preprocess.normalize(rgb, mean=(0.1, 0.2, 0.3),
                                    std=(0.5, 1.0, 2.0))
  np.testing.assert_allclose(normalized[..., 2], (gray[..., 0] - 0.3) / 2.0,
                             atol=1e-6)


def test_digits_train_batch_is_fast(digits_dataset):
  # The quickstart trains on 2 CPU cores; input must stay far below a step.
  iterator = digits_dataset.train_iter(128, seed=0)
  next(iterator)
  start = time.perf_counter()
  take(iterator, 50)
  assert (time.perf_counter() - start) / 50 < 0.01  # Typically ~0.5 ms.


# TFDS datasets, offline.


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  config = make_config("mnist")
  config.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.get_dataset(config)
  message = str(error.value)
  assert "'mnist'" in message and str(tmp_path) in message
  command = f"tfds build mnist --data_dir {tmp_path} --file_format array_record"
  assert command in message
  assert "array_record" in message


def test_unknown_dataset_suggests_close_names():
  with pytest.raises(data.UnknownDatasetError, match="'mnist'"):
    data.get_dataset(make_config("mnsit"))
  with pytest.raises(data.UnknownDatasetError, match="'digits'"):
    data.get_dataset(make_config("digit"))


def test_tfds_mnist_with_mock_data():
  config = make_config("mnist", random_crop_padding=2, flip=False)
  with tfds.testing.mock_data(num_examples=100):
    dataset = data.get_dataset(config)
    assert dataset.num_classes == 10
    assert dataset.num_train == 100 and dataset.num_eval == 100
    assert dataset.image_shape == (32, 32, 3)  # 28x28x1 resized, gray to RGB.

    stream = take(dataset.train_iter(32, seed=0), 8)  # 2.5 epochs.
    for batch in stream:
      assert batch["image"].shape == (32, 32, 32, 3)
      assert batch["image"].dtype == np.float32
      assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
    assert_batches_equal(take(dataset.train_iter(32, seed=0, start_step=5), 3),
                         stream[5:])
    halves = [dataset.train_batch(6, 32, seed=0, process_index=index,
                                  process_count=2) for index in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([half["image"] for half in halves]), stream[6]["image"])

    batches = list(dataset.eval_iter(48))
    assert len(batches) == 3
    mask = np.concatenate([batch["mask"] for batch in batches])
    assert mask.sum() == 100 and mask[:100].all()
    images = np.concatenate([batch["image"] for batch in batches])[mask]
    # Mock examples are random, so distinct images mean distinct examples.
    assert len(np.unique(images.reshape(100, -1), axis=0)) == 100
    source = tfds.data_source("mnist", split="test", download=False)
    np.testing.assert_array_equal(
        np.concatenate([batch["label"] for batch in batches])[mask],
        [source[index]["label"] for index in range(100)])


class VitjaxTestShapes(tfds.core.GeneratorBasedBuilder):
  """Grayscale PNGs of varying size; image i is the constant i."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(1, 41)),
            "test": self._generate_examples(range(101, 111))}

  def _generate_examples(self, values):
    for value in values:
      # PIL images are encoded with PIL, so generating needs no TensorFlow.
      pixels = np.full((10 + value % 7, 12 + value % 5), value, np.uint8)
      yield value, {"image": Image.fromarray(pixels), "label": value % 3}


def test_tfds_array_record_files_without_tensorflow(tmp_path):
  VitjaxTestShapes(data_dir=str(tmp_path), file_format="array_record"
                   ).download_and_prepare()
  config = make_config("vitjax_test_shapes", image_size=8, channels=1,
                       random_crop_padding=0, flip=False, mean=(0.0,),
                       std=(1.0,))
  config.data_dir = str(tmp_path)
  config.train_split = "train[:75%]"
  dataset = data.get_dataset(config)
  assert (dataset.num_train, dataset.num_eval) == (30, 10)
  assert dataset.num_classes == 3 and dataset.image_shape == (8, 8, 1)

  def values(batch):
    return np.round(batch["image"].mean(axis=(1, 2, 3)) * 255).astype(int)

  train = take(dataset.train_iter(10, seed=0), 3)  # One epoch.
  train_values = np.concatenate([values(batch) for batch in train])
  assert len(set(train_values)) == 30 and set(train_values) <= set(range(1, 41))
  np.testing.assert_array_equal(
      np.concatenate([batch["label"] for batch in train]), train_values % 3)
  (eval_batch,) = dataset.eval_iter(16)
  eval_values = values(eval_batch)[eval_batch["mask"]]
  assert sorted(eval_values) == list(range(101, 111))


# Bad records: a clear error naming the record, or skipped and counted.


class VitjaxTestCorrupt(tfds.core.GeneratorBasedBuilder):
  """Eight 6x6 RGB PNGs (image i is the constant 10 * i); example 3's bytes are junk."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=8),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for value in range(8):
      if value == 3:  # Stored as-is: the PNG header, then garbage.
        image = io.BytesIO(b"\x89PNG\r\n\x1a\n not an image")
      else:
        image = Image.fromarray(np.full((6, 6, 3), 10 * value, np.uint8))
      yield value, {"image": image, "label": value}


@pytest.fixture(scope="module")
def corrupt_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("corrupt"))
  VitjaxTestCorrupt(data_dir=data_dir, file_format="array_record"
                    ).download_and_prepare()
  return data_dir


def corrupt_config(data_dir, **input_overrides):
  config = make_config("vitjax_test_corrupt", image_size=6, random_crop_padding=0,
                       flip=False, **input_overrides)
  config.data_dir = data_dir
  config.eval_split = "train"
  return config


@pytest.mark.parametrize("inception_crop", [False, True])
def test_bad_image_error_names_dataset_split_and_record(corrupt_data_dir,
                                                        inception_crop):
  dataset = data.get_dataset(corrupt_config(corrupt_data_dir,
                                            inception_crop=inception_crop))
  with pytest.raises(data.BadImageError) as error:
    dataset.train_batch(0, 8, seed=0)  # One epoch: every record.
  message = str(error.value)
  assert "'vitjax_test_corrupt'" in message and "split 'train'" in message
  assert "skip_bad_images=True" in message
  record = int(message.split("record ")[1].split(" ")[0])
  source = tfds.data_source("vitjax_test_corrupt", split="train",
                            data_dir=corrupt_data_dir, download=False)
  assert source[(record + 1) % 8]["label"] >= 0  # Its neighbour reads fine.
  with pytest.raises(Exception):
    source[record]  # pylint: disable=pointless-statement


def test_bad_images_are_skipped_and_counted(corrupt_data_dir):
  dataset = data.get_dataset(corrupt_config(corrupt_data_dir,
                                            skip_bad_images=True))
  assert dataset.bad_images_skipped == 0
  batch = dataset.train_batch(0, 8, seed=0)
  assert dataset.bad_images_skipped == 1
  # Label 3 (the corrupt one) is replaced by the record after it, every time.
  assert 3 not in batch["label"] and len(set(batch["label"])) == 7
  images = (batch["image"] * 0.5 + 0.5) * 255  # Back from [-1, 1].
  np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 10 * batch["label"],
                             atol=0.01)
  assert_batches_equal([dataset.train_batch(0, 8, seed=0)], [batch])
  eval_labels = np.concatenate([b["label"] for b in dataset.eval_iter(8)])
  assert 3 not in eval_labels
  assert dataset.bad_images_skipped == 1  # The same record, counted once.


# Configs for real datasets: their pipelines on tfds.testing.mock_data.


@pytest.mark.parametrize("spec", [
    "configs/imagenet.py", "configs/finetune.py:dataset=cifar10",
    "configs/finetune.py:dataset=cifar100", "configs/finetune.py:dataset=pets",
    "configs/finetune.py:dataset=flowers102"])
def test_dataset_configs_on_mock_data(spec):
  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(spec)
  # Full resolution, tiny batches: every key the pipeline reads is exercised.
  config.input.num_threads = 0
  with tfds.testing.mock_data(num_examples=12):
    dataset = data.get_dataset(config)
    assert dataset.num_classes == config.model.num_classes
    size = config.input.image_size
    assert dataset.image_shape == (size, size, 3)
    stream = take(dataset.train_iter(4, seed=0), 2)
    assert_batches_equal([dataset.train_batch(1, 4, seed=0)], stream[1:])
    if dataset.device_fn is not None:  # What the train step makes of them.
      stream = [jax.tree_util.tree_map(np.asarray, dataset.device_fn(b)) for b in stream]
    for batch in stream:
      assert batch["image"].shape == (4, size, size, 3)
      assert np.isfinite(batch["image"]).all()
      if config.input.mixup_alpha or config.input.cutmix_alpha:
        assert batch["label"].shape == (4, dataset.num_classes)
      else:
        assert batch["label"].shape == (4,)
    eval_batch = next(dataset.eval_iter(4))
    assert eval_batch["image"].shape == (4, size, size, 3)
    assert eval_batch["label"].dtype == np.int32
