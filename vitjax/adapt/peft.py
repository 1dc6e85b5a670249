"""LoRA in the `peft` library's format, for the equivalent Hugging Face transformers ViT.

    vitjax.adapt.peft.export_peft('lora_dir', params, peft, model)
    # In PyTorch, on the same base weights (e.g. vitjax.save_weights(..., format='hf')):
    #   hf = transformers.ViTForImageClassification.from_pretrained(base_dir)
    #   hf = peft.PeftModel.from_pretrained(hf, 'lora_dir')
    params, peft = vitjax.adapt.peft.load_peft('lora_dir', base_params, None, model)
    logits, out = vitjax.adapt.adapted(model, peft).apply({'params': params}, images)

A peft LoRA directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors`: for each adapted nn.Linear `base_model.model.MODULE.lora_A.
weight` (rank, in) and `.lora_B.weight` (out, rank), the update being (lora_alpha / r) *
B @ A @ x, which is vitjax's `scale * (x @ lora_a) @ lora_b` with the fan-in axes of
`lora_a` and the fan-out axes of `lora_b` flattened. A classifier in `modules_to_save`
is the vitjax `head` (which `config.peft.train` trains by default).

MODULE is the transformers model's own module name, and transformers 5 renamed the ViT
blocks: 'vit.encoder.layer.0.attention.attention.query' (transformers 4, and the names
of the checkpoints on the hub) became 'vit.layers.0.attention.q_proj'. peft does not
rename ViT adapter keys, so an adapter loads only into a transformers of the generation
whose names it holds: `export_peft` writes the installed transformers' names by default
(names='v4' or 'v5' to choose), `load_peft` reads both. The module names come from the
weight converter's tables (vitjax.convert.pytorch), as `vitjax.save_weights(format='hf')`.

The models: vitjax ViT / DeiT that `vitjax.convert.hf_config` describes (ViTModel,
ViTForImageClassification, DeiT), in either block layout (`scan_layers` stacks the LoRA
matrices as it does the kernels).
"""

import functools
import json
import math
import os
import re

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from vitjax import adapt
from vitjax.adapt import lora as lora_lib
from vitjax.convert import big_vision, checkpoint, files, pytorch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAMES = (WEIGHTS_NAME, "adapter_model.bin")  # .bin: torch.load(weights_only=True).
NAMES = ("auto", "v4", "v5")
PEFT_PREFIX = "base_model.model."
_LINEAR_KINDS = ("qkv", "out", "dense")
# Config keys whose non-default values change what the adapter computes and that vitjax's
# LoRA does not do.
_REFUSED = {
    "use_dora": (False, "DoRA (use_dora=True) rescales the weights' columns"),
    "bias": ("none", "trained biases (bias != 'none')"),
    "lora_bias": (False, "a bias on lora_B (lora_bias=True)"),
    "target_parameters": (None, "LoRA on nn.Parameters (target_parameters)"),
    "trainable_token_indices": (None, "trainable tokens (trainable_token_indices)"),
    "layer_replication": (None, "layer replication (layer_replication)"),
}


# --- Module names: vitjax <-> transformers ---------------------------------------------------

def _tables(family):
  """{'v4': rules, 'v5': rules} of the linear layers, each rule (torch template, vitjax
  template); the classification heads (`pytorch.HF_HEADS`) last, outside the model prefix."""
  hub = [(t, v) for t, v, kind in pytorch.HF if kind in _LINEAR_KINDS]
  # transformers >= 5 renamed the blocks only ('layers.{i}....'); the pooler kept its name.
  renamed = [(t, v) for t, v, kind in pytorch.HF_IMPORT
             if t.startswith("layers.") and kind in _LINEAR_KINDS]
  outside = [(t, v) for t, v, _ in pytorch.HF_HEADS[family]]
  not_blocks = [(t, v) for t, v in hub if "{i}" not in t]
  return {"v4": hub + outside, "v5": renamed + not_blocks + outside}


def _template_regex(template):
  return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


def _rename(name, rules, source, target):
  """`name` through the first rule whose `source` side (0: torch, 1: vitjax) matches it."""
  for rule in rules:
    match = _template_regex(rule[source]).fullmatch(name)
    if match:
      index = match.groups()[0] if match.groups() else ""
      return rule[target].replace("{i}", index)
  return None


