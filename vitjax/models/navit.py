"""NaViT ("Patch n' Pack", Dehghani et al. 2023) and SigLIP 2 NaFlex: ViTs on packed sequences.

Several images of any size and aspect ratio share one sequence of patch tokens;
attention stays within each image through segment ids, and pooling gives one
vector per image. The model takes the packed input as a dict of arrays, each
(S sequences, L tokens) or (S, K image slots):

    patches      (S, L, p*p*C) float  patch pixels, flattened (row in patch, column, channel)
    segment_ids  (S, L) int           1..K: the image a token belongs to; 0: padding
    coords       (S, L, 2) int        (row, column) of the patch in its image's patch grid
    grid_sizes   (S, K, 2) int        (rows, columns) of image k+1's whole grid; (0, 0): empty

and returns `(logits (S, K, num_classes), out)`. Tokens may have been dropped
(NaViT's token dropping): coords need not cover an image's grid. `patchify`
cuts one image into that form (NumPy, for the input pipeline), `from_padded`
reads a padded batch of one image per row (Hugging Face Siglip2, timm NaFlexVit)
and `pack` puts images into sequences (tests and notebooks). NHWC images are
also accepted: each becomes a sequence of one image (initialisation, quick checks).

Position embeddings (`posemb`), per token from its coordinates and its image's grid:
  'factorized'     NaViT's: learned row and column tables (`max_grid` entries each),
                   indexed by the patch's row and column, summed (the paper's default).
  'fractional'     NaViT's fractional coordinates r = row / rows in [0, 1) (and the same
                   for columns) into the same tables: entry floor(r * max_grid). The paper
                   leaves open how a learned embedding of r is read; a table of
                   `max_grid` bins over [0, 1) is the simplest learned function of r.
  'learned_grid'   SigLIP 2 NaFlex and timm's NaFlexVit: one learned (G, G, width) grid
                   (G = `max_grid`) resized to each image's (rows, cols) as torch's
                   F.interpolate(align_corners=False) does: 'bilinear' (SigLIP 2) or
                   'bicubic' (timm's default), antialiased unless `posemb_antialias=False`.
                   The resize is separable and linear, so each token needs only its row's
                   and its column's weights over G (`resize_weights`): static shapes under
                   jit, whatever the images' sizes.
  'factorized_grid' timm's 'factorized': row and column tables resized (linearly, not
                   antialiased) to each image's rows and columns, summed.
  'none'           no position embedding.
`posemb_keep_aspect` resizes learned grids to a square of the longer side and crops
(timm's pos_embed_ar_preserving).

The parts are vitjax's (`parts.Block`, `parts.Encoder`, the attention and MLP), with
big_vision's parameter names: `embedding` (a (p, p, C, width) kernel, the ViT's conv,
so ViT and FlexiViT weights and the PI-resize apply), `Transformer/encoderblock_{i}`,
`Transformer/encoder_norm`, `MAPHead_0`, `head`. Registers (timm's reg_tokens) are
per image: each image slot gets `num_registers` tokens of its own segment.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import ops
from vitjax.models import flexi, parts, vit
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.layers import MAPHead, MlpBlock, norm_layer
from vitjax.models.partitioning import constrain, logical

Dtype = Any

POSEMBS = ("factorized", "fractional", "learned_grid", "factorized_grid", "none")
POOL_TYPES = ("map", "gap")
INPUT_KEYS = ("patches", "segment_ids", "coords", "grid_sizes")
decode_variant = vit.decode_variant
SIZES = vit.SIZES


# --- Inputs (NumPy on the host, or jnp) -----------------------------------------------------

def patchify(image, patch_size):
  """One (H, W, C) image -> (patches (n, p*p*C), coords (n, 2) int32, (rows, cols)).

  Patches are row-major over the grid, each flattened as (row in patch, column in
  patch, channel): the layout of a (p, p, C, width) Flax conv kernel reshaped to
  (p*p*C, width), and of Hugging Face Siglip2's image processor. Pure NumPy.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"patchify takes one (H, W, C) image; got shape {image.shape}.")
  height, width, channels = image.shape
  if height % patch_size or width % patch_size or not (height and width):
    raise ValueError(f"patchify: a {height}x{width} image is not a whole number of "
                     f"{patch_size}x{patch_size} patches: resize it to a multiple of "
                     f"{patch_size} first (e.g. {max(patch_size, height - height % patch_size)}x"
                     f"{max(patch_size, width - width % patch_size)}).")
  rows, cols = height // patch_size, width // patch_size
  patches = image.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
  patches = patches.reshape(rows * cols, patch_size * patch_size * channels)
  coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
  return patches, coords.reshape(-1, 2).astype(np.int32), (rows, cols)


