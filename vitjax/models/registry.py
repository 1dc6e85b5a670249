"""The model registry: names and families to modules, and the helpers that build them.

Model modules register here (`vitjax.models` registers vitjax's own); a module that
builds other models by name (the two towers) imports this, not `vitjax.models`.
"""

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing.
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class UnknownModelError(ValueError):
  """A model name that is not registered; the message lists the closest ones."""


class UnknownOptionError(TypeError):
  """An option the model does not have (or a `variant` for a fixed-size name)."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """How to build a registered model, and what its published weights expect."""
  name: str
  module: Callable[..., Any]  # A flax.linen.Module class.
  defaults: Dict[str, Any]
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  paper: str = ""
  # Evaluation preprocessing of the published weights (timm's pretrained configs): resize
  # the shorter side to image_size / crop_pct, centre-crop image_size, with this resampling.
  crop_pct: float = 0.9
  interpolation: str = "bicubic"


_REGISTRY: Dict[str, ModelEntry] = {}
# Families built from a `variant` string, big_vision style: name -> (module, decoder, the
# decoder's size table, defaults of the family).
_FAMILIES: Dict[str, tuple] = {}


def register_family(name, module, decode_variant, sizes, **defaults):
  """Registers a family: `create_model(name, variant='B/16')` decodes the size and patch."""
  if name in _REGISTRY or name in _FAMILIES:
    raise ValueError(f"Model {name!r} is registered twice.")
  _FAMILIES[name] = (module, decode_variant, sizes, defaults)


def families():
  """The family names (`create_model(name, variant=...)`), sorted."""
  return sorted(_FAMILIES)


def register(name, module, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, paper="", crop_pct=None,
             interpolation="bicubic", **defaults):
  """Registers `name`; crop_pct None is timm's usual 0.9, or 1.0 from 384 pixels up."""
  if name in _REGISTRY or name in _FAMILIES:
    raise ValueError(f"Model {name!r} is registered twice.")
  if crop_pct is None:
    crop_pct = 1.0 if defaults.get("image_size", 224) >= 384 else 0.9
  _REGISTRY[name] = ModelEntry(name, module, defaults, tuple(mean), tuple(std), paper,
                               crop_pct, interpolation)


def list_models(pattern="*"):
  """Sorted registered names matching a shell-style pattern, e.g. 'deit_*'."""
  names = list(_REGISTRY) + list(_FAMILIES)
  return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def model_entry(name):
  if name not in _REGISTRY:
    raise _unknown(name)
  return _REGISTRY[name]


def create_model(name, **overrides):
  """Returns the linen Module registered as `name`, with `overrides` on its defaults.

  For a family name (`'vit'`), `variant='B/16'` picks the size and patch; any
  explicit field (`width=...`) wins over the variant.
  """
  if name in _FAMILIES:
    module, decode, _, defaults = _FAMILIES[name]
    variant = overrides.pop("variant", None)
    config = {**(decode(variant) if variant else {}), **defaults, **overrides}
  elif name in _REGISTRY:
    entry = _REGISTRY[name]
    module = entry.module
    if "variant" in overrides:
      raise UnknownOptionError(f"Model {name!r} has a fixed size; 'variant' applies only to the "
                      f"families {', '.join(sorted(_FAMILIES))}.")
    config = {**entry.defaults, **overrides}
  else:
    raise _unknown(name)
  fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name"}
  unknown = sorted(set(config) - fields)
  if unknown:
    hints = [f"{k!r} (did you mean {', '.join(map(repr, difflib.get_close_matches(k, fields, 3)))}?)"
             if difflib.get_close_matches(k, fields, 3) else repr(k) for k in unknown]
    raise UnknownOptionError(f"Unknown option(s) for model {name!r}: {', '.join(hints)}. "
                    f"Valid options: {', '.join(sorted(fields))}.")
  return module(**config)


def closest_models(name, n=5):
  """Up to `n` registered names like `name` (a name or a shell pattern), closest first."""
  return difflib.get_close_matches(name.strip("*?").lower(), list_models(), n=n, cutoff=0.5)


def name_patterns():
  """One shell pattern per name prefix ('deit_*', 'vit_*', ...), for when no name is close."""
  return sorted({name.split("_")[0] + "_*" for name in _REGISTRY})


def _unknown(name):
  close = closest_models(name)
  hint = (f" Closest: {', '.join(close)}." if close else
          f" None is close; the names match {', '.join(name_patterns())}.")
  return UnknownModelError(
      f"Unknown model {name!r}.{hint} See vitjax.list_models() for all names.")


def family_default(name, **overrides):
  """(variant, fields) of what `create_model(name, **overrides)` builds for a family.

  Without a `variant`, the module's field defaults decide the size; `variant` is
  their name in the family's size table (e.g. 'B/16'), None if they match no size.
  """
  module, decode, sizes, _ = _FAMILIES[name]
  model = create_model(name, **overrides)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(module)
            if f.name not in ("parent", "name")}
  variant = None
  for size in sizes:
    candidate = f"{size}/{model.patch_size}"
    if all(fields[k] == v for k, v in decode(candidate).items()):
      variant = candidate
      break
  return variant, fields


def describe_family_default(name, **overrides):
  """One line: the variant and main options a family name without a variant builds."""
  variant, fields = family_default(name, **overrides)
  shown = ("image_size", "num_classes", "pool_type", "posemb", "distilled", "mask_ratio")
  options = ", ".join(f"{k}={fields[k]!r}" for k in shown if k in fields)
  return (f"{name!r} without a variant builds {_FAMILIES[name][0].__name__}"
          f"(variant={variant!r}, {options})")


def dummy_input(model, batch_size=1):
  """Zeros of the model's default input shape (NHWC), for init and shape checks."""
  size = getattr(model, "image_size", 224)
  return jnp.zeros((batch_size, size, size, getattr(model, "in_channels", 3)), jnp.float32)


def init_params(model, rng=0, batch_size=1):
  """Initialised parameters of `model` (jitted; a seed or a PRNG key), as plain arrays."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  variables = jax.jit(model.init)(rng, dummy_input(model, batch_size))
  return nn.unbox(variables["params"])


def param_shapes(model, *, boxed=False):
  """Parameter shapes and dtypes without computing anything (jax.eval_shape).

  With `boxed=True` each leaf keeps its logical axis names (flax's
  LogicallyPartitioned), which `nn.get_partition_spec` turns into specs.
  """
  if boxed:
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy_input(model))["params"]
  # Unboxed while traced: outside a trace, unboxing under a mesh (the trainer's) fails.
  return jax.eval_shape(lambda rng, x: nn.unbox(model.init(rng, x)["params"]),
                        jax.random.PRNGKey(0), dummy_input(model))


def count_params(params):
  """The number of parameters (array elements) in `params`, arrays or shapes."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def parameter_counts(model, params):
  """{'total', 'active'}: all parameters of `model` (arrays or shapes), and those one
  token's forward pass uses.

  The two differ for sparse mixtures of experts (a token meets k of E experts), which
  say so by a `parameter_counts(params)` method; every other model uses all its
  parameters.
  """
  if hasattr(model, "parameter_counts"):
    return model.parameter_counts(params)
  total = count_params(params)
  return {"total": total, "active": total}
