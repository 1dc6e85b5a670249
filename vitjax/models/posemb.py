"""Position embeddings: learned, 2-D sin-cos, and resizing between grids."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def sincos_2d(grid_h, grid_w, width, temperature=10_000.0, dtype=jnp.float32):
  """Fixed 2-D sin-cos embedding (MoCo v3 / big_vision), (1, grid_h * grid_w, width)."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}.")
  y, x = np.mgrid[:grid_h, :grid_w]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  posemb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(posemb, dtype)[None]


def resize_posemb(posemb, new_grid, num_prefix_tokens=0):
  """Bilinearly resizes the grid part of (1, prefix + h*w, width) position embeddings.

  The first `num_prefix_tokens` entries (class / distillation tokens) are kept as
  they are; the rest must form a square grid.
  """
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  old_side = int(math.isqrt(grid.shape[1]))
  if old_side * old_side != grid.shape[1]:
    raise ValueError(f"Cannot resize {grid.shape[1]} position embeddings: not a square grid.")
  new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  if (new_h, new_w) == (old_side, old_side):
    return posemb
  grid = grid.reshape(1, old_side, old_side, -1).astype(jnp.float32)
  grid = jax.image.resize(grid, (1, new_h, new_w, grid.shape[-1]), method="bilinear",
                          antialias=False)
  grid = grid.reshape(1, new_h * new_w, -1).astype(posemb.dtype)
  return jnp.concatenate([prefix, grid], axis=1)