class SequencePacker:
  """Greedy first fit: each image goes into the first sequence with room for its tokens
  and a free image slot. `num_sequences=None`: a new sequence whenever none has room."""

  def __init__(self, length, num_sequences, max_images):
    self.length, self.max_images, self.grows = length, max_images, num_sequences is None
    self.filled = np.zeros(num_sequences or 0, np.int64)
    self.counts = np.zeros(num_sequences or 0, np.int64)

  def place(self, tokens):
    """(sequence, slot) of an image of `tokens` tokens, or None where no sequence has room."""
    room = np.flatnonzero((self.filled + tokens <= self.length)
                          & (self.counts < self.max_images))
    if not len(room) and self.grows and tokens <= self.length:
      self.filled, self.counts = np.append(self.filled, 0), np.append(self.counts, 0)
      room = [len(self.filled) - 1]
    if not len(room):
      return None
    sequence = int(room[0])
    placement = (sequence, int(self.counts[sequence]))
    self.filled[sequence] += tokens
    self.counts[sequence] += 1
    return placement


def first_fit(lengths, length, num_sequences, max_images):
  """Per image, in order, the (sequence, slot) greedy first fit puts it in, or None."""
  packer = SequencePacker(length, num_sequences, max_images)
  return [packer.place(tokens) for tokens in lengths]


def pack_examples(examples, placements, *, length, max_images, num_sequences):
  """The packed dict of `examples` [(patches, coords, grid)] placed as `placements` say
  ((sequence, slot) each, or None: left out); sequences fill in the order of the examples."""
  dim = np.asarray(examples[0][0]).shape[-1] if examples else 0
  out = {"patches": np.zeros((num_sequences, length, dim), np.float32),
         "segment_ids": np.zeros((num_sequences, length), np.int32),
         "coords": np.zeros((num_sequences, length, 2), np.int32),
         "grid_sizes": np.zeros((num_sequences, max_images, 2), np.int32)}
  filled = np.zeros(num_sequences, np.int64)
  for (patches, coords, grid), placement in zip(examples, placements):
    if placement is None:
      continue
    sequence, slot = placement
    start, stop = filled[sequence], filled[sequence] + len(patches)
    out["patches"][sequence, start:stop] = patches
    out["coords"][sequence, start:stop] = coords
    out["segment_ids"][sequence, start:stop] = slot + 1
    out["grid_sizes"][sequence, slot] = grid
    filled[sequence] = stop
  return out


def pack(images, patch_size, *, length, max_images, num_sequences=None):
  """Images (each (H, W, C), or (patches, coords, grid) from `patchify`) -> a packed dict.

  First fit, in order (`first_fit`); `num_sequences` None: as many as needed. The
  input pipeline (vitjax.data.packing) packs with the same functions.
  """
  items = [item if isinstance(item, tuple) else patchify(item, patch_size) for item in images]
  if not items:
    raise ValueError("pack: no images.")
  too_long = [len(patches) for patches, _, _ in items if len(patches) > length]
  if too_long:
    raise ValueError(f"An image of {too_long[0]} patches does not fit length={length}.")
  placements = first_fit([len(patches) for patches, _, _ in items], length, num_sequences,
                         max_images)
  if None in placements:
    raise ValueError(f"The images need more than num_sequences={num_sequences} sequences.")
  count = max(sequence for sequence, _ in placements) + 1
  return pack_examples(items, placements, length=length, max_images=max_images,
                       num_sequences=count if num_sequences is None else num_sequences)