@functools.lru_cache(maxsize=None)
def installed_names():
  """'v5' if the installed transformers names ViT blocks 'layers.{i}.attention.q_proj',
  'v4' if 'encoder.layer.{i}.attention.attention.query'; 'v5' without transformers."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "v5"
  config = transformers.ViTConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                                  intermediate_size=4, image_size=4, patch_size=2)
  with torch.device("meta"):  # Module names only: no memory, no initialisation.
    model = transformers.ViTModel(config, add_pooling_layer=False)
  modules = {name for name, _ in model.named_modules()}
  return "v4" if "encoder.layer.0.attention.attention.query" in modules else "v5"


def _family(model):
  """(architecture, family, prefix) of the transformers twin of a vitjax ViT `model`."""
  from vitjax.models.vit import VisionTransformer  # pylint: disable=g-import-not-at-top
  model = adapt.base_model(model)
  if not isinstance(model, VisionTransformer):
    raise ValueError(f"peft adapters are for transformers' ViT / DeiT; a vitjax "
                     f"{type(model).__name__} has no transformers twin vitjax converts to. "
                     "Use vitjax.adapt.save_adapter for any model.")
  try:
    config = checkpoint.hf_config(model)
  except ValueError as e:
    raise ValueError(f"This model has no transformers ViT twin: {e}") from None
  architecture = config["architectures"][0]
  family = config["model_type"]
  prefix = f"{family}." if model.num_classes else ""  # ViTModel / DeiTModel: no prefix.
  return architecture, family, prefix


def _flat(params):
  params = lora_lib.params_dict(nn.unbox(params))
  if set(params) == {"params"}:
    params = params["params"]
  flat = {name: np.asarray(value) for name, value in
          traverse_util.flatten_dict(params, sep="/").items()}
  return big_vision.unstack_blocks(flat)  # scan_layers: one entry per block, as PyTorch.


# --- Export ------------------------------------------------------------------------------

def export_peft(directory, params, peft, model, *, names="auto",
                base_model_name_or_path=None):
  """Writes `params`' LoRA as a peft adapter directory for the transformers twin of `model`.

  Args:
    directory: created if missing; `adapter_config.json` and `adapter_model.safetensors`
      in it are replaced.
    params: the adapted model's parameters (with lora_a / lora_b), either block layout.
    peft: the config.peft they were trained with: LoRA only (prompts and AdaptFormer
      adapters have no peft LoRA form). Trained heads (`train` matching 'head/...')
      go to `modules_to_save`; other trained base parameters (BitFit biases, norms)
      have no place, and raise.
    model: the vitjax model, adapted or not (its base must be a ViT / DeiT that
      `vitjax.convert.hf_config` describes: class token, learned position embeddings).
    names: transformers' module names: 'auto' (the installed transformers'), 'v4'
      ('vit.encoder.layer.0.attention.attention.query') or 'v5' ('vit.layers.0.attention.
      q_proj').
    base_model_name_or_path: recorded in the config (the hub name or directory of the
      base weights), as peft does.

  Returns:
    The adapter_config.json written, as a dict.

  Raises:
    ValueError: what has no peft / transformers equivalent, before anything is written.
  """
  config, tensors = peft_adapter(params, peft, model, names=names,
                                 base_model_name_or_path=base_model_name_or_path)
  os.makedirs(directory, exist_ok=True)
  files.write_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME),
                          metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return config


def peft_adapter(params, peft, model, *, names="auto", base_model_name_or_path=None):
  """(adapter_config.json's dict, {key: array} of adapter_model.safetensors): what
  `export_peft` writes, computed without writing."""
  if names not in NAMES:
    raise ValueError(f"names={names!r}: use one of {NAMES}.")
  names = installed_names() if names == "auto" else names
  architecture, family, prefix = _family(model)
  peft = adapt.normalize(peft)
  if not peft.lora.rank:
    raise ValueError("config.peft has no LoRA (lora.rank=0): a peft LoRA adapter would be "
                     "empty.")
  if peft.prompts.num_tokens or peft.adapter.dim:
    raise ValueError("peft's LoRA format holds LoRA only; these params also have visual "
                     "prompts or AdaptFormer adapters. Use vitjax.adapt.save_adapter.")
  flat = _flat(params)
  base = {name: value for name, value in flat.items() if not adapt.is_adapter(name)}
  checkpoint._to_hf(base)  # pylint: disable=protected-access  # Raises what has no HF place.
  rules = _tables(family)[names]
  heads = {v for _, v, _ in pytorch.HF_HEADS[family]}
  depth = adapt.base_model(model).depth

  def torch_module(vitjax_module):
    name = _rename(vitjax_module, rules, 1, 0)
    return None if name is None else (name if vitjax_module in heads else prefix + name)

  rank = peft.lora.rank
  tensors, lora_modules = {}, []
  for name in sorted(flat):
    if not name.endswith("/lora_a"):
      continue
    module = name[:-len("/lora_a")]
    target = torch_module(module)
    if target is None:
      raise ValueError(f"LoRA on {module!r} has no place in a transformers "
                       f"{architecture}: peft's adapter can only hold LoRA of its Linear "
                       "layers (query, key, value, attention output, MLP, classifier).")
    lora_a, lora_b = flat[name], flat[module + "/lora_b"]
    tensors[f"{PEFT_PREFIX}{target}.lora_A.weight"] = lora_a.reshape(-1, rank).T
    tensors[f"{PEFT_PREFIX}{target}.lora_B.weight"] = lora_b.reshape(rank, -1).T
    lora_modules.append(target)
  if not lora_modules:
    raise ValueError("These params hold no LoRA (no '.../lora_a'): are they the adapted "
                     "model's, with config.peft.lora.rank > 0?")

  modules_to_save = []
  pattern = adapt.train_pattern(peft)
  trained = sorted(n for n in base if pattern is not None and re.search(pattern, n))
  for name in trained:
    module = name.rsplit("/", 1)[0]
    if module not in heads:
      raise ValueError(f"config.peft.train={pattern!r} also trains {name!r}; peft's LoRA "
                       "format holds the LoRA matrices and the classifier only. Use "
                       "vitjax.adapt.save_adapter for the rest.")
    target = torch_module(module)
    if target in lora_modules:
      raise ValueError(f"{module!r} has LoRA and is trained in full: peft cannot hold both.")
    if target not in modules_to_save:  # peft saves the whole module: weight and bias.
      modules_to_save.append(target)
      tensors[f"{PEFT_PREFIX}{target}.weight"] = base[f"{module}/kernel"].T
      if f"{module}/bias" in base:
        tensors[f"{PEFT_PREFIX}{target}.bias"] = base[f"{module}/bias"]

  linear_modules = [torch_module(v.replace("{i}", str(i))) for _, v in rules
                    for i in (range(depth) if "{i}" in v else [None])
                    if f"{v.replace('{i}', str(i))}/kernel" in base]
  config = {
      "peft_type": "LORA", "task_type": None, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "revision": None,
      "r": rank, "lora_alpha": _number(peft.lora.alpha if peft.lora.alpha is not None
                                       else rank),
      "lora_dropout": float(peft.lora.dropout),
      "target_modules": _short_names(lora_modules, linear_modules),
      "modules_to_save": modules_to_save or None,
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
      "layers_to_transform": None, "layers_pattern": None,
      "auto_mapping": {"base_model_class": architecture,
                       "parent_library": f"transformers.models.{family}.modeling_{family}"},
  }
  return config, {key: np.ascontiguousarray(value) for key, value in tensors.items()}


def _number(x):
  return int(x) if float(x).is_integer() else float(x)


def _short_names(targets, modules):
  """peft's `target_modules`: for each target, the shortest dotted suffix that names only
  targets among `modules` (peft matches a name or a '.'-suffix of it): 'query' when every
  block's query has LoRA, the full name when only some do."""
  targets, chosen = set(targets), set()
  for target in sorted(targets):
    parts = target.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if parts[-n].isdigit():  # 'layers.0.attention.q_proj' reads better than '0.attention...'.
        continue
      named = {m for m in modules if m == suffix or m.endswith("." + suffix)}
      if named <= targets:
        chosen.add(suffix)
        break
  return sorted(chosen)


# --- Import ------------------------------------------------------------------------------

def read_peft(directory):
  """(adapter_config.json as a dict, {key: np.ndarray}) of a peft adapter directory."""
  config_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; is it a peft adapter directory "
                            "(PeftModel.save_pretrained)?")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{config_path}: not readable JSON ({e}).") from None
  for name in WEIGHTS_NAMES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      arrays, _ = files.read_arrays(path)  # A .bin only with torch.load(weights_only=True).
      return config, arrays
  raise FileNotFoundError(f"{directory}: no {' or '.join(WEIGHTS_NAMES)}.")


def _check_config(config, where):
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: a peft {config.get('peft_type')!r} adapter; vitjax reads "
                     "LoRA adapters (peft_type 'LORA') only.")
  for key, (default, what) in _REFUSED.items():
    value = config.get(key, default)
    if value != default and not (default is None and not value):
      raise ValueError(f"{where}: {what}; vitjax's LoRA has no such thing ({key}={value!r}).")
  r, alpha = config.get("r"), config.get("lora_alpha")
  if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
    raise ValueError(f"{where}: r={r!r}, lora_alpha={alpha!r}: a positive rank and alpha "
                     "are needed.")
  for key, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
    differ = {k: v for k, v in (config.get(key) or {}).items() if v != default}
    if differ:
      raise ValueError(f"{where}: {key}={differ}: vitjax's LoRA has one rank and one alpha "
                       "for every layer.")


