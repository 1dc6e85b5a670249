"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`), NHWC: images <-> latents.

    vae = AutoencoderKL(**CONFIGS['sd_vae'])               # or from_diffusers_config(config)
    vae, params = vitjax.convert.vae.load_diffusers_vae('sd-vae-ft-ema/')  # diffusers weights
    posterior = vae.apply({'params': params}, images, method='encode')     # images in [-1, 1]
    latents = vae.scale(posterior.mode())        # what a latent diffusion model (DiT) sees
    images = vae.apply({'params': params}, vae.unscale(latents), method='decode')

The KL-regularised autoencoder of "High-Resolution Image Synthesis with Latent Diffusion
Models" (Rombach et al., 2022), built as diffusers builds it from 'DownEncoderBlock2D' and
'UpDecoderBlock2D' blocks: ResNet blocks of GroupNorm (eps 1e-6), SiLU and 3x3 convolutions;
a stride-2 convolution after zero-padding only the bottom and right to downsample; nearest
2x upsampling then a convolution; a mid block of ResNet, single-head self-attention over
the positions, ResNet. The encoder downsamples by 2 ** (len(block_out_channels) - 1) (8 for
Stable Diffusion). Parameter names are diffusers' module names with '/' for '.' and '_i' for
list entries (`encoder/down_blocks_0/resnets_1/conv2`), so either side is easy to find from
the other; the attention is vitjax's MultiHeadDotProductAttention with one head.
"""

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models.attention import MultiHeadDotProductAttention

Dtype = Any

LDM_PAPER = "High-Resolution Image Synthesis with Latent Diffusion Models (Rombach et al., 2022)"
SDXL_PAPER = ("SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis "
              "(Podell et al., 2023)")

# Stable Diffusion 1.x/2.x's VAE; stabilityai/sd-vae-ft-ema and -mse (what DiT uses) have
# this config. SDXL's VAE has the same network, retrained, and its latents' own scaling.
CONFIGS = {
    "sd_vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   latent_channels=4, norm_num_groups=32, sample_size=256,
                   scaling_factor=0.18215),
    "sdxl_vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                     latent_channels=4, norm_num_groups=32, sample_size=1024,
                     scaling_factor=0.13025),
}

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# Keys of a diffusers config.json that do not change the network or its latents.
_IGNORED_CONFIG_KEYS = ("_class_name", "_diffusers_version", "_name_or_path",
                        "_use_default_values", "force_upcast")


def scale_latents(latents, scaling_factor, shift_factor=None):
  """The posterior's latents -> the diffusion model's, of about unit variance: (z - shift) * s."""
  if shift_factor is not None:
    latents = latents - shift_factor
  return latents * scaling_factor


def unscale_latents(latents, scaling_factor, shift_factor=None):
  """The inverse of `scale_latents`: what `decode` takes, from the diffusion model's latents."""
  latents = latents / scaling_factor
  return latents if shift_factor is None else latents + shift_factor


