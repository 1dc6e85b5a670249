"""LoRA (Hu et al. 2021): a trainable low-rank update of chosen dense layers' kernels.

A target layer computes `dense(x) + (alpha / rank) * (dropout(x) @ lora_a) @ lora_b`, the
base kernel frozen. `lora_a` (fan-in axes..., rank) starts random (Kaiming-uniform, as
`peft`), `lora_b` (rank, fan-out axes...) at zero, so training starts from the base
model's function. Both live next to the kernel they update:
`.../MultiHeadDotProductAttention_0/query/{kernel, bias, lora_a, lora_b}`.

The layers LoRA reaches are vitjax's dense layers: `layers.Dense` (kernel (in, out)),
the attention's `HeadProjection` (query / key / value, kernel (width, heads, head_dim))
and `OutProjection` (kernel (heads, head_dim, width): two fan-in axes), and flax's
`nn.Dense`. Merging adds `scale * lora_a @ lora_b` to the kernel: the merged model is
the plain model, with no LoRA cost at inference.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import attention, layers

# The dense modules LoRA can target, and how many leading kernel axes each contracts.
DENSE_MODULES = ((attention.OutProjection, 2), (attention.HeadProjection, 1),
                 (layers.Dense, 1), (nn.Dense, 1))


def fan_in_axes(module):
  """How many leading kernel axes `module` contracts with its input; None: not a dense layer."""
  for cls, axes in DENSE_MODULES:
    if isinstance(module, cls):
      return axes
  return None


def scale(config):
  """LoRA's multiplier of `lora_a @ lora_b`: alpha / rank (alpha defaults to the rank)."""
  alpha = config.alpha if config.get("alpha") is not None else config.rank
  return alpha / config.rank


def _kaiming_uniform(fan_in):
  """Kaiming-uniform with a = sqrt(5) over `fan_in` inputs: PyTorch's Linear init, peft's A."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda rng, shape, dtype=jnp.float32: jax.random.uniform(
      rng, shape, dtype, -bound, bound)


def intercept(module, next_fun, args, kwargs, config):
  """The call of a targeted dense `module`: its output plus the low-rank update."""
  y = next_fun(*args, **kwargs)
  x = args[0]
  axes = fan_in_axes(module)
  kernel = module.get_variable("params", "kernel")
  kernel_shape = getattr(kernel, "value", kernel).shape
  fan_in_shape, fan_out_shape = kernel_shape[:axes], kernel_shape[axes:]
  dtype = getattr(module, "param_dtype", jnp.float32)
  lora_a = module.param("lora_a", _kaiming_uniform(int(np.prod(fan_in_shape))),
                        fan_in_shape + (config.rank,), dtype)
  lora_b = module.param("lora_b", nn.initializers.zeros, (config.rank,) + fan_out_shape, dtype)
  if config.get("dropout") and module.has_rng("dropout"):  # Training only.
    keep = 1.0 - config.dropout
    kept = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
    x = jnp.where(kept, x / keep, 0).astype(x.dtype)
  compute = y.dtype
  low = jnp.tensordot(x.astype(compute), lora_a.astype(compute), axes)
  return y + scale(config) * jnp.tensordot(low, lora_b.astype(compute), 1)


def delta(lora_a, lora_b, scale_value, kernel_ndim):
  """`scale * lora_a @ lora_b`, shaped like a kernel of `kernel_ndim` axes.

  Under nn.scan the three carry the same leading layer axes; the product is taken per layer.
  """
  stacked = lora_a.ndim + lora_b.ndim - 2 - kernel_ndim
  product = lambda a, b: scale_value * jnp.tensordot(a, b, 1)
  for _ in range(stacked):
    product = jax.vmap(product)
  return product(lora_a, lora_b)


def is_lora(path):
  return path[-1] in ("lora_a", "lora_b")


def _with_lora(params):
  """{module path: subtree} of every module of `params` that holds lora_a and lora_b."""
  found = {}

  def walk(tree, path):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      if "lora_a" in tree and "lora_b" in tree:
        found[path] = tree
      for key, value in tree.items():
        walk(value, path + (key,))
  walk(params, ())
  return found


def _rebuild(params, fn):
  """`params` with each LoRA module's subtree replaced by fn(subtree)."""
  if not (isinstance(params, dict) or hasattr(params, "items")):
    return params
  if "lora_a" in params and "lora_b" in params and "kernel" in params:
    return fn(dict(params))
  return {key: _rebuild(value, fn) for key, value in params.items()}


def merge(params, config):
  """`params` with every LoRA update added into its kernel and lora_a / lora_b removed:
  the base model's parameters (`vitjax.save_weights` writes them as any model's)."""
  factor = scale(config)

  def fold(tree):
    kernel = tree.pop("kernel")
    update = delta(tree.pop("lora_a"), tree.pop("lora_b"), factor, kernel.ndim)
    return {"kernel": (kernel + update).astype(kernel.dtype), **tree}
  return _rebuild(params, fold)


def unmerge(merged, adapter_params, config):
  """The base parameters and the adapter back from `merge`'s output: each kernel minus
  its LoRA update (`adapter_params`: a tree holding the lora_a / lora_b that were merged,
  e.g. `adapter_only(params)`); returns the full adapted tree."""
  factor = scale(config)
  updates = _with_lora(adapter_params)

  def walk(tree, path):
    if path in updates:
      lora = updates[path]
      kernel = tree["kernel"]
      update = delta(lora["lora_a"], lora["lora_b"], factor, kernel.ndim)
      return {**tree, "kernel": (kernel - update).astype(kernel.dtype),
              "lora_a": lora["lora_a"], "lora_b": lora["lora_b"]}
    if isinstance(tree, dict) or hasattr(tree, "items"):
      return {key: walk(value, path + (key,)) for key, value in tree.items()}
    return tree
  out = walk(params_dict(merged), ())
  missing = sorted("/".join(p) for p in updates if not _has_path(out, p))
  if missing:
    raise ValueError(f"unmerge: the merged parameters have no module {missing[0]!r} "
                     f"({len(missing)} LoRA module(s) missing): they are not this adapter's "
                     "merge.")
  return out


def _has_path(tree, path):
  for key in path:
    if not (isinstance(tree, dict) and key in tree):
      return False
    tree = tree[key]
  return True


def params_dict(tree):
  """A plain nested dict of `tree` (FrozenDicts thawed, leaves kept)."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {key: params_dict(value) for key, value in tree.items()}
  return tree


def check_targets(pattern):
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"config.peft.lora.targets={pattern!r} is not a regular expression "
                     f"({e}); e.g. 'MultiHeadDotProductAttention_0/(query|value)$'.") from None
