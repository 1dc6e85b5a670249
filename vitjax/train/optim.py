"""Optimizers, learning-rate schedules and the weight-decay mask, from config."""

import re

import jax
import numpy as np
import optax

from vitjax import adapt
from vitjax import config as config_lib

# The names config.optimizer.name and config.optimizer.schedule take (validation reads them too).
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")

# Parameters that get no weight decay: norms, biases, embeddings and tokens, and learned
# RoPE frequencies (decaying them pulls every rotation towards none; naver's rope-vit
# excludes them).
NO_DECAY_PATTERNS = (r"(^|/)bias$", r"LayerNorm|_norm|/norm", r"(^|/)scale$",
                     r"pos_embedding$", r"(^|/)cls$", r"(^|/)dist$", r"probe$",
                     r"(^|/)rope_frequencies$")


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
    raise config_lib.ConfigError(f"Unknown schedule config.optimizer.schedule={opt.schedule!r}; "
                                 f"use one of {', '.join(map(repr, SCHEDULES))}.")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _patterns(value):
  """A regex string or a sequence of them, as a tuple."""
  if not value:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def _check_matches(params, patterns, key):
  names = [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  for pattern in patterns:
    if not any(re.search(pattern, name) for name in names):
      raise config_lib.ConfigError(
          f"config.optimizer.{key} pattern {pattern!r} matches no parameter. Patterns are "
          f"regular expressions searched in names like {names[0]!r} or {names[-1]!r}.")


def frozen_mask(params, freeze):
  """True for parameters whose name matches a regex of `freeze` (they are never updated)."""
  patterns = _patterns(freeze)
  _check_matches(params, patterns, "freeze")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(re.search(p, path_str(path)) for p in patterns), params)


def lr_multipliers(params, rules):
  """Per-parameter learning-rate factors from ((regex, factor), ...); first match wins, else 1."""
  rules = tuple((pattern, float(factor)) for pattern, factor in (rules or ()))
  _check_matches(params, [pattern for pattern, _ in rules], "lr_multipliers")

  def factor(path, _):
    name = path_str(path)
    return next((f for pattern, f in rules if re.search(pattern, name)), 1.0)

  return jax.tree_util.tree_map_with_path(factor, params)


# Layer-wise learning-rate decay (BEiT, MAE fine-tuning): what counts as the embedding.
_EMBEDDING_PATTERN = r"^(embedding|cls|dist|reg|pos_embedding)(/|$)"
_BLOCK_PATTERN = r"^Transformer/encoderblock(_(\d+))?/"


def layer_decay_multipliers(params, decay):
  """Learning-rate factors of layer-wise decay: block i gets decay^(depth - i), the embedding
  (patches, class token, position embeddings) decay^(depth + 1), all else (final norm, head) 1.

  Blocks stacked by `scan_layers` ('Transformer/encoderblock/...') get one factor per
  layer along their leading axis.
  """
  names = [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  blocks = {int(m.group(2)) for m in map(lambda n: re.match(_BLOCK_PATTERN, n), names)
            if m and m.group(2) is not None}
  stacked = [x.shape[0] for path, x in jax.tree_util.tree_leaves_with_path(params)
             if re.match(r"^Transformer/encoderblock/", path_str(path))]
  depth = max(blocks) + 1 if blocks else (stacked[0] if stacked else 0)
  if not depth:
    raise config_lib.ConfigError(
        f"config.optimizer.layer_decay={decay!r} needs a ViT-style encoder "
        "('Transformer/encoderblock_0/...'); these parameters have no blocks. Set "
        "config.optimizer.layer_decay=None.")

  def factor(path, x):
    name = path_str(path)
    block = re.match(_BLOCK_PATTERN, name)
    if block and block.group(2) is not None:
      return float(decay ** (depth - int(block.group(2))))
    if block:  # Stacked layers: (depth, ...) parameters.
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))
      return per_layer.astype(np.float32).reshape((depth,) + (1,) * (x.ndim - 1))
    return float(decay ** (depth + 1)) if re.match(_EMBEDDING_PATTERN, name) else 1.0

  return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_tree(factors):
  """Multiplies each update by its own factor (a pytree of floats or arrays like the params)."""
  is_one = lambda f: isinstance(f, float) and f == 1.0

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, f: u if is_one(f) else u * f, updates, factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, params):
  """The optax transformation for `config.optimizer`; returns (tx, schedule).

  Besides the optimizer, `config.optimizer` may give `freeze` (a regex or a list of
  them: matching parameters are never updated and get no optimizer state) and
  `lr_multipliers` (((regex, factor), ...): matching parameters' updates are scaled,
  first match wins), both over names like 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel',
  and `layer_decay` (a float < 1: layer-wise learning-rate decay, see
  layer_decay_multipliers; its factors multiply those of lr_multipliers).
  With `config.peft` on (vitjax.adapt), only the adapters and `config.peft.train`'s
  names train; `freeze` can freeze some of those too.
  """
  opt = config.optimizer
  schedule = make_schedule(config)
  mask = decay_mask(params)
  if opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=mask)
  elif opt.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask),
                     optax.sgd(schedule, momentum=opt.momentum or None))
  else:
    raise config_lib.ConfigError(f"Unknown optimizer {opt.name!r} (config.optimizer.name); use "
                                 f"one of {', '.join(map(repr, OPTIMIZERS))}.")
  factors = None
  if opt.get("lr_multipliers"):
    factors = lr_multipliers(params, opt.lr_multipliers)
  if opt.get("layer_decay"):
    decay = layer_decay_multipliers(params, opt.layer_decay)
    factors = decay if factors is None else jax.tree_util.tree_map(
        lambda a, b: a * b, factors, decay)
  if factors is not None:
    tx = optax.chain(tx, scale_by_tree(factors))
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  frozen = frozen_mask(params, opt.freeze) if opt.get("freeze") else None
  if frozen is not None and all(jax.tree_util.tree_leaves(frozen)):
    raise config_lib.ConfigError(
        f"config.optimizer.freeze={opt.freeze!r} freezes every parameter; nothing would "
        f"be trained. Narrow the pattern(s), e.g. '^Transformer/' keeps the head trained.")
  peft = config.get("peft")
  if peft and adapt.enabled(peft):  # Only the adapters and config.peft.train's names train.
    try:
      trains = adapt.trainable_mask(params, peft)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    peft_frozen = jax.tree_util.tree_map(lambda t: not t, trains)
    frozen = peft_frozen if frozen is None else jax.tree_util.tree_map(
        lambda a, b: a or b, frozen, peft_frozen)
    if all(jax.tree_util.tree_leaves(frozen)):
      raise config_lib.ConfigError(
          "config.optimizer.freeze freezes every parameter config.peft trains; nothing would "
          "be trained. Narrow config.optimizer.freeze.")
  if frozen is not None:
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "trained", frozen)
    # Frozen gradients neither count in the clipping norm nor get optimizer state.
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def schedule_count(opt_state):
  """How many updates the learning-rate schedule has seen (optax's ScaleByScheduleState).

  Behind the trainer's step by the updates that were skipped (config.skip_nonfinite_steps
  keeps the optimizer state of a skipped step). None where the optimizer has no schedule.
  """
  for path, count in optax.tree_utils.tree_get_all_with_path(opt_state, "count"):
    if getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState":
      return count
  return None