class DiagonalGaussian(NamedTuple):
  """The encoder's posterior q(z | x) = N(mean, exp(logvar)), independent per latent element.

  A pytree (it comes out of jit) that unpacks as `mean, logvar = posterior`.
  """
  mean: jax.Array
  logvar: jax.Array  # Clipped to [-30, 20], as diffusers does.

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def mode(self):
    return self.mean

  def sample(self, rng):
    noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
    return self.mean + self.std * noise

  def kl(self):
    """KL(q || N(0, I)) per example, summed over the latent elements (diffusers' kl())."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar,
                         axis=(1, 2, 3))


def _conv(parent, features, name, kernel_size=3, strides=1, padding=1):
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides, padding=padding,
                 dtype=parent.dtype, param_dtype=parent.param_dtype, name=name)


def _group_norm(parent, name):
  # The two-pass variance: E[x^2] - E[x]^2 loses digits where channels have large means.
  return nn.GroupNorm(num_groups=parent.norm_num_groups, epsilon=1e-6, use_fast_variance=False,
                      dtype=parent.dtype, param_dtype=parent.param_dtype, name=name)


class ResnetBlock(nn.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))); a 1x1 `conv_shortcut` if the width changes."""
  features: int
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _conv(self, self.features, "conv1")(nn.silu(_group_norm(self, "norm1")(x)))
    h = _conv(self, self.features, "conv2")(nn.silu(_group_norm(self, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self, self.features, "conv_shortcut", kernel_size=1, padding=0)(x)
    return x + h


class MidBlock(nn.Module):
  """ResnetBlock, then (if `add_attention`) single-head self-attention over the H*W positions
  with a residual, then ResnetBlock (diffusers' UNetMidBlock2D)."""
  norm_num_groups: int = 32
  add_attention: bool = True
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    block = lambda name: ResnetBlock(x.shape[-1], self.norm_num_groups, self.dtype,
                                     self.param_dtype, name=name)
    x = block("resnets_0")(x)
    if self.add_attention:
      batch, height, width, channels = x.shape
      tokens = _group_norm(self, "attention_norm")(x).reshape(batch, height * width, channels)
      tokens = MultiHeadDotProductAttention(
          num_heads=1, attention_impl=self.attention_impl, dtype=self.dtype,
          param_dtype=self.param_dtype, name="attention")(tokens)
      x = x + tokens.reshape(x.shape)
    return block("resnets_1")(x)


class ResnetStage(nn.Module):
  """`num_layers` ResnetBlocks, then a resampling: 'down' (a stride-2 conv: diffusers'
  DownEncoderBlock2D), 'up' (nearest 2x and a conv: UpDecoderBlock2D) or None."""
  features: int
  num_layers: int
  resample: Optional[str] = None
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock(self.features, self.norm_num_groups, self.dtype, self.param_dtype,
                      name=f"resnets_{i}")(x)
    if self.resample == "down":
      # Only the bottom and right are padded (the LDM code's choice, which diffusers keeps).
      x = _conv(self, self.features, "downsample", strides=2, padding=((0, 1), (0, 1)))(x)
    elif self.resample == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = _conv(self, self.features, "upsample")(x)
    return x


class Encoder(nn.Module):
  """Images -> the posterior's moments, (B, H/f, W/f, 2 * latent_channels): mean, logvar."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    common = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    x = _conv(self, self.block_out_channels[0], "conv_in")(x)
    last = len(self.block_out_channels) - 1
    for i, features in enumerate(self.block_out_channels):
      x = ResnetStage(features, self.layers_per_block, "down" if i < last else None,
                      **common, name=f"down_blocks_{i}")(x)
    x = MidBlock(add_attention=self.mid_block_add_attention, attention_impl=self.attention_impl,
                 **common, name="mid_block")(x)
    x = nn.silu(_group_norm(self, "conv_norm_out")(x))
    return _conv(self, 2 * self.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    common = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    x = _conv(self, self.block_out_channels[-1], "conv_in")(z)
    x = MidBlock(add_attention=self.mid_block_add_attention, attention_impl=self.attention_impl,
                 **common, name="mid_block")(x)
    last = len(self.block_out_channels) - 1
    for i, features in enumerate(reversed(self.block_out_channels)):
      # One ResnetBlock more per block than the encoder, as in diffusers.
      x = ResnetStage(features, self.layers_per_block + 1, "up" if i < last else None,
                      **common, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(self, "conv_norm_out")(x))
    return _conv(self, self.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL in NHWC, with its config fields and defaults.

  `encode(images)` -> DiagonalGaussian posterior; `decode(latents)` -> images;
  `__call__(images)` -> (reconstruction, {'posterior', 'latents'}), decoding the
  posterior's mode, or a sample with `sample_posterior=True` (rng stream 'sample').
  Images are in [-1, 1]. `scale` / `unscale` map the posterior's latents to the
  diffusion model's and back (no parameters: call them on the module itself).
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32  # The image size the weights were trained at; for init and shapes.
  scaling_factor: float = 0.18215  # 1 / std of the latents (Rombach et al., section 4.3.2).
  shift_factor: Optional[float] = None  # Their mean, subtracted first (SD3, FLUX).
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  attention_impl: Optional[str] = None  # vitjax.ops' attention: None (auto), 'xla', 'cudnn'...
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def image_size(self):
    """`sample_size`, by the name vitjax's helpers (dummy_input, param_shapes) read."""
    return self.sample_size

  @property
  def downsample_factor(self):
    """How much smaller the latents are than the images, per side (8 for Stable Diffusion)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention,
                  attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    conv = lambda features: nn.Conv(features, (1, 1), dtype=self.dtype,
                                    param_dtype=self.param_dtype)
    self.quant_conv = conv(2 * self.latent_channels) if self.use_quant_conv else None
    self.post_quant_conv = conv(self.latent_channels) if self.use_post_quant_conv else None

  def encode(self, images):
    """(B, H, W, in_channels) images in [-1, 1] -> DiagonalGaussian over (B, H/f, W/f, latent)."""
    _check_nhwc(images, self.in_channels, "encode", "images", "in_channels")
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents):
    """(B, h, w, latent_channels) latents, as `encode` gives them (not `scale`d) -> images."""
    _check_nhwc(latents, self.latent_channels, "decode", "latents", "latent_channels")
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images, sample_posterior=False):
    posterior = self.encode(images)
    latents = posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
    return self.decode(latents), {"posterior": posterior, "latents": latents}

  def scale(self, latents):
    """Posterior latents -> the diffusion model's: (z - shift_factor) * scaling_factor."""
    return scale_latents(latents, self.scaling_factor, self.shift_factor)

  def unscale(self, latents):
    """The diffusion model's latents -> what `decode` takes."""
    return unscale_latents(latents, self.scaling_factor, self.shift_factor)


def _check_nhwc(x, channels, method, what, field):
  shape = tuple(x.shape)
  if len(shape) != 4:
    raise ValueError(f"AutoencoderKL.{method} takes NHWC {what} (batch, height, width, "
                     f"channels); got shape {shape}.")
  if shape[-1] != channels:
    layout = (f" (it looks like NCHW: transpose with x.transpose(0, 2, 3, 1))"
              if shape[1] == channels else "")
    raise ValueError(f"AutoencoderKL.{method} takes {what} with {field}={channels} channels "
                     f"last; got shape {shape}{layout}.")


def config_from_diffusers(config):
  """A diffusers AutoencoderKL config (config.json as a dict) -> AutoencoderKL's fields.

  Missing keys take diffusers' defaults, as `AutoencoderKL.from_config` does. Raises
  ValueError for what vitjax's port does not build: other block types, another
  activation than SiLU, per-channel latent statistics, or keys it does not know.
  """
  config = dict(config)
  class_name = config.get("_class_name", "AutoencoderKL")
  if class_name != "AutoencoderKL":
    raise ValueError(f"The config is a diffusers {class_name}'s, not an AutoencoderKL's.")
  for key in _IGNORED_CONFIG_KEYS:
    config.pop(key, None)
  down = tuple(config.pop("down_block_types", (DOWN_BLOCK,)))
  up = tuple(config.pop("up_block_types", (UP_BLOCK,)))
  act_fn = config.pop("act_fn", "silu")
  statistics = {k: config.pop(k, None) for k in ("latents_mean", "latents_std")}
  problems = []
  for kind, types, supported in (("down", down, DOWN_BLOCK), ("up", up, UP_BLOCK)):
    other = sorted(set(types) - {supported})
    if other:
      problems.append(f"{kind}_block_types {', '.join(other)} (vitjax builds {supported} only)")
  if act_fn not in ("silu", "swish"):
    problems.append(f"act_fn={act_fn!r} (vitjax builds 'silu' only)")
  if any(v is not None for v in statistics.values()):
    problems.append("per-channel latents_mean / latents_std (vitjax scales the latents by "
                    "scaling_factor and shift_factor only; drop the keys and apply them yourself)")
  fields = {f for f in AutoencoderKL.__dataclass_fields__ if f not in ("parent", "name")}
  unknown = sorted(set(config) - fields)
  if unknown:
    problems.append(f"unknown keys {', '.join(unknown)}")
  if problems:
    raise ValueError("The diffusers AutoencoderKL config has what vitjax's port does not build: "
                     + "; ".join(problems) + ".")
  width = len(config.get("block_out_channels", AutoencoderKL.block_out_channels))
  if len(down) != width or len(up) != width:
    raise ValueError(f"The config has {len(down)} down and {len(up)} up blocks for "
                     f"{width} block_out_channels; they must be equal.")
  if "block_out_channels" in config:
    config["block_out_channels"] = tuple(config["block_out_channels"])
  if isinstance(config.get("sample_size"), (list, tuple)):
    config["sample_size"] = int(config["sample_size"][0])
  return config


def from_diffusers_config(config, **overrides):
  """An AutoencoderKL from a diffusers config dict; `overrides` (dtype=...) on top."""
  return AutoencoderKL(**{**config_from_diffusers(config), **overrides})


def to_diffusers_config(model):
  """The config.json dict with which diffusers' AutoencoderKL builds the same network."""
  blocks = len(model.block_out_channels)
  return {
      "_class_name": "AutoencoderKL",
      "in_channels": model.in_channels,
      "out_channels": model.out_channels,
      "down_block_types": [DOWN_BLOCK] * blocks,
      "up_block_types": [UP_BLOCK] * blocks,
      "block_out_channels": list(model.block_out_channels),
      "layers_per_block": model.layers_per_block,
      "act_fn": "silu",
      "latent_channels": model.latent_channels,
      "norm_num_groups": model.norm_num_groups,
      "sample_size": model.sample_size,
      "scaling_factor": model.scaling_factor,
      "shift_factor": model.shift_factor,
      "latents_mean": None,
      "latents_std": None,
      "use_quant_conv": model.use_quant_conv,
      "use_post_quant_conv": model.use_post_quant_conv,
      "mid_block_add_attention": model.mid_block_add_attention,
  }


def register_models(register, **kwargs):
  """Registers `sd_vae` (SD 1.x/2.x, sd-vae-ft-ema/-mse) and `sdxl_vae` (SDXL's scaling)."""
  register("sd_vae", AutoencoderKL, paper=LDM_PAPER, **kwargs, **CONFIGS["sd_vae"])
  register("sdxl_vae", AutoencoderKL, paper=SDXL_PAPER, **kwargs, **CONFIGS["sdxl_vae"])