def _lora_alpha(config):
  """vitjax's alpha (scale = alpha / rank) of a peft config's scale."""
  r, alpha = config["r"], config["lora_alpha"]
  if config.get("use_rslora"):  # rsLoRA scales by lora_alpha / sqrt(r).
    return _number(alpha * math.sqrt(r))
  return alpha


def _targets_regex(modules, depth):
  """A `config.peft.lora.targets` regex naming exactly `modules` (vitjax module paths): the
  same module in every block as 'encoderblock[^/]*/MultiHeadDotProductAttention_0/query$'
  (both block layouts), some blocks' as 'encoderblock_(0|2)/...', others by name."""
  depth_blocks = {}
  others = []
  for module in modules:
    match = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", module)
    if match:
      depth_blocks.setdefault(match[2], set()).add(int(match[1]))
    else:
      others.append(module)
  groups = {}  # Blocks string -> {parent: [leaves]}.
  for suffix, blocks in sorted(depth_blocks.items()):
    key = ("encoderblock[^/]*" if blocks == set(range(depth))
           else "encoderblock_(" + "|".join(str(i) for i in sorted(blocks)) + ")")
    parent, _, leaf = suffix.rpartition("/")
    groups.setdefault(key, {}).setdefault(parent, []).append(leaf)
  alternatives = []
  for key, parents in groups.items():
    for parent, leaves in parents.items():
      leaf = leaves[0] if len(leaves) == 1 else "(" + "|".join(leaves) + ")"
      alternatives.append(f"{key}/{parent + '/' if parent else ''}{leaf}")
  alternatives += ["^" + re.escape(m) for m in sorted(others)]
  if len(alternatives) == 1:
    return alternatives[0] + "$"
  return "(" + "|".join(alternatives) + ")$"


