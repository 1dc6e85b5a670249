"""Visual prompt tuning (VPT, Jia et al. 2022): learned tokens in the encoder's sequence.

Shallow: `num_tokens` prompts (`Transformer/vpt_prompts`, (1, n, width)) join the
sequence after the class token and registers, before the patches, at the encoder's
input. Deep: each block replaces the prompt slots of its input by its own prompts
(`Transformer/encoderblock_i/vpt_prompts`): the previous block's prompt outputs are
discarded, as in the paper. The prompt tokens leave the sequence at the encoder's end,
so pooling, the head and `out['tokens']` see the model's own tokens only.

Prompts start uniform in ±sqrt(6 / (3 p² + width)) (the paper's Xavier bound over a
patch's pixels and the width) and, while training, get dropout (`dropout`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import parts

# Token-state entries that are laid out per token: prompts would shift them.
_PER_TOKEN_STATE = ("positions", "segment_ids", "attention_bias", "token_sizes",
                    "token_index")


def _init(parent, width):
  patch = getattr(parent, "patch_size", None)
  channels = getattr(parent, "in_channels", 3)
  fan = channels * patch * patch + width if patch else 2 * width
  bound = math.sqrt(6.0 / fan)
  return lambda rng, shape, dtype=jnp.float32: jax.random.uniform(rng, shape, dtype, -bound,
                                                                  bound)


def _dropout(module, prompts, rate):
  if not rate or not module.has_rng("dropout"):
    return prompts
  keep = 1.0 - rate
  kept = jax.random.bernoulli(module.make_rng("dropout"), keep, prompts.shape)
  return jnp.where(kept, prompts / keep, 0).astype(prompts.dtype)


def insertion_index(encoder):
  """Where prompts go in `encoder`'s input: after the model's prefix tokens and registers."""
  parent = encoder.parent
  if not hasattr(parent, "num_prefix_tokens"):
    raise ValueError(f"Visual prompts (config.peft.prompts) need a ViT-style model whose "
                     f"encoder input starts with its prefix tokens; "
                     f"{type(parent).__name__} is not one.")
  if getattr(parent, "class_token_position", "first") != "first":
    raise ValueError("Visual prompts (config.peft.prompts) need the class token first; "
                     "this model has class_token_position='last'.")
  if getattr(parent, "token_merging", None) and any(
      (parent.token_merging.get("r"), parent.token_merging.get("keep_rate"))):
    raise ValueError("Visual prompts (config.peft.prompts) and token merging together are "
                     "not supported: turn one off.")
  return parent.num_prefix_tokens + getattr(parent, "num_registers", 0)


class Prompts:
  """The interceptor's state for one model: the slot of the prompts in the current call."""

  def __init__(self, config):
    self.config = config
    self._slots = []  # (start, count) of the encoder call being traced.

  def encoder(self, module, next_fun, args, kwargs):
    """The targeted encoder's call, with prompts inserted and removed."""
    x = args[0]
    token_state = args[1] if len(args) > 1 else kwargs.get("token_state")
    clash = sorted(set(token_state or {}) & set(_PER_TOKEN_STATE))
    if clash:
      raise ValueError(f"Visual prompts (config.peft.prompts) cannot join a sequence with "
                       f"per-token state {clash} (RoPE positions, packing, soft masks): "
                       "use a model with learned or sin-cos position embeddings.")
    start, count, width = insertion_index(module), self.config.num_tokens, x.shape[-1]
    if self.config.get("deep"):
      prompts = jnp.zeros((x.shape[0], count, width), x.dtype)  # Each block puts its own.
    else:
      prompts = module.param("vpt_prompts", _init(module.parent, width), (1, count, width),
                             getattr(module.parent, "param_dtype", jnp.float32))
      prompts = _dropout(module, jnp.broadcast_to(prompts, (x.shape[0], count, width)),
                         self.config.get("dropout")).astype(x.dtype)
    x = jnp.concatenate([x[:, :start], prompts, x[:, start:]], axis=1)
    self._slots.append((start, count, module.parent))
    try:
      x, token_state, out = next_fun(x, *args[1:], **kwargs)
    finally:
      self._slots.pop()
    strip = lambda y: jnp.concatenate([y[:, :start], y[:, start + count:]], axis=1)
    out = {key: strip(value) if key == "pre_norm" or key.startswith("block") else value
           for key, value in out.items()}
    return strip(x), token_state, out

  def block(self, module, next_fun, args, kwargs):
    """A block of the targeted encoder (deep prompts): its own prompts in the slots."""
    if not self._slots:
      return next_fun(*args, **kwargs)
    start, count, model = self._slots[-1]
    x = args[0]
    width = x.shape[-1]
    prompts = module.param("vpt_prompts", _init(model, width), (1, count, width),
                           getattr(model, "param_dtype", jnp.float32))
    prompts = _dropout(module, jnp.broadcast_to(prompts, (x.shape[0], count, width)),
                       self.config.get("dropout")).astype(x.dtype)
    x = jnp.concatenate([x[:, :start], prompts, x[:, start + count:]], axis=1)
    return next_fun(x, *args[1:], **kwargs)


def is_encoder(module):
  return isinstance(module, parts.Encoder)


def is_block(module):
  return isinstance(module, parts.Block)
