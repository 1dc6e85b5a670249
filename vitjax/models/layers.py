"""Building blocks shared by the model families: norms, MLPs, stochastic depth, MAP head."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import ops
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.partitioning import constrain, logical


Dtype = Any


def layer_norm(name, epsilon, dtype, param_dtype, use_bias=True, axis_name="embed"):
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      use_bias=use_bias, scale_init=logical(nn.initializers.ones, axis_name),
                      bias_init=logical(nn.initializers.zeros, axis_name))


class RMSNorm(nn.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019; LLaMA): x / rms(x) * scale, no centring.

  The statistics are taken in float32 whatever the activation dtype, as LLaMA does.
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.ones, self.axis_name), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


def norm_layer(kind, name, epsilon, dtype, param_dtype, use_bias=True):
  """A 'layernorm' or 'rmsnorm' (which has no bias) module named `name`."""
  if kind == "layernorm":
    return layer_norm(name, epsilon, dtype, param_dtype, use_bias=use_bias)
  if kind == "rmsnorm":
    return RMSNorm(epsilon, dtype, param_dtype, name=name)
  raise ValueError(f"Unknown norm {kind!r}; use 'layernorm' or 'rmsnorm'.")


class LayerScale(nn.Module):
  """Per-channel learned scaling of a residual branch (CaiT, DINOv2), `scale` = init at start."""
  init_value: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.constant(self.init_value), "embed"),
                       (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class Dense(nn.Module):
  """nn.Dense's parameters and value, through `vitjax.ops.dense` (a faster backward on CPUs)."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return ops.dense(x, kernel, bias)


ACTIVATIONS = ("gelu", "quick_gelu")


def gelu(x):
  """The exact GELU, x Φ(x), as PyTorch computes it: x/2 (1 + erf(x/√2)).

  jax.nn.gelu's form, x/2 erfc(-x/√2), keeps relative precision far in the negative tail,
  where the values are below 1e-6 in magnitude; its erfc costs XLA:CPU three passes over
  the (tokens, mlp_dim) activations against one for erf (the CPU figure: BENCHMARKS.md).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def mlp_activation(name, gelu_approximate=False):
  """The MLP nonlinearity: 'gelu' (exact, or tanh with `gelu_approximate`) or 'quick_gelu'."""
  if name == "gelu":
    return (lambda x: nn.gelu(x, approximate=True)) if gelu_approximate else gelu
  if name == "quick_gelu":  # OpenAI CLIP's x * sigmoid(1.702 x).
    return lambda x: x * nn.sigmoid(1.702 * x)
  raise ValueError(f"Unknown activation {name!r}; use one of: {', '.join(ACTIVATIONS)}.")


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense, the transformer MLP."""
  mlp_dim: Optional[int] = None  # Defaults to 4x the input width.
  dropout: float = 0.0
  gelu_approximate: bool = False  # timm/HF use the exact GELU; big_vision the tanh one.
  activation: str = "gelu"  # Or 'quick_gelu' (OpenAI CLIP); see mlp_activation.
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True, token_state=None):
    del token_state  # Per token: the part protocol's token state is not needed.
    width = x.shape[-1]
    dense = lambda features, name, axes: Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        use_bias=self.use_bias,
        kernel_init=logical(nn.initializers.xavier_uniform(), *axes),
        bias_init=logical(nn.initializers.normal(stddev=1e-6), axes[1]))
    x = dense(self.mlp_dim or 4 * width, "Dense_0", ("embed", "mlp"))(x)
    x = mlp_activation(self.activation, self.gelu_approximate)(x)
    x = constrain(x, "act_batch", "act_length", "act_mlp")
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return dense(width, "Dense_1", ("mlp", "embed"))(x)


class SwiGLU(nn.Module):
  """Gated MLP of LLaMA ("GLU Variants Improve Transformer", Shazeer 2020).

  out = Dense_1(silu(Dense_0(x)) * Dense_2(x)): `Dense_0` is the gate, `Dense_2`
  the linear branch and `Dense_1` the output projection (the fc1 / fc3 / fc2
  of LLaMA and iLLaMA), so `MlpBlock_0/Dense_0` and `Dense_1` mean what they
  mean in the GELU MLP. Three matrices instead of two: LLaMA sizes `mlp_dim` at
  2/3 of the GELU MLP's to keep the parameter count.
  """
  mlp_dim: int
  dropout: float = 0.0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True, token_state=None):
    del token_state  # Per token: the part protocol's token state is not needed.
    dense = lambda features, name, axes: Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        use_bias=self.use_bias,
        kernel_init=logical(nn.initializers.xavier_uniform(), *axes),
        bias_init=logical(nn.initializers.zeros, axes[1]))
    width = x.shape[-1]
    gate = dense(self.mlp_dim, "Dense_0", ("embed", "mlp"))(x)
    linear = dense(self.mlp_dim, "Dense_2", ("embed", "mlp"))(x)
    x = constrain(nn.silu(gate) * linear, "act_batch", "act_length", "act_mlp")
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return dense(width, "Dense_1", ("mlp", "embed"))(x)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example while training."""
  rate: float = 0.0  # Or a scalar array: each layer's rate under nn.scan is a traced value.

  @nn.compact
  def __call__(self, x, deterministic=True):
    if deterministic or (not isinstance(self.rate, jax.Array) and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep_mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    # astype: an array rate is float32, which would promote bfloat16 activations.
    return jnp.where(keep_mask, (x / keep).astype(x.dtype), jnp.zeros_like(x))


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens.

  `__call__(x)` -> (B, width). With `segment_ids` (B, L) and `num_slots` K (packed
  sequences, NaViT): one probe query per image slot k, attending only to the tokens
  of segment k + 1 -> (B, K, width).
  """
  num_heads: int = 12
  mlp_dim: Optional[int] = None
  gelu_approximate: bool = False
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids=None, num_slots=None):
    batch, _, width = x.shape
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), None, None, "embed"),
                       (1, 1, width), self.param_dtype)
    queries = 1 if segment_ids is None else num_slots
    probe = jnp.broadcast_to(probe, (batch, queries, width)).astype(self.dtype)
    if segment_ids is not None:  # Query k sees segment k + 1 only.
      slot_ids = jnp.broadcast_to(jnp.arange(1, num_slots + 1, dtype=jnp.int32),
                                  (batch, num_slots))
      segment_ids = (slot_ids, segment_ids)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_0")(probe, x, segment_ids=segment_ids)
    y = layer_norm("LayerNorm_0", self.layer_norm_eps, self.dtype, self.param_dtype)(x)
    x = x + MlpBlock(self.mlp_dim, gelu_approximate=self.gelu_approximate,
                     activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="MlpBlock_0")(y)
    return x[:, 0] if segment_ids is None else x


