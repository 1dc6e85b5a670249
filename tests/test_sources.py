"""Image folders and WebDataset shards: labels, order, determinism, bad records, captions.

Every folder and shard is generated here: small PNGs of a constant grey level that
tells which image a batch holds (image k of the split has level 10 * k + 5).
"""

import io
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vitjax import data
from vitjax.data import folder as folder_lib
from vitjax.data import webdataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("dog", "ant", "cat")  # Sorted: ant=0, cat=1, dog=2.
SIZES = ((6, 9), (9, 6), (7, 7))  # (height, width): any size and aspect ratio.


def png_bytes(level, size):
  image = Image.fromarray(np.full(size + (3,), level, np.uint8))
  encoded = io.BytesIO()
  image.save(encoded, format="PNG")
  return encoded.getvalue()


def level_of(image_in_01):
  return np.round(np.asarray(image_in_01).mean(axis=(-3, -2, -1)) * 255).astype(int)


def make_folder(root, per_class=4, corrupt=None):
  """root/{train,val}/CLASS/NN.png; train image k (in ImageFolder order) has level 10k+5."""
  for split, count in (("train", per_class), ("val", 2)):
    k = 0
    for name in sorted(CLASSES):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        path = os.path.join(root, split, name, f"{i:02d}.png")
        with open(path, "wb") as f:
          f.write(b"\x89PNG\r\n\x1a\n junk" if (split, k) == corrupt
                  else png_bytes(10 * k + 5, SIZES[i % 3]))
        k += 1
  with open(os.path.join(root, "train", "ant", "notes.txt"), "w") as f:
    f.write("not an image")  # Ignored, as ImageFolder ignores it.
  return root


def folder_config(path, **input_overrides):
  input_config = dict(image_size=6, random_crop_padding=0, flip=False, mean=(0.0,),
                      std=(1.0,), channels=3)
  input_config.update(input_overrides)
  return ml_collections.ConfigDict(dict(
      dataset=f"folder:{path}", data_dir=None, train_split="train", eval_split="val",
      input=input_config))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  return make_folder(str(tmp_path_factory.mktemp("folder")))


def test_folder_labels_follow_imagefolder_order(image_folder):
  dataset = data.get_dataset(folder_config(image_folder))
  assert (dataset.num_classes, dataset.num_train, dataset.num_eval) == (3, 12, 6)
  assert dataset.classes == ["ant", "cat", "dog"]
  (batch,) = list(dataset.eval_iter(6, split="train"))[:1]
  # Unaugmented pass in order: image k of class k // 4, level 10k + 5, any shape -> 6x6.
  assert batch["image"].shape == (6, 6, 6, 3)
  np.testing.assert_array_equal(level_of(batch["image"]), 10 * np.arange(6) + 5)
  np.testing.assert_array_equal(batch["label"], np.arange(6) // 4)


def test_folder_batches_are_deterministic_resumable_and_host_sharded(image_folder):
  config = folder_config(image_folder, inception_crop=True, flip=True)
  dataset = data.get_dataset(config)
  iterator = dataset.train_iter(4, seed=3)
  batches = [next(iterator) for _ in range(5)]
  resumed = dataset.train_iter(4, seed=3, start_step=3)
  for expected in batches[3:]:
    actual = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(actual[key], expected[key])
  halves = [dataset.train_batch(3, 4, seed=3, process_index=i, process_count=2)
            for i in range(2)]
  for key in batches[3]:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[3][key])
  # An epoch (12 examples = 3 batches) sees every image once.
  epoch = np.concatenate([b["label"] for b in batches[:3]])
  assert np.bincount(epoch, minlength=3).tolist() == [4, 4, 4]


def test_folder_slices_and_split_aliases(image_folder):
  config = folder_config(image_folder)
  config.train_split, config.eval_split = "train[:75%]", "train[75%:]"
  dataset = data.get_dataset(config)
  assert (dataset.num_train, dataset.num_eval) == (9, 3)
  config.eval_split = "validation"  # TFDS's name for ImageNet's val: the folder is 'val'.
  assert data.get_dataset(config).num_eval == 6


def test_folder_errors_name_the_problem_and_the_fix(image_folder, tmp_path):
  config = folder_config(image_folder)
  config.eval_split = "test"
  with pytest.raises(folder_lib.FolderError, match=r"no split folder 'test'.*\['train', 'val'\]"):
    data.get_dataset(config)
  with pytest.raises(folder_lib.FolderError, match="does not exist"):
    data.get_dataset(folder_config(str(tmp_path / "nowhere")))
  with pytest.raises(folder_lib.FolderError, match="config.input.image_size"):
    data.get_dataset(folder_config(image_folder, image_size=None))
  os.makedirs(tmp_path / "odd" / "train" / "a")
  os.makedirs(tmp_path / "odd" / "val" / "zebra")
  Image.new("RGB", (4, 4)).save(tmp_path / "odd" / "train" / "a" / "x.jpg")
  with pytest.raises(folder_lib.FolderError, match=r"training split lacks: \['zebra'\]"):
    data.get_dataset(folder_config(str(tmp_path / "odd")))


