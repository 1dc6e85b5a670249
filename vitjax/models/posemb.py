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


RESIZE_METHODS = ("bilinear", "bicubic", "bicubic_no_antialias")


def resize_posemb(posemb, new_grid, num_prefix_tokens=0, method="bilinear"):
  """Resizes the grid part of (1, prefix + h*w, width) position embeddings.

  The first `num_prefix_tokens` entries (class / distillation tokens) are kept as
  they are; the rest must form a square grid. `method`:
    'bilinear': big_vision's (no antialiasing);
    'bicubic': torch's bicubic with antialias=True (Keys a=-0.5, antialiased when
      shrinking): timm's `resample_abs_pos_embed`, DINOv2 with registers;
    'bicubic_no_antialias': torch's `F.interpolate(mode='bicubic')` default (Keys
      a=-0.75, no antialiasing): the original DINOv2 (HF `Dinov2Model`) and
      naver-ai's rope-vit. Needs JAX >= 0.10 (`ResizeMethod.CUBIC_PYTORCH`).
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"Unknown position-embedding resize method {method!r}; use one of "
                     f"{', '.join(repr(m) for m in RESIZE_METHODS)}.")
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  old_side = int(math.isqrt(grid.shape[1]))
  if old_side * old_side != grid.shape[1]:
    raise ValueError(f"Cannot resize {grid.shape[1]} position embeddings: not a square grid.")
  new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  if (new_h, new_w) == (old_side, old_side):
    return posemb
  grid = grid.reshape(1, old_side, old_side, -1).astype(jnp.float32)
  if method == "bicubic_no_antialias":
    torch_cubic = getattr(jax.image.ResizeMethod, "CUBIC_PYTORCH", None)
    if torch_cubic is None:
      raise NotImplementedError(f"posemb_resize='bicubic_no_antialias' needs JAX >= 0.10 "
                                f"(jax.image.ResizeMethod.CUBIC_PYTORCH); this is JAX "
                                f"{jax.__version__}. Upgrade JAX or use 'bicubic'.")
    grid = jax.image.resize(grid, (1, new_h, new_w, grid.shape[-1]), method=torch_cubic,
                            antialias=False)
  else:
    grid = jax.image.resize(grid, (1, new_h, new_w, grid.shape[-1]), method=method,
                            antialias=method == "bicubic")
  grid = grid.reshape(1, new_h * new_w, -1).astype(posemb.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


# 2-D rotary position embeddings ("Rotary Position Embedding for Vision Transformer",
# Heo et al. 2024). Queries and keys are rotated pairwise by angles that grow with
# the token's (x, y) position, so q.k depends on relative positions only, and any
# grid size works: a model trained at one resolution runs at another.
# The conventions are the authors' (naver-ai/rope-vit, and timm's eva.py port), so their
# weights load as they are: consecutive channel pairs (2i, 2i+1) rotate together (their
# complex view), positions are the patch column x and row y in patch units, unscaled at
# any resolution, and the class token is not rotated.


def patch_positions(grid_h, grid_w, num_prefix_tokens=0, num_registers=0):
  """(tokens, 2) float (x, y) positions and (tokens,) True where a token is rotated.

  The token order is the ViT's: prefix tokens, registers, then the patches row by
  row; prefix tokens and registers have no position and are not rotated.
  """
  y, x = np.mgrid[:grid_h, :grid_w]
  grid = np.stack([x.ravel(), y.ravel()], axis=-1).astype(np.float32)
  extra = num_prefix_tokens + num_registers
  positions = np.concatenate([np.zeros((extra, 2), np.float32), grid])
  rotated = np.concatenate([np.zeros(extra, bool), np.ones(len(grid), bool)])
  return jnp.asarray(positions), jnp.asarray(rotated)


def rope_axial_frequencies(head_dim, theta=100.0):
  """(head_dim // 2, 2) frequencies: the first half of the pairs turn with x, the rest with y."""
  if head_dim % 4:
    raise ValueError(f"Axial 2-D RoPE needs head_dim divisible by 4, got {head_dim}.")
  quarter = head_dim // 4
  frequencies = 1.0 / theta ** (np.arange(quarter) / quarter)
  zeros = np.zeros(quarter)
  return np.concatenate([np.stack([frequencies, zeros], -1), np.stack([zeros, frequencies], -1)])


def sequence_positions(length):
  """(length, 2) positions (index, 0) of a 1-D sequence, every token rotated (LLaMA's RoPE)."""
  positions = np.stack([np.arange(length), np.zeros(length)], axis=-1).astype(np.float32)
  return jnp.asarray(positions), jnp.ones(length, bool)


def rope_1d_frequencies(head_dim, theta=10_000.0):
  """(head_dim // 2, 2) frequencies of LLaMA's 1-D RoPE, turning with the token index only."""
  if head_dim % 2:
    raise ValueError(f"1-D RoPE needs an even head_dim, got {head_dim}.")
  frequencies = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  return np.stack([frequencies, np.zeros_like(frequencies)], axis=-1)


def rope_mixed_init(rng, num_heads, head_dim, theta=10.0):
  """(heads, head_dim // 2, 2) learnable frequencies, each head's turned by a random angle.

  Half of a head's pairs turn along a random direction, the other half along the
  perpendicular one, with the magnitudes of the axial variant.
  """
  magnitudes = 1.0 / theta ** (jnp.arange(head_dim // 4) / (head_dim // 4))
  angles = jax.random.uniform(rng, (num_heads, 1, 1), maxval=2 * jnp.pi)
  direction = lambda a: jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)  # (heads, 1, 2)
  first = magnitudes[None, :, None] * direction(angles)
  second = magnitudes[None, :, None] * direction(angles + jnp.pi / 2)
  return jnp.concatenate([first, second], axis=1).astype(jnp.float32)


def rope_angles(positions, frequencies):
  """Angles (..., tokens, head_dim // 2) for (tokens, 2) positions and (..., pairs, 2) frequencies."""
  # Full float32: positions reach tens, and a TF32/bf16 matmul would be off by whole
  # hundredths of a radian there (the authors turn autocast off for the same reason).
  return jnp.einsum("tc,...pc->...tp", positions, frequencies,
                    precision=jax.lax.Precision.HIGHEST)


def apply_rope(x, angles, rotated):
  """Rotates consecutive pairs of x's (batch, tokens, heads, head_dim) by `angles`.

  `angles` is (tokens, head_dim // 2) or per head (heads, tokens, head_dim // 2);
  tokens where `rotated` is False are left as they are.
  """
  if angles.ndim == 3:
    angles = jnp.swapaxes(angles, 0, 1)  # (tokens, heads, pairs)
  else:
    angles = angles[:, None, :]
  angles = jnp.where(rotated[:, None, None], angles, 0.0)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  even, odd = x[..., 0::2], x[..., 1::2]
  rotated_pairs = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated_pairs.reshape(x.shape)