def from_padded(patches, valid, spatial_shapes=None, coords=None):
  """A padded batch, one image per row, -> the packed dict with K=1.

  Hugging Face Siglip2: `patches` = pixel_values (B, N, p*p*C), `valid` =
  pixel_attention_mask (B, N), `spatial_shapes` (B, 2); the first rows*cols
  tokens of each row are its image, row-major. timm NaFlexVit: `valid` =
  patch_valid, `coords` = patch_coord (B, N, 2) (each image's grid is then its
  largest coordinate + 1, as timm takes it). NumPy in, NumPy out; jnp in, jnp out.
  """
  xp = jnp if any(isinstance(a, jax.Array) for a in (patches, valid, spatial_shapes, coords)) \
      else np
  valid = xp.asarray(valid).astype(bool)
  segment_ids = valid.astype(xp.int32)
  if coords is None:
    if spatial_shapes is None:
      raise ValueError("from_padded needs spatial_shapes or coords.")
    spatial_shapes = xp.asarray(spatial_shapes).astype(xp.int32)
    index = xp.arange(valid.shape[1], dtype=xp.int32)[None]
    cols = xp.maximum(spatial_shapes[:, 1:2], 1)
    coords = xp.stack([index // cols, index % cols], axis=-1)
  coords = xp.where(valid[..., None], xp.asarray(coords).astype(xp.int32), 0)
  if spatial_shapes is None:
    spatial_shapes = xp.where(valid.any(axis=1)[:, None], coords.max(axis=1) + 1, 0)
  return {"patches": xp.asarray(patches), "segment_ids": segment_ids, "coords": coords,
          "grid_sizes": xp.asarray(spatial_shapes).astype(xp.int32)[:, None, :]}


def images_to_packed(images, patch_size):
  """(B, H, W, C) images (jnp) -> the packed dict: one sequence of one image per image."""
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"NaViT: {height}x{width} images are not a whole number of "
                     f"{patch_size}x{patch_size} patches; resize or crop them.")
  rows, cols = height // patch_size, width // patch_size
  patches = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, -1)
  coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
  return {"patches": patches,
          "segment_ids": jnp.ones((batch, rows * cols), jnp.int32),
          "coords": jnp.broadcast_to(jnp.asarray(coords.reshape(-1, 2), jnp.int32),
                                     (batch, rows * cols, 2)),
          "grid_sizes": jnp.full((batch, 1, 2), jnp.asarray([rows, cols], jnp.int32))}


# --- Resize weights -------------------------------------------------------------------------

def _triangle(x):
  return jnp.maximum(0.0, 1.0 - jnp.abs(x))


def _keys_cubic(x, a=-0.5):
  """Keys' cubic convolution kernel; a = -0.5 in antialiased torch, PIL and jax.image."""
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.where(x <= 1.0, near, jnp.where(x < 2.0, far, 0.0))


_KERNELS = {"bilinear": _triangle, "bicubic": _keys_cubic}


def resize_weights(position, out_size, in_size, method="bilinear", antialias=True):
  """(..., in_size) weights of output sample `position` when resizing `in_size` -> `out_size`.

  One axis of torch's F.interpolate(mode=method, align_corners=False, antialias=...)
  (and of jax.image.resize for antialias=True): the output sample's centre maps to
  (position + 0.5) * in / out - 0.5 in the input; each input sample gets the kernel
  at its distance, the kernel stretched by in / out when shrinking and antialiased,
  and the weights are normalised to sum to 1 (which also handles the borders).
  `position` and `out_size` may be traced arrays (broadcast together); `in_size` is static.
  Without antialias only 'bilinear' is supported (then the same as torch's).
  """
  if method not in _KERNELS:
    raise ValueError(f"Unknown resize method {method!r}; use 'bilinear' or 'bicubic'.")
  if method == "bicubic" and not antialias:
    raise ValueError("bicubic resizing without antialias (torch's a=-0.75, clamped borders) "
                     "is not supported; use antialias=True or 'bilinear'.")
  position = jnp.asarray(position, jnp.float32)[..., None]
  out_size = jnp.maximum(jnp.asarray(out_size, jnp.float32), 1.0)[..., None]
  scale = in_size / out_size
  support = jnp.maximum(scale, 1.0) if antialias else 1.0
  center = (position + 0.5) * scale - 0.5
  source = jnp.arange(in_size, dtype=jnp.float32)
  weights = _KERNELS[method]((source - center) / support)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


# --- Modules --------------------------------------------------------------------------------

