"""Parameter-efficient fine-tuning of any vitjax model: LoRA, visual prompts, adapters.

    model = vitjax.adapt.adapted(vitjax.create_model('vit_base_patch16_224'), peft)
    params = vitjax.adapt.init_from(model, base_params, rng)   # base weights + new adapters
    logits, out = model.apply({'params': params}, images)

`peft` is `config.peft` (an ml_collections ConfigDict or a dict):

    lora=dict(rank=0, alpha=None, dropout=0.0,
              targets='MultiHeadDotProductAttention_0/(query|value)$'),
    prompts=dict(num_tokens=0, deep=False, dropout=0.0),
    adapter=dict(dim=0, scale=0.1, targets='encoderblock[^/]*/MlpBlock_0$'),
    train=None,

`lora.rank > 0`: LoRA on every dense layer whose module path (e.g.
'Transformer/encoderblock_3/MultiHeadDotProductAttention_0/query') matches `targets` (a
regex, searched); `prompts.num_tokens > 0`: VPT, shallow or `deep`; `adapter.dim > 0`:
AdaptFormer's parallel MLP adapters. `train`: a regex of the base parameters that train
too (full names such as 'head/kernel'); None gives '^head/' when an adapter is on. With
no adapter, `train` alone is BitFit ('^head/|/bias$'), norm tuning ('^head/|LayerNorm|
encoder_norm') or a linear probe ('^head/'). Every other parameter is frozen, and the
optimizer keeps state only for what trains (vitjax.train.optim).

The adapters are added by flax method interceptors around the model's own modules (see
`adapted`): the base model is not changed, its parameter names stay, and the adapter
parameters sit next to those they adapt (`.../query/lora_a`, `.../MlpBlock_0/
adapter_up_kernel`, `Transformer/vpt_prompts`). Files: `save_adapter` writes only the
adapter parameters (and those `train` names); `merge` folds LoRA into the kernels, and
`vitjax.save_weights` then writes a plain model; `vitjax.adapt.peft` (import it:
`from vitjax.adapt import peft`) exports LoRA in the `peft` library's format for the
equivalent transformers model, and loads such adapters.
"""

import json
import re

import flax.linen as nn
import jax
import numpy as np

from vitjax.adapt import adapters as adapters_lib
from vitjax.adapt import lora as lora_lib
from vitjax.adapt import prompts as prompts_lib

DEFAULT_LORA_TARGETS = r"MultiHeadDotProductAttention_0/(query|value)$"
DEFAULT_ADAPTER_TARGETS = r"encoderblock[^/]*/MlpBlock_0$"
DEFAULT_TRAIN = r"^head/"
ADAPTER_NAMES = re.compile(r"(^|/)(lora_a|lora_b|vpt_prompts|adapter_(down|up)_(kernel|bias))$")
KEYS = {"lora": ("rank", "alpha", "dropout", "targets"),
        "prompts": ("num_tokens", "deep", "dropout"),
        "adapter": ("dim", "scale", "targets")}


class PeftConfigError(ValueError):
  """A config.peft value that cannot be used; the message names the key."""


class _Section(dict):
  """A config section with attribute access and `.get`, whatever the caller passed."""

  def __getattr__(self, key):
    try:
      return self[key]
    except KeyError:
      raise AttributeError(key) from None


def default_config():
  """`config.peft` with everything off: paste into a config file and switch on."""
  return {"lora": {"rank": 0, "alpha": None, "dropout": 0.0, "targets": DEFAULT_LORA_TARGETS},
          "prompts": {"num_tokens": 0, "deep": False, "dropout": 0.0},
          "adapter": {"dim": 0, "scale": 0.1, "targets": DEFAULT_ADAPTER_TARGETS},
          "train": None}


