"""Fréchet distance (checked against pytorch_fid's figures), features of vitjax models, grids."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vitjax.evaluate import frechet
from vitjax.evaluate import images as images_lib
from vitjax.models import registry

TINY = dict(depth=1, width=32, num_heads=2, mlp_dim=32, image_size=16, patch_size=8,
            num_classes=5, head_zeroinit=False)


def pinned_features(seed, num, dim, shift=0.0):
  """Correlated Gaussian features; the function the pytorch_fid figures were computed on."""
  rng = np.random.default_rng(seed)
  mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
  return rng.standard_normal((num, dim)) @ mixing + shift


# pytorch_fid.fid_score.calculate_frechet_distance on these features, computed on 2026-12-03
# with pytorch-fid 0.3.0 (scipy 1.17.1, numpy 2.4.6) in a side environment, since
# pytorch_fid needs torchvision and cannot be a test dependency:
#   /tmp/tvenv/bin/pip install pytorch-fid && /tmp/tvenv/bin/python pin.py
# where pin.py defines pinned_features as above and runs
#   for num, dim in ((200, 8), (500, 64), (40, 64)):
#     a, b = pinned_features(0, num, dim), pinned_features(1, num, dim, shift=0.1)
#     stats = [(np.mean(x, axis=0), np.cov(x, rowvar=False)) for x in (a, b)]
#     print(num, dim, repr(float(calculate_frechet_distance(*stats[0], *stats[1]))))
# Tolerance: with full-rank covariances the two routes (scipy's sqrtm of S1 S2 there, symmetric
# eigendecompositions here) agree to ~1e-14 relative. With 40 samples in 64 dimensions the
# product has 25 zero eigenvalues that rounding makes +-1e-15; their square roots (~3e-8
# each) add up differently in the two routes: they differ by 4.9e-7 absolute (8e-9
# relative), and a 50-digit mpmath evaluation lies between them. Hence 1e-7 there.
PYTORCH_FID_FIGURES = [
    (200, 8, 2.868400269206461, 1e-12),
    (500, 64, 33.56903978799609, 1e-12),
    (40, 64, 62.239999396610074, 1e-7),  # Singular covariances: fewer samples than dims.
]


@pytest.mark.parametrize("num,dim,expected,rtol", PYTORCH_FID_FIGURES)
def test_frechet_distance_agrees_with_pytorch_fid(num, dim, expected, rtol):
  statistics_a = frechet.feature_statistics(pinned_features(0, num, dim))
  statistics_b = frechet.feature_statistics(pinned_features(1, num, dim, shift=0.1))
  got = frechet.frechet_distance(*statistics_a, *statistics_b)
  assert isinstance(got, float)
  np.testing.assert_allclose(got, expected, rtol=rtol)


def test_feature_statistics_are_the_mean_and_ddof1_covariance_in_float64():
  features = pinned_features(3, 30, 5).astype(np.float32)
  mu, sigma = frechet.feature_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  centred = features.astype(np.float64) - mu
  np.testing.assert_allclose(sigma, centred.T @ centred / 29, rtol=1e-12)
  with pytest.raises(ValueError, match="N >= 2"):
    frechet.feature_statistics(features[:1])


def test_a_set_against_itself_is_zero_and_a_translation_is_the_squared_shift():
  mu, sigma = frechet.feature_statistics(pinned_features(0, 500, 64))
  scale = np.trace(sigma)
  assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * scale
  delta = np.random.default_rng(5).standard_normal(64)
  got = frechet.frechet_distance(mu, sigma, mu + delta, sigma)
  np.testing.assert_allclose(got, delta @ delta, rtol=1e-9)
  # Singular (40 samples, 64 dimensions): still 0 up to the rounding of its zero eigenvalues.
  mu, sigma = frechet.feature_statistics(pinned_features(0, 40, 64))
  assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_two_gaussians_closed_form():
  """Commuting covariances: sum (sqrt s1 - sqrt s2)^2 on the shared eigenbasis, + |dmu|^2."""
  rng = np.random.default_rng(7)
  dim = 16
  basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  variances1, variances2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.0, 3.0, dim)
  variances2[:3] = 0.0  # Singular too.
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  expected = (np.sum((mu1 - mu2) ** 2)
              + np.sum((np.sqrt(variances1) - np.sqrt(variances2)) ** 2))
  diagonal = frechet.frechet_distance(mu1, np.diag(variances1), mu2, np.diag(variances2))
  np.testing.assert_allclose(diagonal, expected, rtol=1e-12)
  rotated = frechet.frechet_distance(mu1, basis @ np.diag(variances1) @ basis.T,
                                     mu2, basis @ np.diag(variances2) @ basis.T)
  # Rotated, the three zero variances come out as +-1e-16, whose square roots add ~1e-8 each.
  np.testing.assert_allclose(rotated, expected, rtol=1e-8)
  # One dimension: (mu1 - mu2)^2 + (s1 - s2)^2 for standard deviations s.
  assert frechet.frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(4.0 + 1.0)


def test_wrong_statistics_are_clear_errors():
  eye = np.eye(3)
  with pytest.raises(ValueError, match="not a covariance"):
    frechet.frechet_distance(np.zeros(3), np.diag([1.0, -1.0, 1.0]), np.zeros(3), eye)
  with pytest.raises(ValueError, match="shapes"):
    frechet.frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="NaN"):
    frechet.frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)


def test_statistics_save_load_and_reference_cache(tmp_path):
  mu, sigma = frechet.feature_statistics(pinned_features(0, 50, 6))
  path = str(tmp_path / "stats" / "ref.npz")
  assert frechet.save_statistics(path, mu, sigma, key="dinov2 digits train") == path
  loaded_mu, loaded_sigma = frechet.load_statistics(path, key="dinov2 digits train")
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  with pytest.raises(ValueError, match="not of 'inception'"):
    frechet.load_statistics(path, key="inception")
  # Saved: the model is not run again (None would fail if it were).
  got = frechet.reference_statistics(path, None, None, None, batch_size=8,
                                     key="dinov2 digits train")
  np.testing.assert_array_equal(got[1], sigma)
  # pytorch_fid's own .npz files ('mu', 'sigma', no key) load too.
  np.savez(tmp_path / "fid.npz", mu=mu, sigma=sigma)
  np.testing.assert_array_equal(frechet.load_statistics(str(tmp_path / "fid.npz"))[0], mu)


@pytest.fixture(scope="module")
def tiny_vit():
  model = registry.create_model("vit", **TINY)
  # Random parameters without compiling the initialisers (seconds of the test's time).
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda leaf: rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype),
                                  registry.param_shapes(model))
  return model, params, jax.jit(model.apply)


def test_extract_features_are_the_model_pre_logits(tiny_vit, tmp_path):
  model, params, apply = tiny_vit
  images = np.random.default_rng(1).standard_normal((11, 16, 16, 3)).astype(np.float32)
  _, out = apply({"params": params}, images)
  expected = np.asarray(out["pre_logits"])
  got = frechet.extract_features(model, params, jnp.asarray(images), batch_size=4)
  assert got.shape == (11, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # Batches as Dataset.eval_iter yields them: padding rows (mask False) are dropped.
  padded = np.concatenate([images, np.zeros((1, 16, 16, 3), np.float32)])
  batches = [{"image": padded[i:i + 4], "mask": np.arange(i, i + 4) < 11} for i in (0, 4, 8)]
  np.testing.assert_allclose(frechet.extract_features(model, params, batches, batch_size=4),
                             expected, rtol=1e-5, atol=1e-5)
  assert len(frechet.extract_features(model, params, images, batch_size=4, max_examples=6)) == 6
  # Another entry of `out`, and a clear error for one that is not there.
  encoded = frechet.extract_features(model, params, images, batch_size=4,
                                     feature_key="head_input")
  np.testing.assert_allclose(encoded, np.asarray(out["head_input"]), rtol=1e-5, atol=1e-5)
  with pytest.raises(KeyError, match="pass feature_key"):
    frechet.extract_features(model, params, images, batch_size=4, feature_key="nope")

  # Streamed statistics equal those of the whole feature matrix.
  mu, sigma = frechet.statistics_of(model, params, images, batch_size=4)
  expected_mu, expected_sigma = frechet.feature_statistics(got)
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12)
  path = str(tmp_path / "ref.npz")
  reference = frechet.reference_statistics(path, model, params, images, batch_size=4, key="k")
  np.testing.assert_array_equal(frechet.load_statistics(path, key="k")[1], reference[1])

  assert abs(frechet.frechet_distance_of(model, params, images, images, batch_size=4)) < 1e-6
  assert frechet.frechet_distance_of(model, params, images, images[:, ::-1] * 2,
                                     batch_size=4) > 1e-2


def test_extract_features_resizes_and_normalises_as_the_model_expects(tiny_vit):
  model, params, _ = tiny_vit
  # Samples in [-1, 1], at half the model's size, for weights with ImageNet mean and std.
  samples = np.random.default_rng(2).uniform(-1.0, 1.0, (4, 8, 8, 3)).astype(np.float32)
  preprocess = frechet.preprocess_for("vit_small_patch14_dinov2")
  assert preprocess == frechet.Preprocess(registry.IMAGENET_MEAN,
                                          registry.IMAGENET_STD, 0.5, 0.5)
  resized = jax.image.resize(samples, (4, 16, 16, 3), "bilinear")
  inputs = ((resized + 1) / 2 - np.array(preprocess.mean)) / np.array(preprocess.std)
  # The plain pass (checked against the model above) on inputs made by hand.
  expected = frechet.extract_features(model, params, inputs, batch_size=4)
  got = frechet.extract_features(model, params, samples, batch_size=4, preprocess=preprocess,
                                 resize_method="bilinear")
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # Grey-scale images are repeated to the model's three channels.
  grey = np.random.default_rng(3).uniform(0.0, 1.0, (4, 16, 16, 1)).astype(np.float32)
  np.testing.assert_allclose(
      frechet.extract_features(model, params, grey, batch_size=4),
      frechet.extract_features(model, params, np.repeat(grey, 3, axis=-1), batch_size=4),
      rtol=1e-5, atol=1e-6)


class BrightestChannel(nn.Module):
  """A classifier of three classes: the channel with the largest mean."""

  @nn.compact
  def __call__(self, images):
    logits = images.mean(axis=(1, 2)) * self.param("scale", nn.initializers.ones, ())
    return logits, {"logits": logits}


def test_conditional_accuracy_of_a_trivial_classifier():
  classes = np.arange(10) % 3
  images = np.zeros((10, 4, 4, 3), np.float32)
  images[np.arange(10), :, :, classes] = 1.0
  labels = classes.copy()
  labels[[1, 4]] = (labels[[1, 4]] + 1) % 3  # Two of ten asked for another class.
  classifier = BrightestChannel()
  params = {"scale": jnp.ones(())}
  got = frechet.conditional_accuracy(classifier, params, images, labels, batch_size=4)
  assert got == pytest.approx(0.8)
  with pytest.raises(ValueError, match="9 labels for 10 images"):
    frechet.conditional_accuracy(classifier, params, images, labels[:9], batch_size=4)


def test_image_grid_png_has_the_layout_size(tmp_path):
  samples = np.random.default_rng(0).uniform(-1, 1, (10, 6, 5, 3)).astype(np.float32)
  samples[0] = 1.0
  path = images_lib.save_image_grid(str(tmp_path / "grid" / "samples.png"), samples, nrow=4)
  with Image.open(path) as image:
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (4 * (5 + 2) + 2, 3 * (6 + 2) + 2)  # (width, height): 4 x 3 images.
    pixels = np.asarray(image)
  assert (pixels[2:8, 2:7] == 255).all()  # The first image, white, after the 2-pixel border.
  assert (pixels[:2] == 0).all()
  # [0, 1] grey-scale images, fewer than a row: one row of that many.
  grey = images_lib.image_grid(np.full((3, 4, 4, 1), 0.5), nrow=8, padding=1)
  assert grey.shape == (6, 16, 1) and grey[1, 1, 0] == 128
  path = images_lib.save_image_grid(str(tmp_path / "grey.png"), np.full((3, 4, 4), 0.5))
  with Image.open(path) as image:
    assert image.mode == "L"
