"""MLP-Mixer (Tolstikhin et al., 2021): token-mixing and channel-mixing MLPs, no attention.

Parameter names follow the published Mixer .npz checkpoints (`stem`,
`MixerBlock_{i}/token_mixing`, `.../channel_mixing`, `pre_head_layer_norm`,
`head`), so they load as they are.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models.layers import DropPath, MlpBlock, layer_norm, patch_stem_input
from vitjax.models.partitioning import constrain, logical

Dtype = Any

# Size table: name -> (hidden_dim, depth, tokens_mlp_dim, channels_mlp_dim), the paper's Table 1.
SIZES = {
    "S": (512, 8, 256, 2048),
    "B": (768, 12, 384, 3072),
    "L": (1024, 24, 512, 4096),
    "H": (1280, 32, 640, 5120),
}


def decode_variant(variant):
  """'B/16' -> dict(hidden_dim=768, depth=12, ..., patch_size=16)."""
  size, slash, patch = variant.partition("/")
  if size not in SIZES or not patch.isdigit():
    raise ValueError(f"Unknown Mixer variant {variant!r}: expected SIZE/PATCH with SIZE in "
                     f"{', '.join(SIZES)}, e.g. 'B/16'.")
  hidden_dim, depth, tokens_mlp_dim, channels_mlp_dim = SIZES[size]
  return dict(hidden_dim=hidden_dim, depth=depth, tokens_mlp_dim=tokens_mlp_dim,
              channels_mlp_dim=channels_mlp_dim, patch_size=int(patch))


class MixerBlock(nn.Module):
  """x + token_mixing(norm(x)^T)^T, then x + channel_mixing(norm(x))."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  drop_path: float = 0.0
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    norm = lambda name: layer_norm(name, self.layer_norm_eps, self.dtype, self.param_dtype)
    mlp = lambda dim, name: MlpBlock(dim, gelu_approximate=self.gelu_approximate,
                                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = jnp.swapaxes(norm("LayerNorm_0")(x), 1, 2)  # Mix along the tokens.
    y = jnp.swapaxes(mlp(self.tokens_mlp_dim, "token_mixing")(y, deterministic), 1, 2)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = mlp(self.channels_mlp_dim, "channel_mixing")(norm("LayerNorm_1")(x), deterministic)
    x = x + DropPath(self.drop_path)(y, deterministic)
    return constrain(x, "act_batch", "act_length", "act_embed")


class MlpMixer(nn.Module):
  """`__call__(images, train=False)` -> (logits, out) with `stem`, `encoded`, `pre_logits`."""
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  hidden_dim: int = 768
  depth: int = 12
  tokens_mlp_dim: int = 384
  channels_mlp_dim: int = 3072
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  head_zeroinit: bool = True
  in_channels: int = 3
  dynamic_img_pad: bool = False  # Zero-pad images to whole patches instead of an error (timm).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    deterministic = not train
    out = {}
    images = patch_stem_input(self, images, "stem")
    x = nn.Conv(self.hidden_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
                bias_init=logical(nn.initializers.zeros, "embed"),
                name="stem")(images.astype(self.dtype))
    batch, grid_h, grid_w, width = x.shape
    x = out["stem"] = x.reshape(batch, grid_h * grid_w, width)
    for i in range(self.depth):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim,
                     drop_path=self.drop_path_rate * i / max(self.depth - 1, 1),
                     gelu_approximate=self.gelu_approximate,
                     layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"MixerBlock_{i}")(x, deterministic)
    x = out["encoded"] = layer_norm("pre_head_layer_norm", self.layer_norm_eps, self.dtype,
                                    self.param_dtype)(x)
    out["tokens"] = x
    x = out["pre_logits"] = jnp.mean(x, axis=1)
    if not self.num_classes:
      out["logits"] = x
      return x, out
    kernel_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    logits = out["logits"] = nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
        kernel_init=logical(kernel_init, "embed", "classes"),
        bias_init=logical(nn.initializers.zeros, "classes"))(x)
    return logits, out