def normalize(peft):
  """`peft` (None, a dict or a ConfigDict) checked, with defaults filled; ValueError names
  the key and the fix."""
  given = _plain(peft or {})
  full = default_config()
  unknown = sorted(set(given) - set(full))
  if unknown:
    raise PeftConfigError(f"Unknown config.peft key(s) {unknown}; valid: {sorted(full)}.")
  for section, keys in KEYS.items():
    values = given.get(section) or {}
    bad = sorted(set(values) - set(keys))
    if bad:
      raise PeftConfigError(f"Unknown config.peft.{section} key(s) {bad}; valid: {list(keys)}.")
    full[section].update(values)
  full["train"] = given.get("train", None)
  lora, prompts, adapter = (_Section(full[k]) for k in ("lora", "prompts", "adapter"))
  _check_int(lora.rank, "lora.rank", "a rank such as 4 (0: no LoRA)")
  _check_int(prompts.num_tokens, "prompts.num_tokens", "e.g. 10 (0: no prompts)")
  _check_int(adapter.dim, "adapter.dim", "a bottleneck width such as 16 (0: no adapter)")
  for name, rate in (("lora.dropout", lora.dropout), ("prompts.dropout", prompts.dropout)):
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
      raise PeftConfigError(f"config.peft.{name}={rate!r}: a dropout rate in [0, 1) is needed.")
  if lora.alpha is not None and (not isinstance(lora.alpha, (int, float)) or lora.alpha <= 0):
    raise PeftConfigError(f"config.peft.lora.alpha={lora.alpha!r}: a positive number (or None: "
                          "the rank) is needed.")
  for name, pattern in (("lora.targets", lora.targets), ("adapter.targets", adapter.targets),
                        ("train", full["train"])):
    if pattern is None and name == "train":
      continue
    if not isinstance(pattern, str) or not pattern:
      raise PeftConfigError(f"config.peft.{name}={pattern!r}: a regular expression string is "
                            "needed.")
    try:
      re.compile(pattern)
    except re.error as e:
      raise PeftConfigError(f"config.peft.{name}={pattern!r} is not a regular expression "
                            f"({e}).") from None
  full["lora"], full["prompts"], full["adapter"] = lora, prompts, adapter
  return _Section(full)


def _check_int(value, name, example):
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise PeftConfigError(f"config.peft.{name}={value!r}: a whole number >= 0 is needed, "
                          f"{example}.")


def _plain(tree):
  if not isinstance(tree, dict) and hasattr(tree, "to_dict"):  # ml_collections.ConfigDict.
    tree = tree.to_dict()
  if isinstance(tree, dict):
    return {key: _plain(value) for key, value in tree.items()}
  return tree


def has_adapters(peft):
  peft = normalize(peft)
  return bool(peft.lora.rank or peft.prompts.num_tokens or peft.adapter.dim)


def enabled(peft):
  """Whether `peft` changes anything: an adapter, or `train` (BitFit, probe, ...)."""
  if not peft:
    return False
  peft = normalize(peft)
  return has_adapters(peft) or peft.train is not None


def train_pattern(peft):
  """The regex of base parameters that train beside the adapters; None: all train."""
  peft = normalize(peft)
  if peft.train is not None:
    return peft.train
  return DEFAULT_TRAIN if has_adapters(peft) else None


class _Interceptor:
  """The flax method interceptor adding `peft`'s adapters to one model's modules."""

  def __init__(self, peft):
    self.peft = peft
    self.lora_targets = re.compile(peft.lora.targets)
    self.adapter_targets = re.compile(peft.adapter.targets)
    self.prompts = prompts_lib.Prompts(peft.prompts) if peft.prompts.num_tokens else None
    self.matched = set()

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    if self.peft.lora.rank and lora_lib.fan_in_axes(module) and self.lora_targets.search(path):
      self.matched.add(("lora", path))
      return lora_lib.intercept(module, next_fun, args, kwargs, self.peft.lora)
    if self.peft.adapter.dim and self.adapter_targets.search(path):
      self.matched.add(("adapter", path))
      return adapters_lib.intercept(module, next_fun, args, kwargs, self.peft.adapter)
    if self.prompts is not None:
      if prompts_lib.is_encoder(module) and path == "Transformer":
        self.matched.add(("prompts", path))
        return self.prompts.encoder(module, next_fun, args, kwargs)
      if self.peft.prompts.deep and prompts_lib.is_block(module):
        return self.prompts.block(module, next_fun, args, kwargs)
    return next_fun(*args, **kwargs)