def test_folder_bad_image_is_named_or_skipped_and_counted(tmp_path):
  root = make_folder(str(tmp_path), corrupt=("train", 5))
  dataset = data.get_dataset(folder_config(root))
  with pytest.raises(data.BadImageError, match=r"cat/01.png.*skip_bad_images=True"):
    dataset.train_batch(0, 12, seed=0)
  dataset = data.get_dataset(folder_config(root, skip_bad_images=True,
                                           inception_crop=True))
  labels = np.concatenate([b["label"] for b in
                           [next(dataset.train_iter(12, seed=0))]])
  assert len(labels) == 12 and dataset.bad_images_skipped == 1


# WebDataset shards.


def add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_shards(directory, num_shards=3, per_shard=4, captions="txt"):
  """img2dataset-style shards 00000.tar ...; sample k has level 10k+5, class k % 3."""
  os.makedirs(directory, exist_ok=True)
  k = 0
  for shard in range(num_shards):
    with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as tar:
      for _ in range(per_shard):
        key = f"{shard:05d}{k:04d}"
        add(tar, f"{key}.jpg" if k % 2 else f"{key}.png", png_bytes(10 * k + 5, SIZES[k % 3]))
        add(tar, f"{key}.cls", str(k % 3).encode())
        if captions == "txt":
          add(tar, f"{key}.txt", f"a photo number {k}".encode())
        else:
          add(tar, f"{key}.json", f'{{"caption": "a photo number {k}", "key": "{key}"}}'
              .encode())
        k += 1
  return os.path.join(directory, "{00000..%05d}.tar" % (num_shards - 1))


def test_brace_patterns_expand_like_webdataset():
  assert webdataset.expand_braces("a{00..02}b{x,y}") == [
      "a00bx", "a00by", "a01bx", "a01by", "a02bx", "a02by"]


def test_webdataset_samples_labels_and_captions(tmp_path):
  pattern = make_shards(str(tmp_path), captions="json")
  config = folder_config("unused")
  config.dataset, config.train_split, config.eval_split = (
      f"wds:{pattern}", "train[:75%]", "train[75%:]")
  dataset = data.get_dataset(config)
  assert (dataset.num_classes, dataset.num_train, dataset.num_eval) == (3, 9, 3)
  batch = next(dataset.eval_iter(3))
  np.testing.assert_array_equal(level_of(batch["image"]), 10 * np.arange(9, 12) + 5)
  np.testing.assert_array_equal(batch["label"], np.arange(9, 12) % 3)
  dataset.with_captions = True
  batch = dataset.train_batch(0, 4, seed=0)
  ids = (level_of(batch["image"]) - 5) // 10
  assert list(batch["caption"]) == [f"a photo number {k}" for k in ids]


