"""AdaptFormer (Chen et al. 2022): a bottleneck adapter in parallel with each block's MLP.

A targeted channel mixer (`MlpBlock_0` of the encoder blocks by default) computes
`mlp(y) + scale * relu(y @ down + down_bias) @ up + up_bias`, `y` the MLP's input (the
block's second LayerNorm output), the MLP frozen. `up` and its bias start at zero, so the
adapted model starts as the base model; `down` starts Kaiming-uniform, as the paper's
code. Parameters, next to the MLP's: `adapter_down_kernel` (width, dim),
`adapter_down_bias`, `adapter_up_kernel` (dim, width), `adapter_up_bias`.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def intercept(module, next_fun, args, kwargs, config):
  y = args[0]
  out = next_fun(*args, **kwargs)
  width, dim = y.shape[-1], config.dim
  dtype = getattr(module, "param_dtype", jnp.float32)
  bound = 1.0 / math.sqrt(width)
  down = module.param("adapter_down_kernel", lambda rng, shape, dtype: jax.random.uniform(
      rng, shape, dtype, -bound, bound), (width, dim), dtype)
  down_bias = module.param("adapter_down_bias", nn.initializers.zeros, (dim,), dtype)
  up = module.param("adapter_up_kernel", nn.initializers.zeros, (dim, width), dtype)
  up_bias = module.param("adapter_up_bias", nn.initializers.zeros, (width,), dtype)
  compute = out.dtype
  hidden = nn.relu(y.astype(compute) @ down.astype(compute) + down_bias.astype(compute))
  return out + config.scale * (hidden @ up.astype(compute) + up_bias.astype(compute))