class PatchEmbedding(nn.Module):
  """Flattened patches (..., p*p*C) -> tokens (..., width), with the ViT conv's parameters.

  The kernel is (p, p, C, width), as `nn.Conv` holds it, so ViT / FlexiViT weights
  load unchanged. Patches of another size p' (p'*p'*C values) meet the kernel
  PI-resized to p' (FlexiViT).
  """
  patch_size: int
  width: int
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches):
    p, channels = self.patch_size, self.in_channels
    kernel = self.param("kernel", logical(nn.initializers.lecun_normal(), None, None, None,
                                          "embed"),
        (p, p, channels, self.width), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros, "embed"), (self.width,),
                      self.param_dtype)
    dim = patches.shape[-1]
    if dim != p * p * channels:
      side = math.isqrt(dim // channels) if dim % channels == 0 else 0
      if side * side * channels != dim:
        raise ValueError(f"Patches of {dim} values are not p*p*{channels} for any patch "
                         f"size p (the model's patches have {p * p * channels}).")
      kernel = flexi.pi_resize_patch_kernel(kernel, side)
    kernel = kernel.reshape(dim, self.width)
    patches, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
    return ops.dense(patches, kernel, bias)


def _per_token(per_slot, segment_ids):
  """(S, K, ...) per image slot -> (S, L, ...) per token (padding: slot 0's)."""
  index = jnp.clip(segment_ids - 1, 0, per_slot.shape[1] - 1)
  return jnp.take_along_axis(per_slot, index.reshape(index.shape + (1,) * (per_slot.ndim - 2)),
                             axis=1)


class NaViT(nn.Module):
  """ViT over packed sequences of images of any size (NaViT, SigLIP 2 NaFlex, timm NaFlexVit).

  `__call__(inputs, train=False)`: `inputs` the packed dict (see the module
  docstring) or NHWC images -> `(logits (S, K, num_classes), out)`; `out` holds
  `tokens` (S, L, width: the encoded patch tokens, after the final norm unless
  `fc_norm`), `registers` (S, K, num_registers, width), `pre_logits` (S, K, width;
  zeros for empty slots), `logits`, `image_mask` (S, K: slots holding an image's
  tokens) and `encoder` (the encoder's intermediates).
  """
  num_classes: int = 1000  # 0: no head, logits are the pre-logits.
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  in_channels: int = 3
  pool_type: str = "map"  # Per image: 'map' (attention pooling) or 'gap' (mean of its tokens).
  posemb: str = "factorized"  # See POSEMBS and the module docstring.
  max_grid: int = 64  # Entries of the factorized tables; side G of the learned grid.
  posemb_resize: str = "bilinear"  # 'learned_grid': 'bilinear' (SigLIP 2) or 'bicubic' (timm).
  posemb_antialias: bool = True
  posemb_keep_aspect: bool = False  # timm's pos_embed_ar_preserving.
  num_registers: int = 0  # Per image (timm's reg_tokens); no position embedding.
  layer_scale_init: Optional[float] = None  # LayerScale (timm NaFlexVit: 1e-5).
  fc_norm: bool = False  # The final norm after pooling instead of over the tokens (timm 'avg').
  gelu_approximate: bool = False  # SigLIP (2): True.
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  layer_norm_eps: float = 1e-6
  attention_impl: Optional[str] = None  # See vitjax.ops.dot_product_attention.
  remat_policy: str = "none"
  scan_layers: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self):
    for name, allowed in (("pool_type", POOL_TYPES), ("posemb", POSEMBS),
                          ("posemb_resize", tuple(_KERNELS))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"Unknown {name} {getattr(self, name)!r}; use one of: "
                         f"{', '.join(map(repr, allowed))}.")
    if self.posemb_resize == "bicubic" and not self.posemb_antialias:
      raise ValueError("posemb_resize='bicubic' needs posemb_antialias=True.")

  def _inputs(self, inputs):
    if not isinstance(inputs, dict) and hasattr(inputs, "shape"):
      if inputs.ndim != 4:
        raise ValueError(f"NaViT takes the packed dict ({', '.join(INPUT_KEYS)}) or NHWC "
                         f"images; got an array of shape {inputs.shape}.")
      return images_to_packed(jnp.asarray(inputs), self.patch_size)
    missing = [k for k in INPUT_KEYS if k not in inputs]
    if missing:
      raise ValueError(f"NaViT's packed input lacks {', '.join(missing)}; it takes a dict of "
                       f"{', '.join(INPUT_KEYS)} (see vitjax.models.navit).")
    patches = jnp.asarray(inputs["patches"])
    if patches.ndim != 3:
      raise ValueError(f"inputs['patches'] must be (sequences, length, p*p*C); got shape "
                       f"{patches.shape}.")
    return {k: jnp.asarray(inputs[k]) for k in INPUT_KEYS}

  @nn.compact
  def __call__(self, inputs, train=False):
    self._check()
    deterministic = not train
    inputs = self._inputs(inputs)
    segment_ids = inputs["segment_ids"].astype(jnp.int32)
    grid_sizes = inputs["grid_sizes"].astype(jnp.int32)
    num_sequences, length = segment_ids.shape
    num_slots = grid_sizes.shape[1]
    slots = jnp.arange(1, num_slots + 1, dtype=jnp.int32)
    in_slot = segment_ids[..., None] == slots  # (S, L, K)
    image_mask = jnp.any(in_slot, axis=1)  # (S, K)

    x = PatchEmbedding(self.patch_size, self.width, self.in_channels, self.dtype,
                       self.param_dtype, name="embedding")(inputs["patches"])
    x = x + self._position_embedding(inputs["coords"], _per_token(grid_sizes, segment_ids))
    x = constrain(x, "act_batch", "act_length", "act_embed")
    out = {"stem": x, "image_mask": image_mask}

    registers = self.num_registers * num_slots
    if self.num_registers:
      reg = self.param("reg", logical(nn.initializers.normal(stddev=1e-6), None, None, "embed"),
                       (1, self.num_registers, self.width), self.param_dtype).astype(self.dtype)
      reg = jnp.broadcast_to(jnp.tile(reg, (1, num_slots, 1)),
                             (num_sequences, registers, self.width))
      reg_ids = jnp.where(image_mask, slots, 0)
      reg_ids = jnp.repeat(reg_ids, self.num_registers, axis=1)
      x = jnp.concatenate([reg, x], axis=1)
      segment_ids = jnp.concatenate([reg_ids, segment_ids], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)

    norm = functools.partial(norm_layer, "layernorm", epsilon=self.layer_norm_eps,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    attention = functools.partial(
        MultiHeadDotProductAttention, num_heads=self.num_heads, dropout=self.attention_dropout,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_0")
    mlp = functools.partial(MlpBlock, mlp_dim=self.mlp_dim, dropout=self.dropout,
                            gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="MlpBlock_0")
    block = functools.partial(parts.Block, token_mixer=attention, channel_mixer=mlp, norm=norm,
                              layer_scale_init=self.layer_scale_init, dropout=self.dropout,
                              param_dtype=self.param_dtype)
    x, _, out["encoder"] = parts.Encoder(
        block=block, depth=self.depth, norm=None if self.fc_norm else norm,
        drop_path_rate=self.drop_path_rate, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, name="Transformer")(
            x, {"segment_ids": segment_ids}, deterministic)
    if self.num_registers:
      out["registers"] = x[:, :registers].reshape(num_sequences, num_slots,
                                                  self.num_registers, self.width)
      x = x[:, registers:]
    segment_ids = inputs["segment_ids"].astype(jnp.int32)
    out["tokens"] = x

    if self.pool_type == "map":
      pooled = MAPHead(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, gelu_approximate=self.gelu_approximate,
          layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl,
          dtype=self.dtype, param_dtype=self.param_dtype, name="MAPHead_0")(
              x, segment_ids, num_slots)
    else:  # The mean of each image's tokens.
      weights = in_slot.astype(x.dtype)
      counts = jnp.maximum(jnp.sum(weights, axis=1), 1.0)[..., None]
      pooled = jnp.einsum("slk,sld->skd", weights, x) / counts
    if self.fc_norm:
      pooled = norm(name="fc_norm")(pooled)
    pooled = jnp.where(image_mask[..., None], pooled, 0.0).astype(x.dtype)
    out["pre_logits"] = pooled
    if not self.num_classes:
      out["logits"] = pooled
      return pooled, out
    kernel_init = (nn.initializers.zeros if self.head_zeroinit
                   else nn.initializers.normal(stddev=0.02))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=logical(kernel_init, "embed", "classes"),
                      bias_init=logical(nn.initializers.zeros, "classes"), name="head")(pooled)
    out["logits"] = logits
    return logits, out

  def _position_embedding(self, coords, grids):
    """(S, L, width) position embeddings of tokens at `coords` in images of `grids` (S, L, 2)."""
    if self.posemb == "none":
      return jnp.zeros((), self.dtype)
    size = self.max_grid
    init = logical(nn.initializers.normal(stddev=0.02), None, "embed")
    rows, cols = coords[..., 0], coords[..., 1]
    out_rows, out_cols = jnp.maximum(grids[..., 0], 1), jnp.maximum(grids[..., 1], 1)
    if self.posemb_keep_aspect:  # A square of the longer side, cropped to the image.
      out_rows = out_cols = jnp.maximum(out_rows, out_cols)
    if self.posemb == "learned_grid":
      table = self.param("pos_embedding", logical(nn.initializers.normal(stddev=0.02), None,
                                                  None, "embed"),
                         (size, size, self.width), self.param_dtype)
      weights = functools.partial(resize_weights, in_size=size, method=self.posemb_resize,
                                  antialias=self.posemb_antialias)
      row_weights, col_weights = weights(rows, out_rows), weights(cols, out_cols)
      # The outer product of a token's weights against the flattened grid: (G*G) per
      # token in memory, where contracting one axis first would hold (G, width).
      outer = (row_weights[..., :, None] * col_weights[..., None, :]).reshape(
          rows.shape + (size * size,))
      return jnp.einsum("slg,gd->sld", outer, table.reshape(size * size, self.width).astype(
          jnp.float32)).astype(self.dtype)
    row_table = self.param("pos_embedding_row", init, (size, self.width), self.param_dtype)
    col_table = self.param("pos_embedding_col", init, (size, self.width), self.param_dtype)
    if self.posemb == "factorized_grid":  # timm's: each table resized linearly, not antialiased.
      weights = functools.partial(resize_weights, in_size=size, method="bilinear",
                                  antialias=False)
      return (jnp.einsum("slg,gd->sld", weights(rows, out_rows), row_table.astype(jnp.float32))
              + jnp.einsum("slg,gd->sld", weights(cols, out_cols),
                           col_table.astype(jnp.float32))).astype(self.dtype)
    if self.posemb == "fractional":  # r = row / rows in [0, 1) -> bin floor(r * G).
      rows = (rows * size) // out_rows
      cols = (cols * size) // out_cols
    take = lambda table, index: jnp.take(table, jnp.clip(index, 0, size - 1), axis=0)
    return (take(row_table, rows) + take(col_table, cols)).astype(self.dtype)


def register_models(register, *, mean, std):
  """SigLIP 2 NaFlex image towers (Hugging Face's sizes) and timm's naflexvit_* names.

  Parameter counts are pinned to transformers' Siglip2VisionModel and timm 1.0.31
  (tests/test_navit.py). Not registered: timm's so150m2 (bias-free q, k, v) and
  RADIO names. `max_grid`: the 16 x 16 grid of their position embeddings.
  """
  siglip2_paper = ("SigLIP 2: Multilingual Vision-Language Encoders with Improved Semantic "
                   "Understanding, Localization, and Dense Features (Tschannen et al., 2025)")
  naflex = dict(posemb="learned_grid", max_grid=16, patch_size=16)
  siglip = dict(naflex, pool_type="map", posemb_resize="bilinear", gelu_approximate=True,
                num_classes=0, head_zeroinit=False)
  so400m = dict(width=1152, depth=27, mlp_dim=4304, num_heads=16)
  base = {k: v for k, v in decode_variant("B/16").items() if k != "patch_size"}
  for size_name, size in (("base", base), ("so400m", so400m)):
    register(f"siglip2_naflex_{size_name}_patch16", NaViT, mean=mean, std=std,
             paper=siglip2_paper, crop_pct=1.0, **siglip, **size)
    register(f"naflexvit_{size_name}_patch16_siglip", NaViT, mean=mean, std=std,
             paper=siglip2_paper, crop_pct=1.0, **siglip, **size)
  timm = dict(naflex, posemb_resize="bicubic", layer_scale_init=1e-5, **base)
  gap = dict(timm, pool_type="gap", num_registers=4, fc_norm=True)
  for name, options in (
      ("naflexvit_base_patch16_gap", gap),
      ("naflexvit_base_patch16_par_gap", dict(gap, posemb_keep_aspect=True)),
      ("naflexvit_base_patch16_parfac_gap", dict(gap, posemb_keep_aspect=True,
                                                 posemb="factorized_grid")),
      ("naflexvit_base_patch16_map", dict(timm, pool_type="map", num_registers=1))):
    register(name, NaViT, mean=mean, std=std, paper=NAVIT_PAPER, crop_pct=1.0, **options)


NAVIT_PAPER = ("Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution "
               "(Dehghani et al., 2023)")


__all__ = ["NaViT", "PatchEmbedding", "POSEMBS", "from_padded",
           "images_to_packed", "pack", "patchify", "register_models", "resize_weights"]
