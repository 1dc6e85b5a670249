"""Building blocks shared by the model families: MLP, stochastic depth, MAP head."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.partitioning import constrain, logical


Dtype = Any


def layer_norm(name, epsilon, dtype, param_dtype, use_bias=True, axis_name="embed"):
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      use_bias=use_bias, scale_init=logical(nn.initializers.ones, axis_name),
                      bias_init=logical(nn.initializers.zeros, axis_name))


class LayerScale(nn.Module):
  """Per-channel learned scaling of a residual branch (CaiT, DINOv2), `scale` = init at start."""
  init_value: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.constant(self.init_value), "embed"),
                       (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense, the transformer MLP."""
  mlp_dim: Optional[int] = None  # Defaults to 4x the input width.
  dropout: float = 0.0
  gelu_approximate: bool = False  # timm/HF use the exact GELU; big_vision the tanh one.
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    width = x.shape[-1]
    dense = lambda features, name, axes: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        use_bias=self.use_bias,
        kernel_init=logical(nn.initializers.xavier_uniform(), *axes),
        bias_init=logical(nn.initializers.normal(stddev=1e-6), axes[1]))
    x = dense(self.mlp_dim or 4 * width, "Dense_0", ("embed", "mlp"))(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = constrain(x, "act_batch", "act_length", "act_mlp")
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
  """Multihead attention pooling: a learned probe attends over the tokens."""
  num_heads: int = 12
  mlp_dim: Optional[int] = None
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, _, width = x.shape
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), None, None, "embed"),
                       (1, 1, width), self.param_dtype)
    probe = jnp.tile(probe, [batch, 1, 1]).astype(self.dtype)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_0")(probe, x)
    y = layer_norm("LayerNorm_0", self.layer_norm_eps, self.dtype, self.param_dtype)(x)
    x = x + MlpBlock(self.mlp_dim, gelu_approximate=self.gelu_approximate,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name="MlpBlock_0")(y)
    return x[:, 0]
