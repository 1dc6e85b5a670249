"""Multi-crop input (input.multicrop): DINO's crops, iBOT's and I-JEPA's masks.

Tiny digits crops (16 and 8 px) and small batches keep this file to a few seconds.
"""

import chex
import ml_collections
import numpy as np
import pytest

from vitjax import data
from vitjax.data import multicrop

# I-JEPA's recipe on 16 px digits: one global crop, no photometric augmentation, an 8x8 grid.
IJEPA = dict(global_crops=1, local_crops=0, global_scale=(0.3, 1.0), jitter_probability=0,
             grayscale_probability=0, blur=0, solarize=0, masks="ijepa", mask_patch_size=2)


def digits_config(multicrop_options=None, **input_overrides):
  options = dict(local_crops=2, local_size=8, masks="ibot", mask_patch_size=4)
  options.update(multicrop_options or {})
  input_config = dict(image_size=16, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                      multicrop=options)
  input_config.update(input_overrides)
  return ml_collections.ConfigDict(dict(dataset="digits", input=input_config))


@pytest.fixture(scope="module")
def ibot_digits():
  return data.get_dataset(digits_config())


@pytest.fixture(scope="module")
def ijepa_digits():
  return data.get_dataset(digits_config(IJEPA))


def assert_batches_equal(actual, expected):
  assert actual.keys() == expected.keys()
  for key in actual:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_training_batches_are_normalised_crops_and_eval_batches_images(ibot_digits):
  batch = ibot_digits.train_batch(0, 8, seed=0)
  assert set(batch) == {"global_crops", "local_crops", "label", "ibot_mask"}
  chex.assert_shape(batch["global_crops"], (8, 2, 16, 16, 3))
  chex.assert_shape(batch["local_crops"], (8, 2, 8, 8, 3))
  chex.assert_shape(batch["ibot_mask"], (8, 2, 16))  # (16 px / 4) ** 2 patches.
  chex.assert_shape(batch["label"], (8,))
  assert batch["global_crops"].dtype == batch["local_crops"].dtype == np.float32
  assert batch["ibot_mask"].dtype == bool and batch["label"].dtype == np.int32
  for key in ("global_crops", "local_crops"):
    # mean = std = 0.5: uint8 pixels p become p / 127.5 - 1, in [-1, 1].
    pixels = (batch[key] + 1) * 127.5
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    assert batch[key].min() >= -1 and batch[key].max() <= 1 and batch[key].std() > 0.1
  # The host finishes the batch; evaluation batches are plain images, as without multicrop.
  assert ibot_digits.device_fn is None
  assert ibot_digits.num_context_tokens is None and ibot_digits.multicrop.global_size == 16
  eval_batch = next(ibot_digits.eval_iter(8))
  assert set(eval_batch) == {"image", "label", "mask"}
  chex.assert_shape(eval_batch["image"], (8, 16, 16, 3))


def test_grayscale_images_and_no_local_crops():
  dataset = data.get_dataset(digits_config(
      dict(local_crops=0, global_crops=3, global_size=12, masks=None), channels=1,
      mean=(0.5,), std=(0.25,)))
  batch = dataset.train_batch(0, 4, seed=0)
  assert set(batch) == {"global_crops", "label"}
  chex.assert_shape(batch["global_crops"], (4, 3, 12, 12, 1))
  assert batch["global_crops"].min() >= -2 and batch["global_crops"].max() <= 2


def test_batches_depend_only_on_seed_and_step(ibot_digits):
  first = ibot_digits.train_batch(1, 8, seed=3)
  assert_batches_equal(ibot_digits.train_batch(1, 8, seed=3), first)
  assert not np.array_equal(ibot_digits.train_batch(1, 8, seed=4)["global_crops"],
                            first["global_crops"])
  # Resuming at step 2 yields what a run from step 0 yields from its third batch on,
  # whatever the threads.
  from_start = ibot_digits.train_iter(8, seed=3)
  run = [next(from_start) for _ in range(4)]
  from_start.close()
  threaded = data.get_dataset(digits_config(num_threads=2))
  resumed = threaded.train_iter(8, seed=3, start_step=2)
  assert_batches_equal(next(resumed), run[2])
  assert_batches_equal(next(resumed), run[3])
  resumed.close()
  assert_batches_equal(run[1], first)
  # Each of two hosts computes its half of the global batch.
  halves = [ibot_digits.train_batch(1, 8, seed=3, process_index=i, process_count=2)
            for i in range(2)]
  assert_batches_equal({k: np.concatenate([h[k] for h in halves]) for k in first}, first)


def test_ijepa_batches_have_fixed_token_counts(ijepa_digits):
  context_tokens, target_tokens = ijepa_digits.num_context_tokens, ijepa_digits.num_target_tokens
  # A function of the config only, computed again alike.
  multicrop.ijepa_token_counts.cache_clear()
  assert multicrop.ijepa_token_counts(ijepa_digits.multicrop) == (context_tokens,
                                                                 target_tokens)
  # The smallest target block on the 8x8 grid: 9 patches kept as 4x2 at aspect 1.5.
  assert target_tokens == 8 and 1 <= context_tokens < 49
  batch = ijepa_digits.train_batch(0, 16, seed=0)
  assert set(batch) == {"global_crops", "label", "context_index", "target_index"}
  chex.assert_shape(batch["global_crops"], (16, 1, 16, 16, 3))
  chex.assert_shape(batch["context_index"], (16, context_tokens))
  chex.assert_shape(batch["target_index"], (16, 4, target_tokens))
  assert batch["context_index"].dtype == batch["target_index"].dtype == np.int32
  for context, targets in zip(batch["context_index"], batch["target_index"]):
    for indices in (context, *targets):
      assert np.all(np.diff(indices) > 0) and 0 <= indices[0] and indices[-1] < 64
    assert not np.intersect1d(context, targets).size
  assert_batches_equal(ijepa_digits.train_batch(0, 16, seed=0), batch)


