"""Fréchet distance between two image sets in the feature space of any vitjax model.

    dinov2 = vitjax.create_model('vit_large_patch14_dinov2')   # + its loaded params
    preprocess = preprocess_for('vit_large_patch14_dinov2')    # images in [-1, 1]
    frechet_distance_of(dinov2, params, samples, real_images, batch_size=256,
                        preprocess=preprocess, image_size=224)  # FD-DINOv2

Each set's features (`out['pre_logits']` by default, any vector entry of `out`)
are summarised by their mean and covariance, and the distance between the two
Gaussians with those statistics is

    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)),

the figure of FID (Heusel et al., 2017; Inception pool features) and FD-DINOv2
(Stein et al., 2023; DINOv2 ViT-L/14 class token at 224 pixels). The model
only provides features, so FID needs an Inception network whose `(logits, out)`
has the pool features (vitjax ships none).

The statistics are pytorch_fid's (mean; `np.cov(rowvar=False)`, that is with
ddof=1; float64) and so is the formula; tests/test_frechet.py checks figures
computed by `pytorch_fid.fid_score.calculate_frechet_distance`. Reference
statistics of a dataset split are computed once and kept in an .npz file
(`reference_statistics`). `conditional_accuracy` scores class-conditional
samples with a classifier: how often it names the class a sample was asked for.
"""

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from vitjax.models import registry

# A covariance's eigenvalue below -this * its largest is not rounding: the matrix is not one.
NEGATIVE_EIGENVALUE_TOLERANCE = 1e-6


def feature_statistics(features):
  """(mu [D], sigma [D, D]) of `features` [N, D], in float64, sigma with ddof=1 (N >= 2)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"Feature statistics need [N, D] features with N >= 2 (a covariance "
                     f"with ddof=1); got shape {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), as a float.

  tr (S1 S2)^(1/2) is computed by symmetric eigendecompositions, not
  `scipy.linalg.sqrtm` of the non-symmetric product: S1 S2 has the eigenvalues of
  the symmetric positive semi-definite R S2 R, with R = S1^(1/2), so the trace is the
  sum of their square roots. Eigenvalues that rounding makes slightly negative (a
  singular covariance: fewer samples than dimensions) count as 0. This takes the
  place of pytorch_fid's fallbacks (adding 1e-6 I to both covariances when sqrtm
  fails, dropping a small imaginary part): nothing is added, nothing complex
  appears, and it takes a third of sqrtm's time at 1024 dimensions.
  The result is not clipped at 0: a set against itself gives 0 up to rounding.
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, np.float64)) for sigma in (sigma1, sigma2))
  dim = mu1.shape[-1]
  if (mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim)
      or sigma2.shape != (dim, dim)):
    raise ValueError(f"Statistics of different or wrong shapes: mu1 {mu1.shape}, sigma1 "
                     f"{sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}; each mu must be "
                     f"[D] and each sigma [D, D] for one feature dimension D.")
  for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} has NaN or infinite entries: the features were not finite.")
  root1 = _psd_sqrt(sigma1, "sigma1")
  _psd_sqrt(sigma2, "sigma2")  # Only checks it.
  middle = root1 @ sigma2 @ root1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _psd_sqrt(sigma, name):
  """The symmetric square root of a covariance; a clear error if it is not one."""
  eigenvalues, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
  largest = max(float(np.abs(eigenvalues).max()), np.finfo(np.float64).tiny)
  if eigenvalues.min() < -NEGATIVE_EIGENVALUE_TOLERANCE * largest:
    raise ValueError(f"{name} is not a covariance matrix: it has the eigenvalue "
                     f"{eigenvalues.min():.3g} (largest {largest:.3g}); a covariance's are >= 0.")
  return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Images as they come -> as the model takes them, per channel (inside the jitted pass).

  The images come as (pixels - images_mean) / images_std, pixels in [0, 1]:
  images_mean = images_std = 0.5 for images in [-1, 1] (diffusion samples, and
  vitjax's datasets with the default input.mean and input.std), 0 and 1 for
  images in [0, 1]. The model takes (pixels - mean) / std: its weights' mean and
  std, which `preprocess_for(name)` reads from the registry.
  """
  mean: Sequence[float] = registry.IMAGENET_MEAN
  std: Sequence[float] = registry.IMAGENET_STD
  images_mean: Sequence[float] = (0.5,)
  images_std: Sequence[float] = (0.5,)

  def __post_init__(self):  # Tuples: hashable, so that one jitted pass serves equal ones.
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name,
                         tuple(float(v) for v in np.atleast_1d(getattr(self, field.name))))

  def __call__(self, images):
    pixels = images * jnp.asarray(self.images_std) + jnp.asarray(self.images_mean)
    return (pixels - jnp.asarray(self.mean)) / jnp.asarray(self.std)


