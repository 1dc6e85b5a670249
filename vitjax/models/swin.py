"""Swin Transformer v1 (Liu et al. 2021): attention within shifted local windows.

A 4x4 patch embedding feeds four stages at strides 4, 8, 16 and 32. Each stage
starts with patch merging (2x2 neighbours concatenated, LayerNorm, Linear 4C -> 2C;
not in the first stage, as timm >= 0.9 lays it out) and runs blocks that attend
within non-overlapping windows of `window_size`^2 tokens; odd blocks first shift
the map cyclically by window_size // 2, so windows straddle the previous ones,
and a mask keeps tokens that the shift brought together from different image
regions apart. Each block has a learned relative position bias table, (2W-1)^2 x
heads, passed to `vitjax.ops.dot_product_attention` as its additive bias.

Window sizes follow the configured `image_size`: a stage whose feature map is no
larger than the window attends over the whole map in one window (clipped to the
map, so its table is smaller) and does not shift, as in timm and HF transformers.
Inputs of other sizes are padded to whole windows (bottom and right, with zeros
after the block's first LayerNorm, as in HF transformers and the official detection
code), and odd maps are padded before patch merging.

Parameter names: `embedding`, `embedding_norm`, `stage{s}/downsample/{norm,reduction}`,
`stage{s}/block{j}/{LayerNorm_0, MultiHeadDotProductAttention_0,
relative_position_bias_table, LayerNorm_1, MlpBlock_0}`, `encoder_norm`, `head`.
vitjax.convert.swin loads timm and HF transformers checkpoints into them.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.layers import DropPath, MlpBlock, layer_norm, patch_stem_input
from vitjax.models.partitioning import constrain, logical

Dtype = Any

# Size table: name -> (embed_dim, depths, num_heads).
SIZES = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
# timm names: size, window, resolution (ImageNet-1k classifiers; the 384 px ones and
# the large ones were pre-trained on ImageNet-22k).
TIMM_NAMES = (("tiny", 7, 224), ("small", 7, 224), ("base", 7, 224), ("base", 12, 384),
              ("large", 7, 224), ("large", 12, 384))
PAPER = "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al., 2021)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_swins(register, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """Registers the timm Swin names ('swin_tiny_patch4_window7_224', ...) with `register`.

  `register(name, module, *, mean, std, paper, **defaults)` is the model
  registry's (vitjax.models.register).
  """
  for size, window, resolution in TIMM_NAMES:
    embed_dim, depths, num_heads = SIZES[size]
    register(f"swin_{size}_patch4_window{window}_{resolution}", SwinTransformer,
             mean=mean, std=std, paper=PAPER, num_classes=1000, image_size=resolution,
             patch_size=4, window_size=window, embed_dim=embed_dim, depths=depths,
             num_heads=num_heads)


# --- Windows: pure functions of shapes and arrays (NumPy or JAX) ----------------------------

def stage_windows(image_size, patch_size, window_size, num_stages):
  """[(resolution, window, shift)] per stage, for square images of `image_size`.

  A map no larger than the window is attended as one window and not shifted.
  """
  resolution = -(-image_size // patch_size)
  out = []
  for stage in range(num_stages):
    if stage:
      resolution = -(-resolution // 2)  # Patch merging pads odd maps.
    if resolution <= window_size:
      out.append((resolution, resolution, 0))
    else:
      out.append((resolution, window_size, window_size // 2))
  return out


def window_partition(x, window):
  """(batch, H, W, C) -> (batch * H/window * W/window, window^2, C); windows row-major."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows, window, height, width):
  """The inverse of `window_partition`: -> (batch, height, width, C)."""
  channels = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_position_index(window):
  """(window^2, window^2) ints: the row of the bias table for each (query, key) pair."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  coords = coords.reshape(2, -1)
  relative = coords[:, :, None] - coords[:, None, :] + window - 1  # Each in [0, 2W-2].
  return relative[0] * (2 * window - 1) + relative[1]


def shifted_window_mask(height, width, window, shift):
  """(num_windows, window^2, window^2) bools: True where attention is allowed.

  After a cyclic shift by `shift`, the last windows of each row and column hold
  tokens from opposite image borders; each axis splits into three regions
  ([0, L-window), [L-window, L-shift), [L-shift, L)) and tokens attend only within
  their own region pair.
  """
  def regions(length):
    index = np.arange(length)
    return (index >= length - window).astype(np.int32) + (index >= length - shift)

  region = regions(height)[:, None] * 3 + regions(width)[None, :]
  region = window_partition(region[None, :, :, None], window)[..., 0]
  return region[:, :, None] == region[:, None, :]


# --- Modules --------------------------------------------------------------------------------

class SwinBlock(nn.Module):
  """x + attn(norm(x)) within (shifted) windows, then x + mlp(norm(x)); x is (B, H, W, C)."""
  num_heads: int
  window_size: int
  shift_size: int = 0
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-5
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    batch, height, width, channels = x.shape
    window, shift = self.window_size, self.shift_size
    norm = lambda name: layer_norm(name, self.layer_norm_eps, self.dtype, self.param_dtype)

    y = norm("LayerNorm_0")(x)
    pad_h, pad_w = -height % window, -width % window
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    padded_h, padded_w = height + pad_h, width + pad_w
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    windows = window_partition(y, window)

    table = self.param("relative_position_bias_table",
                       logical(nn.initializers.truncated_normal(stddev=0.02), None, "heads"),
                       ((2 * window - 1) ** 2, self.num_heads), self.param_dtype)
    bias = table[relative_position_index(window)]  # (N, N, heads)
    bias = jnp.transpose(bias, (2, 0, 1))[None].astype(self.dtype)
    mask = None
    if shift:
      allowed = shifted_window_mask(padded_h, padded_w, window, shift)
      num_windows, tokens = allowed.shape[:2]
      # Windows are batch-major: window k of image b is row b * num_windows + k.
      mask = jnp.broadcast_to(allowed[None, :, None], (batch, num_windows, 1, tokens, tokens))
      mask = mask.reshape(batch * num_windows, 1, tokens, tokens)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name="MultiHeadDotProductAttention_0",
    )(windows, bias=bias, mask=mask, deterministic=deterministic)

    y = window_reverse(y, window, padded_h, padded_w)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :height, :width]
    x = x + DropPath(self.drop_path)(y, deterministic)

    tokens = x.reshape(batch, height * width, channels)
    y = norm("LayerNorm_1")(tokens)
    y = MlpBlock(mlp_dim=int(channels * self.mlp_ratio), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="MlpBlock_0")(y, deterministic)
    tokens = tokens + DropPath(self.drop_path)(y, deterministic)
    tokens = constrain(tokens, "act_batch", "act_length", "act_embed")
    return tokens.reshape(batch, height, width, channels)


class PatchMerging(nn.Module):
  """(B, H, W, C) -> (B, H/2, W/2, 2C): each 2x2 neighbourhood, normed and projected."""
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    height, width = x.shape[1:3]
    # Channel order of timm and HF: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    x = x.transpose(0, 1, 3, 4, 2, 5).reshape(batch, height // 2, width // 2, 4 * channels)
    x = layer_norm("norm", self.layer_norm_eps, self.dtype, self.param_dtype)(x)
    return nn.Dense(2 * channels, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical(nn.initializers.lecun_normal(), None, "embed"),
                    name="reduction")(x)


class SwinStage(nn.Module):
  """Optional patch merging, then `depth` blocks; odd blocks shift their windows."""
  depth: int
  num_heads: int
  window_size: int
  shift_size: int
  downsample: bool
  drop_path: Sequence[float]  # One rate per block.
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    if self.downsample:
      x = PatchMerging(self.layer_norm_eps, self.dtype, self.param_dtype, name="downsample")(x)
    for j in range(self.depth):
      x = SwinBlock(
          num_heads=self.num_heads, window_size=self.window_size,
          shift_size=self.shift_size if j % 2 else 0, mlp_ratio=self.mlp_ratio,
          drop_path=self.drop_path[j], layer_norm_eps=self.layer_norm_eps,
          attention_impl=self.attention_impl, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"block{j}")(x, deterministic)
    return x


class SwinTransformer(nn.Module):
  """Swin Transformer v1 classifier.

  `__call__(images, train=False)` takes NHWC images and returns `(logits, out)`.
  `out` holds `stem` (normed patch embeddings), `stage1`.. (each stage's output
  map, NHWC, for dense heads), `encoded` (the last map after the final norm),
  `pre_logits` (its global average) and `logits`.
  """
  num_classes: int = 1000  # 0: no head, logits are the pre-logits.
  image_size: int = 224  # The resolution window sizes are fitted to (see stage_windows).
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  layer_norm_eps: float = 1e-5
  in_channels: int = 3
  attention_impl: Optional[str] = None  # See vitjax.ops.dot_product_attention.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
                       "need one entry per stage.")
    deterministic = not train
    out = {}
    # Any size of at least a patch: padded to whole patches here (as HF transformers does),
    # to whole windows in each block and to even maps before patch merging.
    x = patch_stem_input(self, images, "embedding", pad=True).astype(self.dtype)
    x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
                bias_init=logical(nn.initializers.zeros, "embed"), name="embedding")(x)
    x = out["stem"] = layer_norm("embedding_norm", self.layer_norm_eps, self.dtype,
                                 self.param_dtype)(x)

    # Stochastic depth rises linearly over all blocks of all stages.
    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    windows = stage_windows(self.image_size, self.patch_size, self.window_size, len(self.depths))
    for stage, (depth, num_heads, (_, window, shift)) in enumerate(
        zip(self.depths, self.num_heads, windows)):
      first = sum(self.depths[:stage])
      x = SwinStage(
          depth=depth, num_heads=num_heads, window_size=window, shift_size=shift,
          downsample=stage > 0, drop_path=tuple(rates[first:first + depth]),
          mlp_ratio=self.mlp_ratio, layer_norm_eps=self.layer_norm_eps,
          attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
          name=f"stage{stage + 1}")(x, deterministic)
      out[f"stage{stage + 1}"] = x

    x = out["encoded"] = layer_norm("encoder_norm", self.layer_norm_eps, self.dtype,
                                    self.param_dtype)(x)
    x = out["pre_logits"] = jnp.mean(x, axis=(1, 2))
    if not self.num_classes:
      out["logits"] = x
      return x, out
    kernel_init = (nn.initializers.zeros if self.head_zeroinit
                   else nn.initializers.normal(stddev=0.02))
    logits = out["logits"] = nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=logical(kernel_init, "embed", "classes"),
        bias_init=logical(nn.initializers.zeros, "classes"), name="head")(x)
    return logits, out
