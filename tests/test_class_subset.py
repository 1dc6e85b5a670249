"""config.input.classes: train and evaluate on a subset of the labels, renumbered 0..K-1.

The experiment it serves: pre-train on the digits 0-4, adapt to the digits 5-9 with a
5-class head (`--config.input.classes='(5,6,7,8,9)' --config.model.num_classes=5`).
"""

import io
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vitjax import config as config_lib
from vitjax import data
from vitjax.data import digits
from vitjax.data import pipeline
from vitjax.train import validation

import cli_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
UPPER = (5, 6, 7, 8, 9)


def digits_config(classes, dataset="digits", **input_overrides):
  # image_size 8 and [0, 1] pixels: images compare with scikit-learn's as they are.
  input_config = dict(image_size=8, random_crop_padding=0, flip=False, mean=(0.0,),
                      std=(1.0,), channels=1, classes=classes)
  input_config.update(input_overrides)
  return ml_collections.ConfigDict(dict(dataset=dataset, data_dir=None,
                                        train_split="train", eval_split="test",
                                        input=input_config))


def one_pass(dataset, split):
  """(images, labels) of an ordered, unaugmented pass over `split` ('train' or 'eval')."""
  batches = list(dataset.eval_iter(512, split=split))
  mask = np.concatenate([b["mask"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[mask]
  return images, np.concatenate([b["label"] for b in batches])[mask]


@pytest.mark.parametrize("class_ids", [UPPER, (9, 0)])
def test_digits_keep_only_the_classes_renumbered_in_the_order_given(class_ids):
  dataset = data.get_dataset(digits_config(class_ids))
  assert dataset.num_classes == len(class_ids) and dataset.class_ids == class_ids
  for split, name in (("train", "train"), ("eval", "test")):
    images, labels = digits.load_digits(name)
    kept = np.isin(labels, class_ids)
    subset_images, subset_labels = one_pass(dataset, split)
    # Exactly the split's images of those labels, in the split's order ...
    assert len(subset_labels) == kept.sum() == (dataset.num_train if split == "train"
                                                else dataset.num_eval)
    np.testing.assert_array_equal(subset_images, images[kept])
    # ... label class_ids[k] as k: (9, 0) makes the nines 0 and the zeros 1.
    np.testing.assert_array_equal(subset_labels,
                                  [class_ids.index(label) for label in labels[kept]])
    assert np.bincount(subset_labels).tolist() == [
        int((labels == c).sum()) for c in class_ids]


def test_training_batches_and_mixed_targets_have_k_classes():
  dataset = data.get_dataset(digits_config(UPPER, random_crop_padding=1, flip=True))
  batch = next(dataset.train_iter(64, seed=0))
  assert batch["label"].min() >= 0 and batch["label"].max() < 5
  mixed = data.get_dataset(digits_config(UPPER, mixup_alpha=0.8)).train_batch(0, 16, seed=0)
  assert mixed["label"].shape == (16, 5)  # Soft targets over the K kept classes.


def test_none_keeps_every_label():
  dataset = data.get_dataset(digits_config(None))
  assert (dataset.num_classes, dataset.num_train, dataset.class_ids) == (10, 1437, None)


@pytest.mark.parametrize("value,problem", [
    ((), "input.classes=() is empty"),
    ((5, 6, 5), "input.classes=(5, 6, 5) repeats 5"),
    ((5, 10), "input.classes=(5, 10): dataset 'digits' has labels 0..9, not 10."),
    ((5.0, 6), "input.classes=(5.0, 6) holds 5.0: label ids are integers"),
    ("5,6", "input.classes='5,6' is not a sequence of label ids"),
    ((-1, 2), "input.classes=(-1, 2) holds -1: label ids are >= 0"),
])
def test_bad_values_name_the_key_and_the_fix(value, problem):
  with pytest.raises(ValueError) as error:
    data.get_dataset(digits_config(value))
  assert str(error.value).startswith(problem)
  assert "--config.input.classes='(5,6,7,8,9)'" in str(error.value)
  # The config check says the same, as a ConfigError (exit 2 on the command line).
  config = config_lib.load_config(QUICKSTART)
  with config.unlocked():
    config.input.classes = value
  with pytest.raises(config_lib.ConfigError) as checked:
    validation.check_dataset(config)
  assert str(checked.value).startswith(f"config.{problem}")


def test_a_split_without_those_labels_is_an_error():
  config = config_lib.apply_overrides(config_lib.load_config(QUICKSTART),
                                      ["input.classes=(9,)", "eval_split=test[:3]"])
  assert 9 not in digits.load_digits("test[:3]")[1]
  with pytest.raises(config_lib.ConfigError, match=r"split 'test\[:3\]' of dataset 'digits' "
                     "holds no image of these labels"):
    validation.check_dataset(config)


def test_model_num_classes_is_checked_against_k(tmp_path):
  config = config_lib.apply_overrides(config_lib.load_config(QUICKSTART),
                                      ["input.classes=(5,6,7,8,9)", "model.num_classes=3"])
  with pytest.raises(config_lib.ConfigError) as error:
    validation.check_dataset(config)
  assert str(error.value) == (
      "config.model.num_classes=3 but config.input.classes=(5, 6, 7, 8, 9) keeps 5 classes "
      "of dataset 'digits': labels >= 3 would have no logit. Set "
      "--config.model.num_classes=5.")
  # A head of K classes (the adaptation run) passes every check, and so does a wider one.
  for num_classes in (5, 10):
    config = config_lib.apply_overrides(
        config_lib.load_config(QUICKSTART),
        ["input.classes=(5,6,7,8,9)", f"model.num_classes={num_classes}"])
    validation.validate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_tfds_datasets_are_refused(monkeypatch):
  with pytest.raises(pipeline.ClassesError, match="TFDS dataset 'mnist' cannot keep a subset"):
    data.get_dataset(digits_config(UPPER, dataset="mnist"))
  monkeypatch.setattr(validation, "_check_tfds", lambda *args: 10)  # As if prepared.
  config = config_lib.apply_overrides(config_lib.load_config(QUICKSTART),
                                      ["dataset=mnist", "input.classes=(5,6)"])
  with pytest.raises(config_lib.ConfigError, match=r"^config.input.classes=\(5, 6\): TFDS "
                     r"dataset 'mnist'.*--config.input.classes=None"):
    validation.check_dataset(config)


# Datasets read from disk: an index filter over the labels they list.


def png(level):
  encoded = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), level, np.uint8)).save(encoded, format="PNG")
  return encoded.getvalue()