def adapted(model, peft):
  """`model` with `peft`'s adapters: the same module, fields and parameter names, plus the
  adapters' parameters. Every `init` / `apply` runs under the interceptor (so evaluators,
  tasks and jit see an ordinary linen module). `base_model(adapted(m, p))` is `m`'s class.
  """
  peft = normalize(peft)
  cls = type(model)
  base = getattr(cls, "_peft_base", cls)

  def wrap(method_name):
    method = getattr(base, method_name)

    def run(self, *args, **kwargs):
      interceptor = _Interceptor(peft)
      with nn.intercept_methods(interceptor):
        result = method(self, *args, **kwargs)
      if method_name == "init_with_output":  # The adapters must have found their places.
        _check_matched(interceptor, peft)
      return result
    return run

  new_cls = type(base.__name__, (base,), {
      "_peft_base": base, "peft": peft,
      # Module.init calls init_with_output: wrapping both would add every adapter twice.
      **{name: wrap(name) for name in ("apply", "init_with_output")}})
  new_cls.__module__ = base.__module__
  return new_cls(**_fields(model))


def _fields(model):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.init and f.name not in ("parent", "name")}


def _check_matched(interceptor, peft):
  kinds = {kind for kind, _ in interceptor.matched}
  if peft.lora.rank and "lora" not in kinds:
    raise PeftConfigError(f"config.peft.lora.targets={peft.lora.targets!r} matches no dense layer "
                          "of this model; module paths look like 'Transformer/encoderblock_0/"
                          "MultiHeadDotProductAttention_0/query' or '.../MlpBlock_0/Dense_0'.")
  if peft.adapter.dim and "adapter" not in kinds:
    raise PeftConfigError(f"config.peft.adapter.targets={peft.adapter.targets!r} matches no module "
                          "of this model; e.g. 'encoderblock[^/]*/MlpBlock_0$'.")
  if peft.prompts.num_tokens and "prompts" not in kinds:
    raise PeftConfigError("config.peft.prompts: this model has no encoder named 'Transformer' to "
                          "put prompts into.")


def base_model(model):
  """The model without its adapters (a plain instance of the original class)."""
  cls = getattr(type(model), "_peft_base", None)
  return model if cls is None else cls(**_fields(model))


def is_adapter(name):
  """Whether a '/'-joined parameter name is an adapter's (LoRA, prompts, AdaptFormer)."""
  return bool(ADAPTER_NAMES.search(name))


def _flat(params):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(lora_lib.params_dict(nn.unbox(params)), sep="/")


def trainable_mask(params, peft):
  """True for the parameters that train under `peft`: the adapters and `train`'s names."""
  pattern = train_pattern(peft)
  regex = re.compile(pattern) if pattern is not None else None

  def trains(path, _):
    name = "/".join(getattr(k, "key", str(k)) for k in path)
    return is_adapter(name) or (regex is not None and bool(regex.search(name)))
  mask = jax.tree_util.tree_map_with_path(trains, params)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise PeftConfigError(f"config.peft.train={pattern!r} matches no parameter and no adapter is "
                          "on: nothing would train. Parameter names look like 'head/kernel', "
                          "'Transformer/encoderblock_0/LayerNorm_0/scale'.")
  return mask


def init_from(model, base_params, rng, *inputs):
  """The adapted model's parameters: `base_params` (the base model's, e.g. from
  `vitjax.load_weights`) with the adapters freshly initialised from `rng`."""
  from vitjax import models  # pylint: disable=g-import-not-at-top
  inputs = inputs or (models.dummy_input(model),)
  fresh = lora_lib.params_dict(nn.unbox(jax.jit(model.init)(rng, *inputs)["params"]))
  return combine(fresh, base_params)


