"""NaViT's packed input pipeline: first-fit packing, deterministic and resumable batches."""

import json

import chex
import ml_collections
import numpy as np
import pytest

from vitjax import config as config_lib
from vitjax import data
from vitjax.data import packing
from vitjax.models import navit

import cli_checks


def _config(**packing_options):
  config = config_lib.load_config("configs/quickstart.py")
  config.unlock()
  config.input.random_crop_padding = 0
  config.input.packing = ml_collections.ConfigDict(dict(seq_len=64, max_images=8, **packing_options))
  config.batch_size = 8
  return config


def test_unpack_gives_back_the_images_packed():
  rng = np.random.default_rng(1)
  images = [rng.normal(size=shape).astype(np.float32) for shape in
            [(8, 12, 3), (4, 4, 3), (12, 4, 3)]]
  examples = [navit.patchify(image, 4) for image in images]
  placements = navit.first_fit([len(e[0]) for e in examples], 8, 2, 4)
  assert placements == [(0, 0), (0, 1), (1, 0)]
  image = navit.pack_examples(examples, placements, length=8, max_images=4, num_sequences=2)
  unpacked = packing.unpack(image, 0, 4) + packing.unpack(image, 1, 4)
  chex.assert_trees_all_equal(unpacked, images)


def test_first_fit_takes_the_first_sequence_with_room_and_a_slot():
  placements = navit.first_fit([5, 4, 3, 2, 6, 1], length=8, num_sequences=2, max_images=2)
  # 5 -> seq 0; 4 -> seq 1; 3 -> seq 0 (full: 8); 2 -> seq 1; 6 fits nowhere; 1: no slot left.
  assert placements == [(0, 0), (1, 0), (0, 1), (1, 1), None, None]


def test_token_budget_keeps_the_aspect_ratio():
  assert packing.fit_grid(6, 3, None) == (6, 3)
  assert packing.fit_grid(20, 10, 50) == (10, 5)
  rows, cols = packing.fit_grid(100, 1, 16)
  assert rows * cols <= 16 and cols == 1


def test_packed_batches_are_deterministic_resumable_and_hold_each_image_whole():
  config = _config(resolution=(8, 24), token_drop_rate=(0.0, 0.5))
  dataset = data.get_dataset(config)
  batch = dataset.train_batch(5, 8, seed=3)
  again = dataset.train_batch(5, 8, seed=3)
  chex.assert_trees_all_equal(batch, again)
  iterator = dataset.train_iter(8, seed=3, start_step=5)
  resumed = next(iterator)
  iterator.close()
  resumed.pop("_skipped", None)
  batch.pop("_skipped", None)
  chex.assert_trees_all_equal(resumed, batch)
  assert not np.array_equal(dataset.train_batch(6, 8, seed=3)["label"], batch["label"])

  image = batch["image"]
  chex.assert_shape([image["patches"], image["segment_ids"], image["coords"],
                     image["grid_sizes"], batch["label"], batch["mask"]],
                    [(8, 64, 48), (8, 64), (8, 64, 2), (8, 8, 2), (8, 8), (8, 8)])
  assert batch["mask"].sum() > 8  # Several images per sequence.
  for sequence in range(8):
    ids = image["segment_ids"][sequence]
    slots = np.flatnonzero(batch["mask"][sequence])
    for slot in slots:
      tokens = np.flatnonzero(ids == slot + 1)
      assert len(tokens) and np.all(np.diff(tokens) == 1)  # One contiguous run per image.
      rows, cols = image["grid_sizes"][sequence, slot]
      assert 2 <= rows <= 6 and 2 <= cols <= 6  # 8-24 px in 4 px patches.
      coords = image["coords"][sequence, tokens]
      assert np.all(coords < [rows, cols]) and len(np.unique(coords, axis=0)) == len(tokens)
      assert len(tokens) >= rows * cols * 0.5 - 1  # At most half dropped.
    assert np.all(ids[ids > 0] <= len(slots))  # No token of an empty slot.
    assert np.all(image["patches"][sequence][ids == 0] == 0)


def test_every_image_is_packed_once_for_evaluation_at_its_own_size():
  dataset = data.get_dataset(_config(eval_size=12))
  labels, count = [], 0
  for batch in dataset.eval_iter(4):
    labels.extend(batch["label"][batch["mask"]].tolist())
    count += 1
    grids = batch["image"]["grid_sizes"][batch["mask"]]
    assert np.all(grids == 3)  # eval_size 12 in 4 px patches.
  assert len(labels) == dataset.num_eval
  assert count == -(-dataset.num_eval // 28)  # 7 grids of 9 tokens in 64; 4 sequences a batch.
  expected = data.get_dataset(config_lib.load_config("configs/quickstart.py"))
  assert labels == [int(label) for batch in expected.eval_iter(360)
                    for label in batch["label"][batch["mask"]]]


@pytest.mark.parametrize("options, message", [
    (dict(seq_len=64, max_tokens=65), "max_tokens=65 must be in"),
    (dict(resolution=(2, 16)), "resolution"),
    (dict(token_drop_rate=1.0), "token_drop_rate"),
    (dict(seq_lenght=64), "has no key 'seq_lenght'"),
])
def test_bad_packing_options_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    packing.PackingConfig.from_config(options, patch_size=4)


def test_a_navit_trains_on_packed_digits_and_logs_the_packing(tmp_path):
  from vitjax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/navit_digits.py:steps=4,drop_max=0.5")
  config.unlock()
  del config.model["variant"]
  config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4)
  config_lib.apply_overrides(config, ["batch_size=4", "eval_batch_size=16", "log_every=2",
                                      "eval_every=4", "checkpoint_every=4"])
  result = train.train(config, tmp_path / "run", progress=False)
  assert 0 <= result["eval/top1"] <= 1
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  logged = [row for row in rows if "train/packed_images" in row]
  assert len(logged) == 2
  for row in logged:
    # 4 sequences of 64 tokens; 8-24 px digits of 4-36 tokens, up to half of them dropped.
    assert 4 <= row["train/packed_images"] <= 32
    assert 0 <= row["train/padding_fraction"] < 0.5


def test_a_packing_option_out_of_range_exits_2(tmp_path):
  cli_checks.assert_train_rejects(
      "configs/navit_digits.py", "input.packing.max_tokens=65", tmp_path / "run",
      starts_with="error: config.input.packing.max_tokens=65 must be in [1, seq_len=64]")
