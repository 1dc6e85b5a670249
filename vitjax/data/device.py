"""The float half of training augmentation, run on the device inside the jitted step.

With `config.input.device_preprocess` (the default), the per-example pipeline
(Inception crop, flip, RandAugment: PIL on uint8) hands the device uint8 images
and the parameters of what follows, drawn on the host from (seed, position) and
(seed, step) exactly as the host path draws them:

  _erase_box   int32 [b, 4]   random erasing's (top, left, height, width); height 0: none
  _erase_seed  uint32 [b]     the seed of the erased box's noise ('pixel', 'rand')
  _mix_lam     float32 [b]    Mixup / CutMix's lambda (the batch's, repeated)
  _mix_box     int32 [b, 4]   CutMix's (top, bottom, left, right); all 0: Mixup

`finish_batch` turns them into what the host path gives: normalized float32
images, erased, mixed with their neighbour, and soft targets. A batch of uint8
is a quarter of the float32 bytes to move to the device, and the arithmetic
runs where it is cheap. Only the erased noise differs from the host path's
(another random generator); the boxes, the mixing and the targets are the same.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEVICE_KEYS = ("_erase_box", "_erase_seed", "_mix_lam", "_mix_box")


def _partner(x: jax.Array) -> jax.Array:
  """Each example's neighbour (0 <-> 1, 2 <-> 3, ...): a reshape, so it stays on its device."""
  return x.reshape((-1, 2) + x.shape[1:])[:, ::-1].reshape(x.shape)


def _box_mask(height: int, width: int, top, left, box_height, box_width) -> jax.Array:
  rows = jnp.arange(height)[:, None]
  columns = jnp.arange(width)[None, :]
  return ((rows >= top) & (rows < top + box_height)
          & (columns >= left) & (columns < left + box_width))


def _erase(image: jax.Array, box: jax.Array, seed: jax.Array, mode: str) -> jax.Array:
  height, width, channels = image.shape
  mask = _box_mask(height, width, box[0], box[1], box[2], box[3])[..., None]
  key = jax.random.PRNGKey(seed)
  if mode == "pixel":
    fill = jax.random.normal(key, image.shape, image.dtype)
  elif mode == "rand":
    fill = jnp.broadcast_to(jax.random.normal(key, (1, 1, channels), image.dtype), image.shape)
  else:
    fill = jnp.zeros_like(image)
  return jnp.where(mask, fill, image)


def finish_batch(batch: dict, *, mean: Sequence[float], std: Sequence[float],
                 num_classes: int, erase_mode: str = "pixel") -> dict:
  """uint8 images and augmentation parameters -> the batch the model trains on."""
  if "_erase_box" not in batch and batch["image"].dtype != jnp.uint8:
    return batch  # Built on the host already.
  batch = dict(batch)
  images = batch.pop("image").astype(jnp.float32)
  channels = images.shape[-1]
  # The host path's constants, rounded as it rounds them, for the same floats.
  offset = np.broadcast_to(np.asarray(255 * np.asarray(mean), np.float32), (channels,))
  scale = 1.0 / np.broadcast_to(np.asarray(255 * np.asarray(std), np.float32), (channels,))
  images = (images - offset) * scale
  if "_erase_box" in batch:
    images = jax.vmap(lambda i, b, s: _erase(i, b, s, erase_mode))(
        images, batch.pop("_erase_box"), batch.pop("_erase_seed"))
  labels = batch.pop("label")
  if "_mix_lam" in batch:
    lam = batch.pop("_mix_lam")[:, None]
    box = batch.pop("_mix_box")[0]  # One box for the whole batch.
    height, width = images.shape[1:3]
    pasted = _box_mask(height, width, box[0], box[2], box[1] - box[0], box[3] - box[2])
    is_cutmix = box[1] > box[0]
    mixed = lam[..., None, None] * images + (1.0 - lam[..., None, None]) * _partner(images)
    cut = jnp.where(pasted[None, ..., None], _partner(images), images)
    images = jnp.where(is_cutmix, cut, mixed)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    labels = lam * one_hot + (1.0 - lam) * _partner(one_hot)
  return {**batch, "image": images, "label": labels}