def combine(adapted_params, base_params):
  """`adapted_params` with every base (non-adapter) parameter taken from `base_params`;
  the names must agree, else a ValueError lists the differences."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  fresh = traverse_util.flatten_dict(lora_lib.params_dict(adapted_params), sep="/")
  base = traverse_util.flatten_dict(lora_lib.params_dict(nn.unbox(base_params)), sep="/")
  wanted = {name for name in fresh if not is_adapter(name)}
  missing, extra = sorted(wanted - set(base)), sorted(set(base) - wanted)
  if missing or extra:
    raise ValueError(f"The base parameters do not fit the adapted model: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}.")
  for name in wanted:
    if np.shape(base[name]) != np.shape(fresh[name]):
      raise ValueError(f"Base parameter {name!r} has shape {np.shape(base[name])}; the model "
                       f"needs {np.shape(fresh[name])}.")
  merged = {name: (value if is_adapter(name) else base[name]) for name, value in fresh.items()}
  return traverse_util.unflatten_dict(merged, sep="/")


def adapter_only(params, peft=None):
  """The adapter parameters of `params` (and, with `peft`, those its `train` names: the
  head, biases...), as a nested dict: what `save_adapter` writes."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  pattern = train_pattern(peft) if peft is not None else None
  regex = re.compile(pattern) if pattern is not None else None
  kept = {name: value for name, value in _flat(params).items()
          if is_adapter(name) or (regex is not None and regex.search(name))}
  return traverse_util.unflatten_dict(kept, sep="/")


def merge(params, peft):
  """LoRA folded into the kernels and removed: parameters of the base model (prompts and
  AdaptFormer adapters cannot be folded; a ValueError says so)."""
  peft = normalize(peft)
  if peft.prompts.num_tokens or peft.adapter.dim:
    raise ValueError("Only LoRA merges into the base weights; prompts and adapters add "
                     "tokens / a branch the base model does not have.")
  return lora_lib.merge(lora_lib.params_dict(nn.unbox(params)), peft.lora)


def unmerge(merged, adapter_params, peft):
  """The adapted parameters back from `merge`'s output and the adapter it merged."""
  return lora_lib.unmerge(merged, adapter_params, normalize(peft).lora)


ADAPTER_FORMAT = "vitjax-adapter-1"


def save_adapter(path, params, peft, *, model_name=None):
  """Writes the adapter parameters (and `train`'s) to a safetensors file, the config in
  its metadata: {'format': 'vitjax-adapter-1', 'peft': JSON, 'model': name}."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  peft = normalize(peft)
  tensors = {name: np.asarray(value) for name, value in
             _flat(adapter_only(params, peft)).items()}
  metadata = {"format": ADAPTER_FORMAT, "peft": json.dumps(_plain(dict(peft)))}
  if model_name:
    metadata["model"] = model_name
  safetensors_numpy.save_file(tensors, str(path), metadata=metadata)


def load_adapter(path, params):
  """`params` (the adapted model's) with the tensors of an adapter file put in place.

  Returns (params, peft config). Every tensor must name a parameter of the same shape.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(str(path), framework="numpy") as f:
      metadata = f.metadata() or {}
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except Exception as e:  # safetensors raises its own error types for corrupt files.
    raise ValueError(f"{path}: not a readable safetensors adapter file ({e}).") from None
  if metadata.get("format") != ADAPTER_FORMAT:
    raise ValueError(f"{path}: not a vitjax adapter file (metadata format "
                     f"{metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}).")
  flat = _flat(params)
  unknown = sorted(set(tensors) - set(flat))
  if unknown:
    raise ValueError(f"{path}: the adapter has parameters this model lacks, e.g. "
                     f"{unknown[:3]}: it was made for another model or config.peft.")
  for name, value in tensors.items():
    if value.shape != np.shape(flat[name]):
      raise ValueError(f"{path}: {name} has shape {value.shape}; the model's is "
                       f"{np.shape(flat[name])}.")
    flat[name] = value
  return traverse_util.unflatten_dict(flat, sep="/"), json.loads(metadata["peft"])
