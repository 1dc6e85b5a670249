"""Masked image modelling: the masked-patch loss on the evaluation split, and a picture of it.

    reconstruction(model, params, dataset, batch_size=360, png_path='recon.png')

For a MAE or SimMIM model (vitjax.models.mae). Masks are random but fixed by
`seed` (batch i uses fold_in(seed, i)), so the metric is comparable across
evaluations of one run. The PNG shows, per row, an original, its masked input
and the reconstruction (the model's pixels on masked patches, the input's on
visible ones, as the MAE paper draws them).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import mae


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_step(model, params, images, example_mask, rng):
  predictions, out = model.apply({"params": params}, images, rngs={"random": rng})
  errors = mae.patch_errors(predictions, out["targets"], model.loss_norm)
  patch_mask = out["mask"] * example_mask[:, None]
  return {"loss_sum": jnp.sum(errors * patch_mask), "count": jnp.sum(patch_mask)}, (
      predictions, out["mask"])


def reconstruction(model, params, dataset, *, batch_size, batch_sharding=None, seed=0,
                   png_path=None, num_images=8):
  """{'reconstruction_loss': mean masked-patch loss} over the evaluation split.

  Args:
    model, params: a MaskedAutoencoder or SimMIM and its parameters.
    dataset: a `vitjax.data.Dataset`; its evaluation split is used.
    batch_size: examples per batch.
    batch_sharding: the trainer's batch sharding (this host's slice of global batches).
    seed: seeds the masks.
    png_path: if given, writes original / masked / reconstruction of the first
      `num_images` evaluation images there.
  """
  if not hasattr(model, "loss_norm"):
    raise ValueError(f"The reconstruction evaluator needs a masked image model (MAE, SimMIM), "
                     f"not {type(model).__name__}; use 'classification' or 'linear_probe'.")
  totals = {"loss_sum": 0.0, "count": 0.0}
  picture = None
  batches = dataset.eval_iter(batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count())
  for index, batch in enumerate(batches):
    images = batch["image"]
    example_mask = batch["mask"].astype(np.float32)
    if batch_sharding is not None:
      images, example_mask = (jax.make_array_from_process_local_data(batch_sharding, x)
                              for x in (images, example_mask))
    sums, (predictions, patch_mask) = _eval_step(
        model, params, images, example_mask, jax.random.fold_in(jax.random.PRNGKey(seed), index))
    for key, value in jax.device_get(sums).items():
      totals[key] += float(value)
    if png_path and picture is None:
      count = min(num_images, int(batch["mask"].sum()))
      picture = [np.asarray(jax.device_get(x))[:count]
                 for x in (batch["image"], predictions, patch_mask)]
  if not totals["count"]:
    raise ValueError("Evaluation saw no masked patches: the evaluation split is empty.")
  if png_path:
    save_reconstructions(png_path, *picture, patch_size=model.patch_size,
                         norm_pix_loss=model.norm_pix_loss)
  return {"reconstruction_loss": totals["loss_sum"] / totals["count"]}


def reconstruction_grid(images, predictions, mask, *, patch_size, norm_pix_loss=False):
  """(rows, 3, H, W, C) images: each original, masked (grey patches), reconstructed.

  With `norm_pix_loss` the predictions are per-patch normalised pixels; they are
  put back at each original patch's mean and standard deviation to be seen.
  """
  images = np.asarray(images, np.float32)
  patches = np.asarray(mae.patchify(images, patch_size))
  predictions = np.asarray(predictions, np.float32)
  if norm_pix_loss:
    mean = patches.mean(-1, keepdims=True)
    std = np.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
    predictions = predictions * std + mean
  mask = np.asarray(mask, np.float32)[..., None]
  grid_h, channels = images.shape[1] // patch_size, images.shape[-1]
  unpatch = lambda p: np.asarray(mae.unpatchify(p, patch_size, grid_h, channels))
  grey = np.full_like(patches, patches.mean())
  masked = unpatch(patches * (1 - mask) + grey * mask)
  reconstructed = unpatch(patches * (1 - mask) + predictions * mask)
  return np.stack([images, masked, reconstructed], axis=1)


def save_reconstructions(path, images, predictions, mask, *, patch_size, norm_pix_loss=False,
                         scale=None):
  """Writes a PNG: one row per image, columns original / masked / reconstruction."""
  grid = reconstruction_grid(images, predictions, mask, patch_size=patch_size,
                             norm_pix_loss=norm_pix_loss)
  rows, columns, height, width, channels = grid.shape
  low, high = grid[:, 0].min(), grid[:, 0].max()  # The originals' range sets the colours.
  grid = np.clip((grid - low) / max(high - low, 1e-6), 0.0, 1.0)
  if channels == 1:
    grid = np.repeat(grid, 3, axis=-1)
  scale = scale or max(1, 96 // height)  # Small images (digits) drawn large enough to see.
  grid = grid.repeat(scale, axis=2).repeat(scale, axis=3)
  border = 2
  canvas = np.ones((rows * (height * scale + border) + border,
                    columns * (width * scale + border) + border, 3), np.float32)
  for r in range(rows):
    for c in range(columns):
      top, left = border + r * (height * scale + border), border + c * (width * scale + border)
      canvas[top:top + height * scale, left:left + width * scale] = grid[r, c, ..., :3]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray((canvas * 255).round().astype(np.uint8)).save(path)
  return path