def load_peft(directory, params, peft, model):
  """The adapted vitjax parameters of a peft LoRA adapter of a transformers ViT / DeiT.

  Args:
    directory: a peft adapter directory (`PeftModel.save_pretrained`), with transformers 4
      or 5 module names.
    params: the base model's parameters (e.g. `vitjax.load_weights(model, base_dir)`),
      either block layout; LoRA parameters already in them are replaced.
    peft: None (derived from the adapter: rank, alpha, dropout, and targets naming the
      adapted layers), or the config.peft to use: its rank and scale must be the
      adapter's, and its targets must reach exactly the adapter's layers.
    model: the base model (or the adapted one).

  Returns:
    (params, peft): parameters of `vitjax.adapt.adapted(model, peft)`, with the LoRA
    matrices, and a classifier of `modules_to_save` as the head.

  Raises:
    FileNotFoundError: no adapter there.
    ValueError: what vitjax's LoRA does not do (DoRA, trained biases, per-layer ranks,
      other modules_to_save, ...), or an adapter of another model.
  """
  config, arrays = read_peft(directory)
  where = os.fspath(directory)
  _check_config(config, where)
  architecture, family, _ = _family(model)
  tables = _tables(family)
  heads = {t: v for t, v, _ in pytorch.HF_HEADS[family]}
  saved = config.get("modules_to_save") or []
  saved = [saved] if isinstance(saved, str) else list(saved)
  unknown = [m for m in saved if m.rsplit(".", 1)[-1] not in heads]
  if unknown:
    raise ValueError(f"{where}: modules_to_save={unknown}: vitjax reads the classifier "
                     f"({', '.join(heads)}) only.")

  def vitjax_module(name):
    # The model prefix ('vit.') is optional: ViTModel's adapters fit a classifier's blocks.
    inside = name[len(family) + 1:] if name.startswith(family + ".") else name
    if name in heads:
      return heads[name]
    for rules in tables.values():
      found = _rename(inside, [rule for rule in rules if rule[1] not in heads.values()], 0, 1)
      if found is not None:
        return found
    return None

  rank = config["r"]
  loras, head_tensors, unplaced = {}, {}, []
  for key, value in arrays.items():
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
    module_name = match[1] if match else name.rsplit(".", 1)[0]
    module = vitjax_module(module_name)
    if module is None or (not match and module not in heads.values()):
      unplaced.append(key)
    elif match:
      loras.setdefault(module, {})[match[2]] = np.asarray(value)
    else:
      head_tensors[f"{module}/{'kernel' if name.endswith('.weight') else 'bias'}"] = (
          np.asarray(value).T if name.endswith(".weight") else np.asarray(value))
  if unplaced:
    raise ValueError(f"{where}: no place in a vitjax {architecture} for "
                     f"{', '.join(sorted(unplaced)[:4])}{' ...' if len(unplaced) > 4 else ''}"
                     " (an adapter of another model?).")
  if not loras:
    raise ValueError(f"{where}: the adapter holds no LoRA weights ('...lora_A.weight').")
  for module, pair in loras.items():
    if set(pair) != {"A", "B"}:
      raise ValueError(f"{where}: {module!r} has lora_{''.join(pair)} but not the other.")
    if pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
      raise ValueError(f"{where}: {module!r} has LoRA of rank {pair['A'].shape[0]}; the config "
                       f"says r={rank}.")

  derived = {"lora": {"rank": rank, "alpha": _lora_alpha(config),
                      "dropout": float(config.get("lora_dropout") or 0.0),
                      "targets": _targets_regex(sorted(loras), adapt.base_model(model).depth)}}
  if peft is None:
    peft = derived
  else:
    given = adapt.normalize(peft)
    if given.lora.rank != rank or not math.isclose(
        lora_lib.scale(given.lora), derived["lora"]["alpha"] / rank, rel_tol=1e-6):
      raise ValueError(f"{where}: the adapter has rank {rank} and alpha "
                       f"{derived['lora']['alpha']} (vitjax's); config.peft.lora has "
                       f"rank={given.lora.rank}, alpha={given.lora.alpha}.")

  base_model = adapt.base_model(model)
  if base_model.scan_layers and "encoderblock_(" in derived["lora"]["targets"]:
    raise ValueError(f"{where}: LoRA in some blocks only; a scan_layers=True model has it in "
                     "every block alike. Load it into the scan_layers=False model.")
  from vitjax.models import param_shapes  # pylint: disable=g-import-not-at-top
  try:
    template = param_shapes(adapt.adapted(base_model, peft))
  except ValueError as e:  # Targets that reach no layer.
    raise ValueError(f"{where}: {str(e).splitlines()[0]}") from None
  template = traverse_util.flatten_dict(template, sep="/")
  scanned = big_vision.is_scanned(template)
  template = big_vision.unstack_blocks(
      template, take=lambda t, i: jax.ShapeDtypeStruct(t.shape[1:], t.dtype))
  wanted = {n[:-len("/lora_a")] for n in template if n.endswith("/lora_a")}
  if wanted != set(loras):
    raise ValueError(f"{where}: config.peft.lora.targets={adapt.normalize(peft).lora.targets!r}"
                     f" puts LoRA on {len(wanted)} layers, the adapter has {len(loras)}: "
                     f"only in the adapter {sorted(set(loras) - wanted)[:3]}, only in the "
                     f"model {sorted(wanted - set(loras))[:3]}.")

  flat = {name: value for name, value in _flat(params).items() if not adapt.is_adapter(name)}
  differing = sorted(n for n in flat if n in template and flat[n].shape != template[n].shape)
  if differing:
    raise ValueError(f"The base parameters do not fit the model: {differing[0]} has shape "
                     f"{flat[differing[0]].shape}, the model's is {template[differing[0]].shape}.")
  for name, value in head_tensors.items():
    if name not in flat or flat[name].shape != value.shape:
      raise ValueError(f"{where}: its classifier {name} has shape {value.shape}; the model's "
                       f"is {flat[name].shape if name in flat else 'absent'}.")
    flat[name] = value.astype(flat[name].dtype)
  for module, pair in loras.items():
    for leaf, value in (("lora_a", pair["A"].T), ("lora_b", pair["B"].T)):
      shape = template[f"{module}/{leaf}"].shape
      if value.size != math.prod(shape):
        raise ValueError(f"{where}: {module!r}'s {leaf} has {value.shape}, the model needs "
                         f"{shape}.")
      # lora_b: (rank, out) rows reshaped to (rank, fan-out axes...) in order.
      flat[f"{module}/{leaf}"] = np.ascontiguousarray(
          value.reshape(shape), template[f"{module}/{leaf}"].dtype)
  missing, extra = sorted(set(template) - set(flat)), sorted(set(flat) - set(template))
  if missing or extra:
    raise ValueError(f"{where}: the parameters do not fit the adapted model: missing "
                     f"{missing[:4]}, unexpected {extra[:4]}.")
  if scanned:
    flat = big_vision.stack_blocks(flat)
  return traverse_util.unflatten_dict(flat, sep="/"), peft