def preprocess_for(model_name, *, images_mean=(0.5,), images_std=(0.5,)):
  """The `Preprocess` of registered weights `model_name` (their mean and std).

  `images_mean`, `images_std`: how the images given are normalised (see
  `Preprocess`); the default is images in [-1, 1].
  """
  entry = registry.model_entry(model_name)
  return Preprocess(entry.mean, entry.std, images_mean, images_std)


def extract_features(model, params, images, *, batch_size, feature_key="pre_logits",
                     image_size=None, preprocess=None, resize_method="bicubic",
                     batch_sharding=None, max_examples=None):
  """`out[feature_key]` of every image, in order: float32 [N, D] (NumPy).

  Args:
    model, params: any vitjax model whose `out` has `feature_key` (a vector per image).
    images: NHWC images [N, H, W, C] (NumPy or JAX), or an iterable of batches:
      arrays, or dicts with 'image' and optionally 'mask' (False rows are padding,
      as in `Dataset.eval_iter`).
    batch_size: images per forward pass. An array is cut into batches of this
      size; a shorter batch (the last) is padded to it, so one compilation serves.
    feature_key: which entry of the model's `out` dict is the feature.
    image_size: resize to this (an int or (height, width)) when the images differ;
      None: the model's `image_size`. Resized with `resize_method` (a
      `jax.image.resize` method; antialiased when shrinking), before `preprocess`.
    preprocess: a `Preprocess` (or any jnp function of a batch) that turns the
      images into the model's inputs; None: they already are. One-channel images
      are repeated to the model's three channels.
    batch_sharding: as the other evaluators: each batch is this host's slice of a
      global batch; the features are gathered whole on every host.
    max_examples: stop after this many images (e.g. a subset of a large split).
  """
  batches = _feature_batches(model, params, images, batch_size=batch_size,
                             feature_key=feature_key, image_size=image_size,
                             preprocess=preprocess, resize_method=resize_method,
                             batch_sharding=batch_sharding, max_examples=max_examples)
  features = list(batches)
  if not features:
    raise ValueError("No images: no features to extract.")
  return np.concatenate(features)


def statistics_of(model, params, images, *, batch_size, **options):
  """(mu, sigma) of the model's features of `images`, accumulated batch by batch.

  Takes `extract_features`' arguments and gives `feature_statistics` of its
  features without holding them all: sums in float64 around the first batch's
  mean, so that a large split (1.28M x 1024 features) costs D x D memory.
  """
  count, shift, total, outer = 0, None, None, None
  for features in _feature_batches(model, params, images, batch_size=batch_size, **options):
    features = features.astype(np.float64)
    if not len(features):  # A batch of padding only.
      continue
    if shift is None:
      shift = features.mean(axis=0)
      total, outer = np.zeros_like(shift), np.zeros((len(shift), len(shift)))
    centred = features - shift
    count += len(features)
    total += centred.sum(axis=0)
    outer += centred.T @ centred
  if count < 2:
    raise ValueError(f"Feature statistics need at least 2 images; got {count}.")
  mean = total / count
  return shift + mean, (outer - count * np.outer(mean, mean)) / (count - 1)


def frechet_distance_of(model, params, images_a, images_b, *, batch_size, **options):
  """Fréchet distance between two image sets in `model`'s feature space.

  Both sets go through the same `extract_features` options (`feature_key`,
  `image_size`, `preprocess`, ...); see the module docstring for FD-DINOv2.
  """
  statistics_a = statistics_of(model, params, images_a, batch_size=batch_size, **options)
  statistics_b = statistics_of(model, params, images_b, batch_size=batch_size, **options)
  return frechet_distance(*statistics_a, *statistics_b)


