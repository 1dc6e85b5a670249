"""FlexiViT's patch-size flexibility (Beyer et al., 2023): PI-resize of patch embeddings.

Resizing a p x p patch to p' x p' is linear: x' = B x, with B the
[p'^2, p^2] matrix of the interpolation. A patch-embedding kernel w meets the
resized patch through <x', w'>, so the kernel that sees the resized patch as w
saw the original solves B^T w' = w. Its least-norm solution is
w' = pinv(B^T) w: exact whenever p' >= p (B^T then has full row rank), and the
best such kernel in the least-squares sense when shrinking. This is the paper's
PI-resize; resizing the kernel itself with B instead changes what the tokens mean.

    kernel_8 = pi_resize_patch_kernel(params["embedding"]["kernel"], (8, 8))

Kernels are in Flax's layout, (height, width, in_channels, out_channels).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bilinear", "bicubic", "nearest", "lanczos3", "lanczos5")
_JAX_METHODS = {"bilinear": "linear", "bicubic": "cubic"}
# A model's `patch_resize` -> (method, antialias) of the resize that PI-resize inverts.
# Antialiasing matters only when the kernel shrinks. timm's resample_patch_embed
# antialiases (bicubic by default); big_vision's resample_patchemb uses TF's bilinear
# tf.image.resize, which does not.
PATCH_RESIZE_METHODS = {
    "bilinear": ("bilinear", True),
    "bicubic": ("bicubic", True),
    "bilinear_no_antialias": ("bilinear", False),
}


@functools.lru_cache(maxsize=64)
def resize_matrix(old_size: tuple[int, int], new_size: tuple[int, int],
                  method: str = "bilinear", antialias: bool = True) -> np.ndarray:
  """[new_h * new_w, old_h * old_w]: column j is the resize of the j-th basis image.

  `method` as `jax.image.resize` takes it ('bilinear' and 'bicubic' are its
  'linear' and 'cubic': Keys' cubic with a = -0.5), antialiased when shrinking.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, not {method!r}.")
  old_h, old_w = old_size
  new_h, new_w = new_size
  basis = np.eye(old_h * old_w, dtype=np.float64).reshape(-1, old_h, old_w)
  resize = functools.partial(jax.image.resize, shape=(new_h, new_w),
                             method=_JAX_METHODS.get(method, method), antialias=antialias)
  # Evaluated now, on the host, also when called while a jitted function is traced:
  # the matrix depends on the sizes only.
  with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]):
    columns = np.asarray(jax.vmap(resize)(jnp.asarray(basis, jnp.float32)), np.float64)
  return columns.reshape(old_h * old_w, new_h * new_w).T


def pi_resize_patch_kernel(kernel: jax.Array, new_size: tuple[int, int] | int,
                           method: str = "bilinear", antialias: bool = True) -> jax.Array:
  """(p_h, p_w, in, out) -> (new_h, new_w, in, out), the PI-resized patch embedding.

  For any patch x, <resize(x), new kernel> = <x, kernel> when the new size is at
  least the old one (per output channel, summed over input channels).
  """
  if isinstance(new_size, int):
    new_size = (new_size, new_size)
  old_size = tuple(kernel.shape[:2])
  new_size = tuple(int(side) for side in new_size)
  if old_size == new_size:
    return kernel
  matrix = resize_matrix(old_size, new_size, method, antialias)
  # pinv(B^T) in float64 on the host: its size is the patch's, not the model's.
  inverse = jnp.asarray(np.linalg.pinv(matrix.T), jnp.float32)
  flat = kernel.reshape(old_size[0] * old_size[1], -1).astype(jnp.float32)
  resized = (inverse @ flat).reshape(new_size + kernel.shape[2:])
  return resized.astype(kernel.dtype)


def pi_resize_for(kernel, new_size, patch_resize="bilinear"):
  """`pi_resize_patch_kernel` with a model's `patch_resize` name (PATCH_RESIZE_METHODS)."""
  if patch_resize not in PATCH_RESIZE_METHODS:
    raise ValueError(f"patch_resize must be one of {tuple(PATCH_RESIZE_METHODS)}, not "
                     f"{patch_resize!r}.")
  method, antialias = PATCH_RESIZE_METHODS[patch_resize]
  return pi_resize_patch_kernel(kernel, new_size, method, antialias)


def resize_patches(images: jax.Array, patch_size: int, new_patch_size: int,
                   method: str = "bilinear", antialias: bool = True) -> jax.Array:
  """(B, H, W, C) images cut into patches, each resized on its own, put back together.

  The resize PI-resize inverts: with it, `pi_resize_patch_kernel` turns a
  p-patch embedding into a p'-patch one that gives the same tokens.
  """
  batch, height, width, channels = images.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  patches = images.reshape(batch, grid_h, patch_size, grid_w, patch_size, channels)
  patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(-1, patch_size * patch_size)
  matrix = jnp.asarray(resize_matrix((patch_size, patch_size), (new_patch_size,) * 2,
                                     method, antialias), images.dtype)
  resized = (patches @ matrix.T).reshape(batch, grid_h, grid_w, channels, new_patch_size,
                                         new_patch_size)
  return resized.transpose(0, 1, 4, 2, 5, 3).reshape(
      batch, grid_h * new_patch_size, grid_w * new_patch_size, channels)