def test_smallest_target_block_on_ijepa_imagenet_grid():
  # 224 px, patch 16: 14x14. 29 patches at aspect in (1.43, 1.46) round to 6x4.
  config = multicrop.MulticropConfig(masks="ijepa", global_size=224)
  assert multicrop.ijepa_token_counts(config)[1] == 24


def boxes_mask(side, boxes):
  mask = np.zeros((side, side), bool)
  for top, left, height, width in boxes:
    mask[top:top + height, left:left + width] = True
  return mask


def test_ijepa_context_excludes_whole_target_blocks(ijepa_digits):
  config = ijepa_digits.multicrop
  counts = dict(context_tokens=ijepa_digits.num_context_tokens,
                target_tokens=ijepa_digits.num_target_tokens)
  rng = np.random.default_rng(0)
  for _ in range(200):
    draw = multicrop.ijepa_masks(rng, config, **counts)
    assert len({box[2:] for box in draw.target_boxes}) == 1  # One shape per example.
    for box, kept in zip(draw.target_boxes, draw.target_index):
      top, left, height, width = box
      assert height < 8 and width < 8 and top + height <= 8 and left + width <= 8
      assert height * width >= counts["target_tokens"]  # Truncated, never padded.
      assert boxes_mask(8, [box]).ravel()[kept].all()
    assert boxes_mask(8, [draw.context_box]).ravel()[draw.context_index].all()
    assert not boxes_mask(8, draw.target_boxes).ravel()[draw.context_index].any()


def test_ibot_masks_are_rectangles_of_the_drawn_ratio():
  rng = np.random.default_rng(0)
  for _ in range(300):
    ratio = rng.uniform(0.1, 0.5)
    mask, boxes = multicrop.block_mask(rng, 14, 14, ratio * 196)
    np.testing.assert_array_equal(mask, boxes_mask(14, boxes))
    assert all(1 <= h < 14 and 1 <= w < 14 for _, _, h, w in boxes)
    assert 1 <= mask.sum() <= ratio * 196
  config = multicrop.MulticropConfig(masks="ibot", global_size=224, global_crops=2)
  masks = np.concatenate([multicrop.ibot_masks(rng, config) for _ in range(400)])
  masked = masks.any(-1)
  assert 0.45 < 1 - masked.mean() < 0.55  # mask_probability 0.5.
  ratios = masks[masked].mean(-1)
  assert ratios.max() <= 0.5 and 0.25 < ratios.mean() < 0.32  # Uniform in (0.1, 0.5).


def test_batch_ibot_masks(ibot_digits):
  masks = ibot_digits.train_batch(0, 32, seed=1)["ibot_mask"]
  masked = masks.any(-1)
  assert 0.25 < masked.mean() < 0.75
  assert masks[masked].sum(-1).max() <= 0.5 * 16


@pytest.mark.parametrize("options, message", [
    (dict(local_crop=4), r"input.multicrop has no key 'local_crop' \(did you mean "
                         r"'local_crops'\?\); its keys: global_crops, "),
    (dict(jitter_probability=1.5), r"input.multicrop.jitter_probability=1.5 must be a "
                                   r"probability in \[0, 1\]"),
    (dict(global_scale=(0.5, 0.2)), r"global_scale=\(0.5, 0.2\) must be \(min, max\) "
                                    r"with 0 < min <= max <= 1"),
    (dict(local_scale=(0.0, 0.4)), "local_scale"),
    (dict(blur=(1.0, 0.1)), "blur=.* three probabilities"),
    (dict(solarize=-0.1), "solarize"),
    (dict(masks="beit"), r"masks='beit' must be one of None, 'ibot', 'ijepa'"),
    (dict(mask_patch_size=5), "global_size=16 is not a whole number of mask_patch_size=5"),
    (dict(global_size=18, masks="ijepa"), "global_size=18"),
    (dict(local_crops=-1), "local_crops=-1 must be an integer >= 0"),
])
def test_bad_multicrop_options_name_the_key(options, message):
  with pytest.raises(ValueError, match=message):
    data.get_dataset(digits_config(options))


@pytest.mark.parametrize("key, value", [
    ("mixup_alpha", 0.8), ("cutmix_alpha", 1.0), ("randaugment_ops", 2),
    ("random_erasing_prob", 0.25), ("repeated_augmentation", 3),
    ("packing", dict(seq_len=64)), ("inception_crop", True)])
def test_other_augmentations_do_not_combine_with_multicrop(key, value):
  message = f"input.multicrop and input.{key}.* do not combine.*Set input.{key}="
  with pytest.raises(ValueError, match=message):
    data.get_dataset(digits_config(**{key: value}))
