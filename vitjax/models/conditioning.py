"""Conditioning inputs of generative transformers: diffusion timesteps and class labels.

    timestep_embedding(t, 256)              # (B,) -> (B, 256) sinusoids, [cos, sin]
    TimestepEmbedder(width)(t)              # DiT's t_embedder: sinusoids -> MLP (SiLU)
    LabelEmbedder(num_classes, width)(y)    # class table with a null row for guidance

Used by DiT (vitjax.models.dit: the sum of both conditions the adaLN blocks) and
U-ViT (vitjax.models.uvit: both become tokens).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models.partitioning import logical

Dtype = Any


def timestep_embedding(t, dim, *, max_period=10000.0, freq_shift=0.0):
  """(B,) timesteps (ints or floats) -> (B, dim) float32 [cos(t * f), sin(t * f)].

  Frequencies f_i = max_period ** (-i / (dim/2 - freq_shift)), i < dim/2: `freq_shift=0`
  is DiT's and U-ViT's code (and DDPM's with [sin, cos]); diffusers' DiT embeds with
  `downscale_freq_shift=1`. An odd `dim` gets a zero last column.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) /
                  (half - freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


class TimestepEmbedder(nn.Module):
  """Timesteps -> (B, width): `frequency_dim` sinusoids, Dense, SiLU, Dense (`mlp_0`, `mlp_2`)."""
  width: int
  frequency_dim: int = 256
  freq_shift: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    x = timestep_embedding(t, self.frequency_dim, freq_shift=self.freq_shift)
    dense = lambda name, axes: nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=logical(nn.initializers.normal(stddev=0.02), *axes),
        bias_init=logical(nn.initializers.zeros, axes[1]))
    x = dense("mlp_0", (None, "mlp"))(x.astype(self.dtype))
    return dense("mlp_2", ("mlp", "embed"))(nn.silu(x))


class LabelEmbedder(nn.Module):
  """Class labels -> (B, width) rows of `embedding_table`.

  With `dropout_prob` > 0 the table has one more row, the null class (index
  `num_classes`): classifier-free guidance's unconditional input. While training
  (`deterministic=False`) each label is replaced by it with that probability, drawn
  from the 'dropout' stream; `force_drop` (B,) bools replace chosen labels.
  """
  num_classes: int
  width: int
  dropout_prob: float = 0.0
  param_dtype: Dtype = jnp.float32

  @property
  def null_class(self):
    return self.num_classes

  @nn.compact
  def __call__(self, labels, deterministic=True, force_drop=None):
    rows = self.num_classes + int(self.dropout_prob > 0)
    table = self.param("embedding_table",
                       logical(nn.initializers.normal(stddev=0.02), "vocab", "embed"),
                       (rows, self.width), self.param_dtype)
    labels = jnp.asarray(labels, jnp.int32)
    drop = jnp.zeros(labels.shape, bool) if force_drop is None else force_drop
    if not deterministic and self.dropout_prob > 0:
      rng = self.make_rng("dropout")
      drop = drop | (jax.random.uniform(rng, labels.shape) < self.dropout_prob)
    labels = jnp.where(drop, self.null_class, labels)
    return jnp.take(table, labels, axis=0)


__all__ = ["LabelEmbedder", "TimestepEmbedder", "timestep_embedding"]