def level_of(images):
  return np.round(images.mean(axis=(1, 2, 3)) * 255).astype(int)


def disk_config(dataset, **input_overrides):
  input_config = dict(image_size=4, random_crop_padding=0, mean=(0.0,), std=(1.0,),
                      channels=3, classes=(2, 0))
  input_config.update(input_overrides)
  return ml_collections.ConfigDict(dict(dataset=dataset, data_dir=None, train_split="train",
                                        eval_split="val", input=input_config))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """train/{ant,cat,dog}/ with 2 images each (image k has level 10k + 5), val/ with 1 each."""
  root = tmp_path_factory.mktemp("folder")
  for split, count in (("train", 2), ("val", 1)):
    k = 0
    for name in ("ant", "cat", "dog"):
      os.makedirs(root / split / name)
      for i in range(count):
        (root / split / name / f"{i}.png").write_bytes(png(10 * k + 5))
        k += 1
  return root


def test_image_folder_subset_and_class_names(image_folder):
  dataset = data.get_dataset(disk_config(f"folder:{image_folder}"))
  assert (dataset.num_classes, dataset.num_train, dataset.num_eval) == (2, 4, 2)
  assert dataset.classes == ["dog", "ant"]
  images, labels = one_pass(dataset, "train")
  np.testing.assert_array_equal(level_of(images), [5, 15, 45, 55])  # ant, ant, dog, dog.
  np.testing.assert_array_equal(labels, [1, 1, 0, 0])
  assert next(dataset.train_iter(4, seed=0))["label"].max() < 2
  config = disk_config(f"folder:{image_folder}", classes=(0, 3))
  with pytest.raises(config_lib.ConfigError, match=r"^config.input.classes=\(0, 3\): dataset "
                     "'folder:.*' has labels 0..2, not 3."):
    validation.check_dataset(config)


def test_bad_images_are_replaced_within_the_subset(tmp_path):
  for k, name in enumerate(("ant", "cat", "dog")):
    os.makedirs(tmp_path / "train" / name)
    os.makedirs(tmp_path / "val" / name)
    (tmp_path / "val" / name / "0.png").write_bytes(png(10 * k + 5))
    (tmp_path / "train" / name / "0.png").write_bytes(b"\x89PNG junk" if k == 0 else png(7))
  dataset = data.get_dataset(disk_config(f"folder:{tmp_path}", classes=(0, 2),
                                         skip_bad_images=True))
  _, labels = one_pass(dataset, "train")
  np.testing.assert_array_equal(labels, [1, 1])  # The bad ant is replaced by a dog, not a cat.
  assert dataset.bad_images_skipped == 1


def test_webdataset_subset(tmp_path):
  with tarfile.open(tmp_path / "0.tar", "w") as tar:
    for k in range(6):
      for extension, payload in (("png", png(10 * k + 5)), ("cls", str(k % 3).encode())):
        info = tarfile.TarInfo(f"{k:04d}.{extension}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
  config = disk_config(f"wds:{tmp_path}/0.tar")
  config.eval_split = "train[:50%]"
  dataset = data.get_dataset(config)
  assert (dataset.num_classes, dataset.num_train, dataset.num_eval) == (2, 4, 2)
  images, labels = one_pass(dataset, "eval")  # Samples 0..2 have labels 0, 1, 2.
  np.testing.assert_array_equal(level_of(images), [5, 25])
  np.testing.assert_array_equal(labels, [1, 0])


def test_cli_rejects_a_bad_value_with_one_line_and_writes_nothing(tmp_path):
  cli_checks.assert_train_rejects(
      "configs/quickstart.py", "input.classes=(5,10)", tmp_path / "w",
      contains="error: config.input.classes=(5, 10): dataset 'digits' has labels 0..9, not 10.")
