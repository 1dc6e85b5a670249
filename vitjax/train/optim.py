"""Optimizers, learning-rate schedules and the weight-decay mask, from config."""

import re

import jax
import optax

# Parameters that get no weight decay: norms, biases, embeddings and tokens.
NO_DECAY_PATTERNS = (r"(^|/)bias$", r"LayerNorm|_norm|/norm", r"(^|/)scale$",
                     r"pos_embedding$", r"(^|/)cls$", r"(^|/)dist$", r"probe$")


def path_str(path):
  """'Transformer/encoderblock_0/LayerNorm_0/scale' from a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, no_decay=NO_DECAY_PATTERNS):
  """True for parameters that weight decay applies to (matrices, not norms/biases/embeddings)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(re.search(p, path_str(path)) for p in no_decay), params)


def make_schedule(config):
  """Linear warmup from 0, then 'cosine', 'linear' decay to end_learning_rate, or 'constant'."""
  opt = config.optimizer
  total, warmup = config.total_steps, min(opt.warmup_steps, config.total_steps)
  peak, end = opt.learning_rate, opt.end_learning_rate
  decay_steps = max(total - warmup, 1)
  if opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif opt.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown schedule {opt.schedule!r}; use 'cosine', 'linear' or 'constant'.")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config, params):
  """The optax transformation for `config.optimizer`; returns (tx, schedule)."""
  opt = config.optimizer
  schedule = make_schedule(config)
  mask = decay_mask(params)
  if opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=mask)
  elif opt.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask),
                     optax.sgd(schedule, momentum=opt.momentum or None))
  else:
    raise ValueError(f"Unknown optimizer {opt.name!r}; use 'adamw' or 'sgd'.")
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule
