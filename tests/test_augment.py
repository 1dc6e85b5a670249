"""Training augmentation: timm's semantics, deterministic by (seed, step, position).

Tiny digits batches (16 px) keep this file to a few seconds.
"""

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vitjax import data
from vitjax.data import augment
from vitjax.data import preprocess

FULL_AUGMENTATION = dict(
    inception_crop=True, flip=True, randaugment_ops=2, randaugment_magnitude=9.0,
    randaugment_magnitude_std=0.5, randaugment_increasing=True, mixup_alpha=0.8,
    cutmix_alpha=1.0, random_erasing_prob=0.25)


def digits_config(**input_overrides):
  input_config = dict(image_size=16, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
  input_config.update(input_overrides)
  return ml_collections.ConfigDict(dict(dataset="digits", input=input_config))


@pytest.fixture(scope="module")
def augmented_digits():
  return data.get_dataset(digits_config(**FULL_AUGMENTATION))


def finished(dataset, batch):
  """The batch the train step trains on: `dataset.device_fn` applied (if any), as numpy."""
  if dataset.device_fn is None:
    return batch
  return {key: np.asarray(value) for key, value in dataset.device_fn(batch).items()}


def assert_batches_equal(actual, expected):
  assert actual.keys() == expected.keys()
  for key in actual:
    np.testing.assert_array_equal(actual[key], expected[key])


def test_full_augmentation_is_deterministic_and_resumable(augmented_digits):
  stream = [batch for _, batch in zip(range(4), augmented_digits.train_iter(
      16, seed=7))]
  for step, batch in enumerate(stream):
    assert batch["image"].shape == (16, 16, 16, 3)
    assert batch["image"].dtype == np.uint8  # Normalized, erased and mixed on the device.
    assert_batches_equal(augmented_digits.train_batch(step, 16, seed=7), batch)
    batch = finished(augmented_digits, batch)
    assert batch["image"].dtype == np.float32
    # Mixup / CutMix turn labels into soft targets over the 10 classes.
    assert batch["label"].shape == (16, 10)
    np.testing.assert_allclose(batch["label"].sum(-1), 1.0, rtol=1e-6)
  resumed = next(augmented_digits.train_iter(16, seed=7, start_step=3))
  assert_batches_equal(resumed, stream[3])
  other_seed = augmented_digits.train_batch(0, 16, seed=8)
  assert not np.array_equal(other_seed["image"], stream[0]["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_together_make_the_single_host_batch(augmented_digits,
                                                   process_count):
  whole = augmented_digits.train_batch(5, 16, seed=0)
  parts = [augmented_digits.train_batch(5, 16, seed=0, process_index=index,
                                        process_count=process_count)
           for index in range(process_count)]
  for key in ("image", "label"):
    np.testing.assert_array_equal(
        np.concatenate([part[key] for part in parts]), whole[key])


def test_augmentation_changes_images_but_not_unaugmented_passes():
  plain = data.get_dataset(digits_config())
  augmented = data.get_dataset(digits_config(
      **{**FULL_AUGMENTATION, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}))
  plain_batch = plain.train_batch(2, 32, seed=0)
  augmented_batch = finished(augmented, augmented.train_batch(2, 32, seed=0))
  np.testing.assert_array_equal(augmented_batch["label"], plain_batch["label"])
  changed = np.any(augmented_batch["image"] != plain_batch["image"], axis=(1, 2, 3))
  assert changed.mean() > 0.9
  assert np.abs(augmented_batch["image"]).max() < 10  # Normalized, not [0, 255].
  assert_batches_equal(next(augmented.eval_iter(64)), next(plain.eval_iter(64)))


@pytest.mark.parametrize("mode", ["const", "pixel"])
def test_device_preprocessing_equals_the_host_path(mode):
  """uint8 on the host + normalize / erase / mix in the step = all of it on the host."""
  options = {**FULL_AUGMENTATION, "random_erasing_prob": 0.5, "random_erasing_mode": mode}
  on_device = data.get_dataset(digits_config(**options))
  on_host = data.get_dataset(digits_config(**options, device_preprocess=False))
  assert on_host.device_fn is None
  for step in range(6):  # Mixup and CutMix batches both.
    host = on_host.train_batch(step, 16, seed=1)
    device = finished(on_device, on_device.train_batch(step, 16, seed=1))
    np.testing.assert_allclose(device["label"], host["label"], atol=1e-6)
    if mode == "const":
      np.testing.assert_allclose(device["image"], host["image"], atol=1e-5)
    else:  # Same boxes, noise from another generator: equal outside the boxes only.
      differs = np.any(device["image"] != host["image"], axis=-1)
      assert differs.mean() < 0.5


def labelled_constant_images(num_examples, size=12):
  """Image i is the constant i (so pixels reveal their source), label i."""
  values = np.arange(num_examples, dtype=np.float32)
  images = np.broadcast_to(values[:, None, None, None],
                           (num_examples, size, size, 3)).copy()
  return images, np.arange(num_examples)


def test_mixup_blends_neighbours_and_their_labels():
  images, labels = labelled_constant_images(6)
  mixed, targets = augment.mix_batch(images, labels, 6, lam=0.7)
  partner = np.array([1, 0, 3, 2, 5, 4])
  np.testing.assert_allclose(mixed[:, 0, 0, 0], 0.7 * labels + 0.3 * partner,
                             rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0)
  np.testing.assert_allclose(targets[np.arange(6), labels], 0.7)
  np.testing.assert_allclose(targets[np.arange(6), partner], 0.3)
  with pytest.raises(ValueError, match="even"):
    augment.mix_batch(images[:5], labels[:5], 6, lam=0.5)


def test_cutmix_lambda_is_the_area_each_image_keeps():
  rng = np.random.default_rng(0)
  images, labels = labelled_constant_images(4, size=12)
  for _ in range(30):
    lam, use_cutmix = augment.mixup_parameters(rng, mixup_alpha=0.0,
                                               cutmix_alpha=1.0)
    assert use_cutmix
    box, corrected = augment.cutmix_box(rng, lam, 12, 12)
    mixed, targets = augment.mix_batch(images, labels, 4, lam=corrected, box=box)
    own_share = (mixed == images).all(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(own_share, corrected, atol=1e-6)
    np.testing.assert_allclose(targets[np.arange(4), labels], corrected, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_mixup_switch_and_probability():
  rng = np.random.default_rng(0)
  draws = [augment.mixup_parameters(rng, mixup_alpha=0.8, cutmix_alpha=1.0,
                                    switch_probability=0.5) for _ in range(400)]
  cutmix_share = np.mean([use_cutmix for _, use_cutmix in draws])
  assert 0.4 < cutmix_share < 0.6
  assert all(0.0 <= lam <= 1.0 for lam, _ in draws)
  unmixed = augment.mixup_parameters(rng, mixup_alpha=0.8, cutmix_alpha=0.0,
                                     probability=0.0)
  assert unmixed == (1.0, False)


def test_inception_crop_boxes_stay_within_scale_and_ratio():
  rng = np.random.default_rng(0)
  height, width = 300, 400
  areas, ratios = [], []
  for _ in range(2000):
    top, left, crop_height, crop_width = augment.inception_crop_box(
        rng, height, width)
    assert 0 <= top and top + crop_height <= height
    assert 0 <= left and left + crop_width <= width
    areas.append(crop_height * crop_width / (height * width))
    ratios.append(crop_width / crop_height)
  areas, ratios = np.array(areas), np.array(ratios)
  # Rounding to whole pixels moves the bounds by a little.
  assert areas.min() > 0.075 and areas.max() <= 1.0
  assert ratios.min() > 0.74 and ratios.max() < 1.35
  # Uniform in (0.08, 1) would average 0.54; boxes too wide or tall for a
  # 4:3 image are redrawn, which favours small ones.
  assert 0.40 < areas.mean() < 0.47
  assert 0.95 < np.exp(np.log(ratios).mean()) < 1.05  # Log-uniform ratio.


def test_inception_crop_falls_back_to_a_centred_crop():
  rng = np.random.default_rng(0)
  # So wide that no sampled box fits: the largest centred crop of ratio 4/3.
  assert augment.inception_crop_box(rng, 10, 1000) == (0, 493, 10, 13)
  assert augment.inception_crop_box(rng, 1000, 10) == (493, 0, 13, 10)
  # Within the ratios, and no area fits: the whole image.
  assert augment.inception_crop_box(rng, 10, 10, scale=(2.0, 3.0)) == (0, 0, 10, 10)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_ops_keep_shape_dtype_and_range(mode):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
  image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
  for name in augment.RAND_AUGMENT_OPS:
    for level in (0.0, 5.0, 10.0):
      for increasing in (False, True):
        output = augment.apply_operation(name, image, level, rng,
                                         increasing=increasing, fill=(128,) * 3)
        assert output.mode == mode and output.size == image.size, name
        array = np.asarray(output)
        assert array.dtype == np.uint8 and array.shape == np.asarray(image).shape
  # A few ops checked against their definitions.
  invert = augment.apply_operation("Invert", image, 5.0, rng)
  np.testing.assert_array_equal(np.asarray(invert), 255 - np.asarray(image))
  posterized = augment.apply_operation("Posterize", image, 10.0, rng)
  assert np.all(np.asarray(posterized) % 16 == 0)  # Four bits kept.
  added = np.asarray(augment.apply_operation("SolarizeAdd", image, 10.0, rng))
  original = np.asarray(image).astype(int)
  np.testing.assert_array_equal(
      added, np.where(original < 128, np.minimum(original + 110, 255), original))
  augmented = augment.rand_augment(rng, image, num_ops=4, magnitude=9.0)
  assert augmented.size == image.size and augmented.mode == mode


def test_random_erasing_boxes():
  rng = np.random.default_rng(0)
  image = np.full((20, 20, 3), 5.0, np.float32)
  assert augment.random_erase(rng, image, probability=0.0) is image
  for mode in ("pixel", "rand", "const"):
    for _ in range(20):
      erased = augment.random_erase(rng, image, probability=1.0, mode=mode)
      share = (erased != image).any(-1).mean()
      assert 0.015 <= share <= 1 / 3 + 0.05, (mode, share)
  with pytest.raises(ValueError, match="pixel"):
    augment.random_erase(rng, image, probability=1.0, mode="noise")


def test_eval_crop_geometry():
  # A horizontal ramp: after resizing, a pixel's value is the input column it
  # samples, so the crop's position and scale can be read off.
  height, width = 300, 400
  ramp = np.broadcast_to(np.arange(width, dtype=np.float32)[None, :, None],
                         (1, height, width, 1))
  cropped = preprocess.resize_shorter_side_and_center_crop(
      ramp, 224, crop_pct=0.875, interpolation="bicubic")
  assert cropped.shape == (1, 224, 224, 1)
  scale = 341 / 400  # Shorter side to 224 / 0.875 = 256, so 400 -> 341.
  left = (341 - 224) // 2
  expected = (left + np.arange(224) + 0.5) / scale - 0.5
  np.testing.assert_allclose(cropped[0, 112, :, 0], expected, atol=0.05)
  # crop_pct 1 on a square image is a plain resize.
  square = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
  np.testing.assert_array_equal(
      preprocess.resize_shorter_side_and_center_crop(square, 16),
      preprocess.resize(square, 16))


@pytest.mark.parametrize("size", [(13, 20), (80, 101)])
def test_bicubic_resize_matches_pil(size):
  image = np.random.default_rng(0).random((37, 50), dtype=np.float32)
  expected = Image.fromarray(image, "F").resize(size[::-1], Image.BICUBIC)
  np.testing.assert_allclose(
      preprocess.resize(image[None, ..., None], size, "bicubic")[0, ..., 0],
      np.asarray(expected), atol=1e-5)


def test_preprocessing_from_the_model_registry():
  config = digits_config(preprocess_from_model="deit_small_patch16_224")
  dataset = data.get_dataset(config)
  assert dataset._input.crop_pct == 0.875
  assert dataset._input.interpolation == "bicubic"
  assert dataset._input.mean == (0.485, 0.456, 0.406)
  config = digits_config(preprocess_from_model=True)
  config.model = ml_collections.ConfigDict(dict(name="vit_base_patch16_224"))
  assert data.get_dataset(config)._input.crop_pct == 0.9
  for choice, crop_pct in (("model", 0.9), ("True", 0.9), ("", 1.0)):  # Strings, as the
    config = digits_config(preprocess_from_model=choice)  # command line gives them.
    config.model = ml_collections.ConfigDict(dict(name="vit_base_patch16_224"))
    assert data.get_dataset(config)._input.crop_pct == crop_pct
  config = digits_config(preprocess_from_model="model")
  config.model = ml_collections.ConfigDict(dict(name="vit"))  # A family, not a weight.
  with pytest.raises(ValueError, match="vit_base_patch16_224"):
    data.get_dataset(config)
