"""The error for a checkpoint that does not fit a model, and its text, shared by every family."""

import flax.linen
from flax import traverse_util
import jax
import numpy as np

from vitjax.convert.files import CheckpointError
from vitjax.models.registry import dummy_input

_MAX_LISTED = 25  # Names per section of a mismatch error.


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose parameters do not fit the model; the message lists each difference."""


def mismatch_message(params, template, what, hints):
  """None if `params` fits `template`; else a message listing every difference, then `hints`.

  `params` and `template` are flat {name: array or ShapeDtypeStruct}; `hints(params,
  template, differing_names)` returns lines naming likely causes in model-option terms.
  """
  missing = sorted(set(template) - set(params))
  unexpected = sorted(set(params) - set(template))
  mismatched = sorted(n for n in set(params) & set(template)
                      if tuple(np.shape(params[n])) != tuple(template[n].shape))
  if not (missing or unexpected or mismatched):
    return None
  lines = [f"{what} does not fit the model."]

  def section(title, names, describe):
    if names:
      lines.append(f"{title} ({len(names)}):")
      lines.extend(f"  {describe(n)}" for n in names[:_MAX_LISTED])
      if len(names) > _MAX_LISTED:
        lines.append(f"  ... and {len(names) - _MAX_LISTED} more")

  section("Missing (in the model, not in the checkpoint)", missing,
          lambda n: f"{n} {tuple(template[n].shape)}")
  section("Unexpected (in the checkpoint, not in the model)", unexpected,
          lambda n: f"{n} {tuple(np.shape(params[n]))}")
  section("Shapes differ", mismatched,
          lambda n: f"{n}: checkpoint {tuple(np.shape(params[n]))}, model "
                    f"{tuple(template[n].shape)}")
  lines.extend(hints(params, template, missing + unexpected + mismatched))
  return "\n".join(lines)


def fresh_head(model, rng, names=("head",)):
  """Flat {name: array} of `model`'s freshly initialised top-level `names` (its classifier):
  what `load_weights(..., head='reinit')` puts in place of a checkpoint's that does not fit.

  `rng` is a seed or a PRNG key. Under jit, XLA drops the initialisation of everything else.
  """
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(rng)

  def init_head(rng):
    params = flax.linen.unbox(model.init(rng, dummy_input(model))["params"])
    return {k: v for k, v in params.items() if k in names}

  return traverse_util.flatten_dict(jax.device_get(jax.jit(init_head)(rng)), sep="/")