def test_truncated_shard_is_named_or_its_samples_counted(tmp_path):
  pattern = make_shards(str(tmp_path))
  last = os.path.join(tmp_path, "00002.tar")
  with tarfile.open(last) as tar:
    image = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))][-1]
  os.truncate(last, image.offset_data + image.size // 2)  # Cut inside the last image.
  config = folder_config("unused")
  config.dataset, config.eval_split = f"wds:{pattern}", "train"
  with pytest.raises(data.BadImageError, match=r"00002.tar' is truncated.*skip_bad_images"):
    data.get_dataset(config)
  config.input.skip_bad_images = True
  dataset = data.get_dataset(config)
  assert dataset.num_train < 12 and dataset.bad_images_skipped == 12 - dataset.num_train


def test_no_shards_is_a_clear_error(tmp_path):
  config = folder_config("unused")
  config.dataset, config.eval_split = f"wds:{tmp_path}/*.tar", "train"
  with pytest.raises(webdataset.ShardError, match="No WebDataset shards match"):
    data.get_dataset(config)


def test_folder_trains_through_the_cli_with_the_imagenet_config(tmp_path):
  """configs/imagenet.py's recipe (RandAugment, Mixup, erasing) on a generated folder."""
  root = make_folder(str(tmp_path / "data"), per_class=6)
  command = [
      sys.executable, "-m", "vitjax.train", "--config", "configs/imagenet.py:batch_size=8",
      "--workdir", str(tmp_path / "run"), f"--config.dataset=folder:{root}",
      "--config.model.variant=mu/4", "--config.model.image_size=16",
      "--config.model.num_classes=3", "--config.input.image_size=16",
      "--config.model.dtype=float32", "--config.total_steps=3", "--config.eval_every=3",
      "--config.eval_batch_size=6", "--config.optimizer.warmup_steps=1",
      "--config.input.num_workers=2", "--config.input.repeated_augmentation=3",
      "--no_progress"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval/top1" in open(tmp_path / "run" / "metrics.jsonl").read()
  assert not result.stderr.strip(), result.stderr  # The worker processes end quietly.


def test_lit_trains_on_webdataset_captions_through_the_cli(tmp_path):
  """img2dataset-style shards of digits with .txt captions and .cls labels: LiT reads both."""
  from vitjax.data import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.load_digits("train")
  names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
  os.makedirs(tmp_path / "shards")
  for shard in range(2):
    with tarfile.open(tmp_path / "shards" / f"{shard:05d}.tar", "w") as tar:
      for k in range(shard * 40, shard * 40 + 40):
        pixels = np.repeat(np.round(images[k] * 255).astype(np.uint8), 3, axis=-1)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="PNG")
        add(tar, f"{k:06d}.png", encoded.getvalue())
        add(tar, f"{k:06d}.txt", f"a photo of the digit {names[labels[k]]}.".encode())
        add(tar, f"{k:06d}.cls", str(labels[k]).encode())
  command = [
      sys.executable, "-m", "vitjax.train", "--config", "configs/lit_digits.py:steps=2,locked=False",
      "--workdir", str(tmp_path / "run"),
      f"--config.dataset=wds:{tmp_path}/shards/{{00000..00001}}.tar",
      "--config.train_split=train[:80%]", "--config.eval_split=train[80%:]",
      "--config.init=None", "--config.batch_size=8", "--config.eval_batch_size=16",
      "--config.model.text.depth=1", "--config.model.text.width=32",
      "--config.model.text.mlp_dim=64", "--no_progress"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "zeroshot_top1" in result.stdout and "i2t_recall@1" in result.stdout


def test_worker_processes_and_threads_make_the_same_batches(image_folder):
  config = folder_config(image_folder, inception_crop=True, flip=True, randaugment_ops=2,
                         mixup_alpha=0.8, random_erasing_prob=0.5, num_threads=2)
  expected = [data.get_dataset(config).train_batch(step, 4, seed=1) for step in (2, 3, 4)]
  config.input.num_workers = 2
  iterator = data.get_dataset(config).train_iter(4, seed=1, start_step=2)
  for batch in expected:
    actual = next(iterator)
    assert actual.keys() == batch.keys()
    for key in batch:
      np.testing.assert_array_equal(actual[key], batch[key], err_msg=key)


def test_repeated_augmentation_repeats_each_image_in_a_row_augmented_apart():
  positions = np.arange(12)
  indices = data.shuffled_indices(positions, seed=0, num_examples=12, repeats=3)
  assert (indices.reshape(4, 3) == indices[::3, None]).all()  # Each index 3 times in a row.
  assert len(set(indices)) == 4  # An epoch keeps its length: a third of the images.
  plain = data.shuffled_indices(positions, seed=0, num_examples=12)
  np.testing.assert_array_equal(indices[::3], plain[:4])  # The epoch's permutation, in order.
  digits_config = ml_collections.ConfigDict(dict(dataset="digits", input=dict(
      image_size=16, inception_crop=True, flip=True, repeated_augmentation=3)))
  dataset = data.get_dataset(digits_config)
  batch = dataset.train_batch(0, 6, seed=0)
  assert (batch["label"].reshape(2, 3) == batch["label"][::3, None]).all()
  assert not np.array_equal(batch["image"][0], batch["image"][1])  # Augmented apart.


def test_throughput_tool_measures_the_folder_it_writes(tmp_path, capsys):
  from vitjax.data import throughput  # pylint: disable=g-import-not-at-top
  rows = throughput.main(["--config", "configs/imagenet.py", "--jpegs", "16",
                          "--jpeg_dir", str(tmp_path), "--batch_size", "4", "--steps", "2",
                          "--workers", "1", "--config.input.image_size=32"])
  assert [(kind, workers) for kind, workers, _ in rows] == [
      ("vitjax threads", 1), ("vitjax processes", 1)]
  assert all(rate > 0 for _, _, rate in rows)
  assert "per worker" in capsys.readouterr().out
  assert len(os.listdir(tmp_path / "train")) == 16  # 16 images in 16 of the 100 classes.


def test_vitjax_and_the_digits_pipeline_never_import_tensorflow_datasets():
  code = (
      "import sys, vitjax, vitjax.train\n"
      "from vitjax import config, data\n"
      "from vitjax.train import validation\n"
      "c = config.load_config('configs/quickstart.py')\n"
      "validation.check_dataset(c)\n"
      "next(data.get_dataset(c).train_iter(8, seed=0))\n"
      "assert 'tensorflow_datasets' not in sys.modules\n"
      "data.UnknownDatasetError  # The TFDS errors load the TFDS reader when asked for.\n"
      "assert 'tensorflow_datasets' in sys.modules\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