def save_statistics(path, mu, sigma, *, key=""):
  """Writes (mu, sigma) to an .npz (with `key`, a description that `load_statistics` checks)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # A file object: np.savez would append '.npz' to a path.
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             key=np.asarray(str(key)))
  return path


def load_statistics(path, *, key=None):
  """(mu, sigma) from an .npz of `save_statistics` (or pytorch_fid: arrays 'mu', 'sigma').

  With `key`, the file must have been saved with the same one.
  """
  with np.load(path, allow_pickle=False) as data:
    missing = {"mu", "sigma"} - set(data.files)
    if missing:
      raise ValueError(f"{path} has no {', '.join(sorted(missing))}: it holds "
                       f"{', '.join(data.files) or 'nothing'}, not Fréchet statistics.")
    saved_key = str(data["key"]) if "key" in data.files else None
    if key is not None and saved_key != str(key):
      raise ValueError(f"{path} holds statistics of {saved_key!r}, not of {str(key)!r}; delete "
                       f"it to compute them anew, or give another path.")
    return data["mu"], data["sigma"]


def reference_statistics(path, model, params, images, *, batch_size, key="", **options):
  """(mu, sigma) of a reference set: loaded from `path` if saved there, else computed and saved.

  `images` as `extract_features` takes them: for a dataset split,
  `dataset.eval_iter(batch_size, split='train')`, with `preprocess` saying how its
  images are normalised. `key` describes what the statistics are of (model,
  features, preprocessing, split, example count): a file saved with another key
  is an error, not a silent reuse. Without `path`, nothing is cached.
  """
  if path and os.path.exists(path):
    return load_statistics(path, key=key)
  mu, sigma = statistics_of(model, params, images, batch_size=batch_size, **options)
  if path:
    save_statistics(path, mu, sigma, key=key)
  return mu, sigma


def conditional_accuracy(classifier, params, images, labels, *, batch_size, **options):
  """The fraction of `images` that `classifier` assigns to their `labels` (top-1).

  For class-conditional samples, `labels` [N] are the classes they were
  generated for: how precisely the generator follows its conditioning. The
  classifier's logits are its first output; `options` are `extract_features`'
  (image_size, preprocess, resize_method, batch_sharding).
  """
  predictions = np.concatenate(list(_feature_batches(
      classifier, params, images, batch_size=batch_size, feature_key=None, **options)))
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(predictions):
    raise ValueError(f"{len(labels)} labels for {len(predictions)} images.")
  return float(np.mean(predictions == labels))


def _feature_batches(model, params, images, *, batch_size, feature_key="pre_logits",
                     image_size=None, preprocess=None, resize_method="bicubic",
                     batch_sharding=None, max_examples=None):
  """Per batch, NumPy features of the real (unpadded) images; `feature_key` None: argmax class."""
  if image_size is None:
    image_size = getattr(model, "image_size", None)
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  out_sharding = (None if batch_sharding is None
                  else NamedSharding(batch_sharding.mesh, PartitionSpec()))
  apply = _apply_fn(model, feature_key, None if image_size is None else tuple(image_size),
                    preprocess, resize_method, getattr(model, "in_channels", 3), out_sharding)
  seen = 0
  for batch, mask in _padded_batches(images, batch_size):
    if max_examples is not None and seen >= max_examples:
      break
    if batch_sharding is not None:
      batch, mask = (jax.make_array_from_process_local_data(batch_sharding, np.asarray(x))
                     for x in (batch, mask))
    features, mask = jax.device_get(apply(params, batch, mask))
    features = np.asarray(features)[np.asarray(mask, bool)]
    if max_examples is not None:
      features = features[:max_examples - seen]
    seen += len(features)
    yield features


def _padded_batches(images, batch_size):
  """(images [batch_size, ...], mask [batch_size]) batches of an array or an iterable."""
  if hasattr(images, "shape") and hasattr(images, "ndim"):
    if images.ndim != 4:
      raise ValueError(f"Images must be NHWC [N, H, W, C]; got shape {images.shape}.")
    array = images
    images = (array[start:start + batch_size] for start in range(0, len(array), batch_size))
  for batch in images:
    mask = None
    if isinstance(batch, dict):
      batch, mask = batch["image"], batch.get("mask")
    batch = np.asarray(batch, np.float32)
    if batch.ndim != 4:
      raise ValueError(f"A batch of images must be NHWC [B, H, W, C]; got shape {batch.shape}.")
    mask = np.ones(len(batch), bool) if mask is None else np.asarray(mask, bool)
    padding = batch_size - len(batch)
    if padding > 0:  # One shape for every batch: one compilation.
      batch = np.concatenate([batch, np.zeros((padding,) + batch.shape[1:], batch.dtype)])
      mask = np.concatenate([mask, np.zeros(padding, bool)])
    yield batch, mask


@functools.lru_cache(maxsize=16)
def _apply_fn(model, feature_key, image_size, preprocess, resize_method, channels,
              out_sharding):
  def apply(params, images, mask):
    if image_size is not None and tuple(images.shape[1:3]) != image_size:
      images = jax.image.resize(images, (images.shape[0], *image_size, images.shape[3]),
                                method=resize_method)
    if images.shape[-1] == 1 and channels == 3:
      images = jnp.repeat(images, 3, axis=-1)
    if preprocess is not None:
      images = preprocess(images)
    logits, out = model.apply({"params": params}, images)
    if feature_key is None:
      return jnp.argmax(logits, axis=-1), mask
    if feature_key not in out:
      raise KeyError(f"The model's out dict has no {feature_key!r} (it has "
                     f"{', '.join(sorted(out))}); pass feature_key= one of those.")
    features = out[feature_key]
    if features.ndim != 2:
      raise ValueError(f"out[{feature_key!r}] has shape {features.shape}; Fréchet distance "
                       f"needs one vector per image [batch, dim].")
    return features.astype(jnp.float32), mask
  if out_sharding is None:
    return jax.jit(apply)
  return jax.jit(apply, out_shardings=out_sharding)