def patch_stem_input(module, images, stem, *, pad=None, image_size=None, patch_size=None):
  """`images` checked for `module`'s patch embedding (the nn.Conv child named `stem`).

  Every family's stem calls this, so a wrong input fails here with a message that
  says what to change, instead of deep in a convolution or, worse, silently: a VALID
  convolution crops an image that is not a whole number of patches. The checks read
  static shapes only, so they cost nothing under jit.

  Checks: NHWC images of rank 4 (an NCHW or unbatched image is named as such); the
  channels of the stem's kernel (once there are parameters; before, `in_channels`);
  at least one patch; and a whole number of patches unless `pad` (the module's
  `dynamic_img_pad` by default), which zero-pads the bottom and right up to the next
  multiple of the patch, as timm's PatchEmbed(dynamic_img_pad=True). `image_size`:
  the one size the model takes (MAE's fixed position embeddings). `patch_size`: the
  size the images are cut into when it is not the module's (FlexiViT).
  """
  name = type(module).__name__
  channels, patch = module.in_channels, patch_size or module.patch_size
  kernel = module.variables.get("params", {}).get(stem, {}).get("kernel")
  built_for = f"in_channels={channels}"
  if kernel is not None:  # Parameters fix the channels, whatever in_channels says.
    channels = getattr(kernel, "value", kernel).shape[-2]
    built_for = f"its patch embedding's kernel takes {channels}"
  shape = tuple(images.shape)
  if len(shape) == 3:
    raise ValueError(f"{name} takes a batch of NHWC images; got one image of shape {shape}: "
                     "add a batch dimension: x[None].")
  if len(shape) != 4:
    raise ValueError(f"{name} takes NHWC images (batch, height, width, channels); got shape "
                     f"{shape} (rank {len(shape)}).")
  if shape[-1] != channels and shape[1] == channels:
    raise ValueError(f"{name} takes NHWC images; shape {shape} looks like NCHW (the {channels} "
                     "channels are on axis 1): transpose with x.transpose(0, 2, 3, 1).")
  if shape[-1] != channels:
    raise ValueError(f"{name} was built for {channels}-channel images ({built_for}); got "
                     f"{shape[-1]} channels in shape {shape}: convert the images (e.g. "
                     f"vitjax.data.preprocess.to_channels) or build the model with "
                     f"in_channels={shape[-1]}.")
  height, width = shape[1:3]
  if height < patch or width < patch:
    raise ValueError(f"{name} needs images of at least one {patch}x{patch} patch; got "
                     f"{height}x{width}: resize them (the model was made for "
                     f"{module.image_size}x{module.image_size}).")
  if image_size is not None and (height, width) != (image_size, image_size):
    raise ValueError(f"{name} takes {image_size}x{image_size} images, got {height}x{width}: "
                     "set image_size (and the input pipeline's image size) to match.")
  pad = getattr(module, "dynamic_img_pad", False) if pad is None else pad
  pad_h, pad_w = -height % patch, -width % patch
  if (pad_h or pad_w) and not pad:
    fix = f"resize or crop them to a multiple of {patch} (e.g. {height - height % patch}x" \
          f"{width - width % patch})"
    if hasattr(module, "dynamic_img_pad"):
      fix += (f", or build the model with dynamic_img_pad=True to zero-pad them to "
              f"{height + pad_h}x{width + pad_w} (timm's dynamic_img_pad)")
    dropped = " and ".join(f"the last {n} {what}" for n, what in (
        (height % patch, "rows"), (width % patch, "columns")) if n)
    raise ValueError(f"{name}: {height}x{width} images are not a whole number of "
                     f"{patch}x{patch} patches (the patch embedding would drop {dropped}): "
                     f"{fix}.")
  if pad_h or pad_w:
    images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return images
