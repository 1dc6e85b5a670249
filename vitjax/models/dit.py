"""DiT: diffusion transformers with adaLN-Zero conditioning (Peebles & Xie, ICCV 2023).

    model = vitjax.create_model('dit_xl_patch2_256')        # on 32x32x4 SD-VAE latents
    prediction, out = model.apply({'params': params}, x_t, timesteps, labels)

A DiT is the ViT's parts with a condition: noisy images (or latents) are cut into
patches (`parts.PatchEmbedding`) with fixed 2-D sin-cos position embeddings; the
timestep (`conditioning.TimestepEmbedder`) and class (`conditioning.LabelEmbedder`,
with a null class for classifier-free guidance) embeddings are summed into the
condition `c`; every block is `parts.Block` with an adaLN-Zero modulation
(`parts.AdaLNModulation`): shift, scale and gate of both branches regressed from
`c`, the gates starting at zero. A final adaLN LayerNorm and a linear layer give
each patch's p*p*C outputs, unpatchified to an image: the noise prediction, and
with `learn_sigma` C more channels for the variance (Improved DDPM's interpolation
of log beta_t and log beta~_t).

Sizes (`variant` 'S/2' ... 'XL/8'): the paper's Table 1, widths 384 / 768 / 1024 /
1152, depths 12 / 12 / 24 / 28, heads 6 / 12 / 16 / 16, MLP ratio 4. DiT-XL/2 on
256x256 images (32x32x4 latents) has 675M parameters and 118.6 GFLOPs (fvcore's
count: one multiply-add each), as `tests/test_dit.py` checks for every size.

All diffusion models of vitjax answer one call (`vitjax.train.tasks.diffusion`):
`__call__(x, timesteps=None, labels=None, train=False, force_drop=None)` ->
`(prediction, out)`, x and prediction NHWC; `timesteps` (B,) ints or floats (None:
zeros, for init); `labels` (B,) ints (None, or `num_classes`: the null class).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import parts
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.conditioning import LabelEmbedder, TimestepEmbedder
from vitjax.models.layers import MlpBlock
from vitjax.models.mae import mae_sincos_2d, unpatchify
from vitjax.models.partitioning import logical

Dtype = Any

# name -> (width, depth, num_heads): DiT's Table 1 (MLP ratio 4 throughout).
DIT_SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def decode_variant(variant):
  """'XL/2' -> DiT fields (width, depth, num_heads, mlp_dim, patch_size)."""
  size, _, patch = variant.partition("/")
  if size not in DIT_SIZES or not patch.isdigit():
    raise ValueError(f"Unknown DiT variant {variant!r}; use SIZE/PATCH with SIZE in "
                     f"{', '.join(DIT_SIZES)} (e.g. 'XL/2', 'S/4').")
  width, depth, num_heads = DIT_SIZES[size]
  return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=4 * width,
              patch_size=int(patch))


def _layer_norm(name, attention_eps, mlp_eps, dtype):
  """The blocks' LayerNorm without scale or bias; its epsilon by branch (diffusers' DiT
  normalises the MLP branch with 1e-5, DiT's code both with 1e-6)."""
  epsilon = mlp_eps if name == "LayerNorm_1" else attention_eps
  return nn.LayerNorm(epsilon=epsilon, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiT(nn.Module):
  """Diffusion transformer: patchify, adaLN-Zero blocks, adaLN final layer, unpatchify."""
  image_size: int = 32  # The input's side: latents (32 for 256-pixel images) or pixels.
  in_channels: int = 4
  patch_size: int = 2
  width: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_dim: Optional[int] = None  # Default 4 * width.
  num_classes: int = 1000  # 0: unconditional (the timestep alone conditions).
  class_dropout_prob: float = 0.1  # Label dropout for classifier-free guidance.
  learn_sigma: bool = True  # 2 * in_channels outputs: noise and variance interpolation.
  frequency_dim: int = 256  # Sinusoids of the timestep embedding.
  freq_shift: float = 0.0  # Timestep frequencies' spacing; diffusers' DiT uses 1.
  layer_norm_eps: float = 1e-6
  mlp_norm_eps: Optional[float] = None  # The MLP branch's; None: layer_norm_eps.
  attention_impl: Optional[str] = None
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def out_channels(self):
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def null_class(self):
    """The label of the unconditional input (classifier-free guidance's)."""
    return self.num_classes

  @property
  def grid_size(self):
    return self.image_size // self.patch_size

  def block_factory(self):
    """The adaLN-Zero block: attention and a tanh-GELU MLP, each modulated by the condition."""
    attention = functools.partial(
        MultiHeadDotProductAttention, num_heads=self.num_heads, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, name="MultiHeadDotProductAttention_0")
    mlp = functools.partial(MlpBlock, mlp_dim=self.mlp_dim or 4 * self.width,
                            gelu_approximate=True, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="MlpBlock_0")
    norm = functools.partial(_layer_norm, attention_eps=self.layer_norm_eps,
                             mlp_eps=self.mlp_norm_eps or self.layer_norm_eps, dtype=self.dtype)
    modulation = functools.partial(parts.AdaLNModulation, self.width, 6, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
    return functools.partial(parts.Block, token_mixer=attention, channel_mixer=mlp, norm=norm,
                             modulation=modulation, param_dtype=self.param_dtype)

  def condition(self, timesteps, labels, train=False, force_drop=None):
    """(B, width) float32: the timestep embedding plus the class embedding."""
    c = TimestepEmbedder(self.width, self.frequency_dim, self.freq_shift,
                         param_dtype=self.param_dtype, name="t_embedder")(timesteps)
    if self.num_classes:
      c = c + LabelEmbedder(self.num_classes, self.width, self.class_dropout_prob,
                            param_dtype=self.param_dtype, name="y_embedder")(
                                labels, deterministic=not train, force_drop=force_drop)
    return c.astype(jnp.float32)

  @nn.compact
  def __call__(self, x, timesteps=None, labels=None, train=False, force_drop=None):
    """(prediction, out) for noisy NHWC `x` at `timesteps` with class `labels`."""
    batch, height, width_px, channels = x.shape
    if channels != self.in_channels or height % self.patch_size or width_px % self.patch_size:
      raise ValueError(f"DiT(in_channels={self.in_channels}, patch_size={self.patch_size}) got "
                       f"inputs of shape {x.shape}: give (batch, H, W, {self.in_channels}) with "
                       f"H and W multiples of {self.patch_size}.")
    timesteps = jnp.zeros((batch,)) if timesteps is None else jnp.broadcast_to(timesteps,
                                                                                (batch,))
    labels = (jnp.full((batch,), self.null_class) if labels is None
              else jnp.broadcast_to(labels, (batch,)))
    c = self.condition(timesteps, labels, train, force_drop)
    tokens = parts.share(self, parts.PatchEmbedding(
        self.patch_size, self.width, self.dtype, self.param_dtype))(x)
    grid_h, grid_w = tokens.shape[1:3]
    posemb = mae_sincos_2d(grid_h, grid_w, self.width)[:, 1:]  # Fixed: not a parameter.
    tokens = tokens.reshape(batch, grid_h * grid_w, self.width) + posemb.astype(self.dtype)
    tokens, _, encoder_out = parts.Encoder(
        self.block_factory(), self.depth, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, name="Transformer")(
            tokens, {parts.CONDITION: c}, deterministic=not train)
    shift, scale = parts.AdaLNModulation(self.width, 2, dtype=self.dtype,
                                         param_dtype=self.param_dtype,
                                         name="final_adaLN_modulation")(c)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, use_bias=False, use_scale=False,
                     dtype=self.dtype, name="final_norm")(tokens)
    y = nn.Dense(self.patch_size ** 2 * self.out_channels, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="final_linear",
                 kernel_init=logical(nn.initializers.zeros, "embed", None),
                 bias_init=logical(nn.initializers.zeros, None))(parts.modulate(y, shift, scale))
    prediction = unpatchify(y.astype(jnp.float32), self.patch_size, grid_h, self.out_channels)
    return prediction, {"condition": c, "encoded": tokens, **encoder_out}


PAPER = "Scalable Diffusion Models with Transformers (Peebles & Xie, 2023)"
SIZE_NAMES = {"S": "small", "B": "base", "L": "large", "XL": "xlarge"}


def register_models(register, register_family):
  """The `dit` family and the paper's models: `dit_{small,...,xlarge}_patch{2,4,8}_256`
  (32x32x4 SD-VAE latents of 256-pixel images, 1000 classes, learned sigma) and DiT-XL/2
  at 512 pixels (64x64 latents). Inputs are latents or [-1, 1] pixels: mean = std = 0.5."""
  half = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), paper=PAPER)
  register_family("dit", DiT, decode_variant, DIT_SIZES)
  for size, size_name in SIZE_NAMES.items():
    for patch in (2, 4, 8):
      register(f"dit_{size_name}_patch{patch}_256", DiT, image_size=32,
               **decode_variant(f"{size}/{patch}"), **half)
  register("dit_xlarge_patch2_512", DiT, image_size=64, **decode_variant("XL/2"), **half)


__all__ = ["DIT_SIZES", "DiT", "decode_variant", "register_models"]
