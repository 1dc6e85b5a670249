"""Stable Diffusion VAE weights: diffusers' AutoencoderKL <-> vitjax.models.vae, both ways.

    vae, params = load_diffusers_vae('sd-vae-ft-ema/')   # config.json + .safetensors weights
    vae, params = load_diffusers_vae('sd-v1-5/', dtype=jnp.bfloat16)  # a pipeline: its vae/
    params = load_vae_state_dict(vae, state_dict)         # {diffusers name: array}, in memory
    save_diffusers_vae(vae, params, 'out/')               # AutoencoderKL.from_pretrained('out/')

A directory is what `AutoencoderKL.save_pretrained` writes (config.json and
diffusion_pytorch_model.safetensors), or a pipeline's with the VAE in `vae/`. Only
safetensors are read, never pickles (`diffusion_pytorch_model.bin`). Names map
one to one: diffusers' module path with '/' for '.' and `down_blocks_0` for
`down_blocks.0`, except the mid block's attention (`attentions.0.to_q` is
`attention/query`, `group_norm` is `attention_norm`) and the resamplers
(`downsamplers.0.conv` is `downsample`); the attention's older names (`query`,
`proj_attn`, as in the hub's sd-vae-ft-* files) load too. Tensors change as in
vitjax.convert.pytorch: convolutions OIHW -> HWIO, Linear weights transposed, the
attention kernels with an explicit single head.
"""

from collections.abc import Mapping
import json
import os
import re

import flax.linen
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.convert import files, mismatch
from vitjax.convert.files import CheckpointError
from vitjax.convert.mismatch import CheckpointMismatchError
from vitjax.models import vae

ANCHOR = "encoder.conv_in.weight"
WEIGHTS = "diffusion_pytorch_model"  # diffusers' file name, before .safetensors.

# (diffusers module, vitjax module), regular expressions applied in order.
_TO_VITJAX = [
    (r"\.(down|up)samplers\.0\.conv$", r"/\1sample"),
    (r"\.attentions\.0\.group_norm$", "/attention_norm"),
    (r"\.attentions\.0\.(to_q|query)$", "/attention/query"),
    (r"\.attentions\.0\.(to_k|key)$", "/attention/key"),
    (r"\.attentions\.0\.(to_v|value)$", "/attention/value"),
    (r"\.attentions\.0\.(to_out\.0|proj_attn)$", "/attention/out"),
    (r"\.(\d+)(?=[./]|$)", r"_\1"),  # down_blocks.0 -> down_blocks_0
    (r"\.", "/"),
]
_FROM_VITJAX = [
    (r"/(down|up)sample$", r".\1samplers.0.conv"),
    (r"/attention_norm$", ".attentions.0.group_norm"),
    (r"/attention/query$", ".attentions.0.to_q"),
    (r"/attention/key$", ".attentions.0.to_k"),
    (r"/attention/value$", ".attentions.0.to_v"),
    (r"/attention/out$", ".attentions.0.to_out.0"),
    (r"_(\d+)(?=[./]|$)", r".\1"),
    (r"/", "."),
]
# The original LDM (CompVis) layout of single-file Stable Diffusion checkpoints.
_LDM = re.compile(r"(^|\.)encoder\.down\.\d+\.block\.")


def _rename(name, rules):
  for pattern, replacement in rules:
    name = re.sub(pattern, replacement, name)
  return name


def _kind(module):
  """'norm', 'qkv', 'out' (the attention's projections) or 'conv', from the vitjax module."""
  last = module.rpartition("/")[2]
  if "norm" in last:
    return "norm"
  if "/attention/" in f"/{module}":
    return "out" if last == "out" else "qkv"
  return "conv"


def _import(kind, leaf, x):
  """A diffusers tensor -> (vitjax leaf, array); shapes that do not fit are left as they are."""
  if kind == "norm":
    return ("scale" if leaf == "weight" else "bias"), x
  if leaf == "bias":
    return "bias", (x[None] if kind == "qkv" and x.ndim == 1 else x)
  if kind == "conv":
    return "kernel", (np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x)
  if x.ndim == 4 and x.shape[2:] == (1, 1):  # Older files: the projections as 1x1 convs.
    x = x[:, :, 0, 0]
  if x.ndim != 2:
    return "kernel", x
  return "kernel", (x.T[:, None, :] if kind == "qkv" else x.T[None])


def _export(kind, leaf, x):
  """A vitjax array -> (diffusers leaf, tensor)."""
  if leaf == "scale":
    return "weight", x
  if leaf == "bias":
    return "bias", x.reshape(-1)
  if kind == "conv":
    return "weight", np.transpose(x, (3, 2, 0, 1))
  if kind == "qkv":  # (in, 1 head, out) -> (out, in).
    return "weight", x.reshape(x.shape[0], -1).T
  return "weight", x.reshape(-1, x.shape[-1]).T  # (1 head, in, out) -> (out, in).


def to_vitjax(state_dict):
  """{diffusers name: array} -> {vitjax name: array}; names that are not a parameter's
  (no '.weight' / '.bias') are kept as they are, to be reported as unexpected."""
  out = {}
  for name, x in state_dict.items():
    module, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias") or not module:
      out[name] = x
      continue
    module = _rename(module, _TO_VITJAX)
    new_leaf, value = _import(_kind(module), leaf, np.asarray(x))
    out[f"{module}/{new_leaf}"] = value
  return out


def from_vitjax(params):
  """vitjax AutoencoderKL params (nested or flat '/'-joined) -> diffusers' state dict."""
  nested = any(isinstance(v, Mapping) for v in params.values())
  flat = traverse_util.flatten_dict(dict(params), sep="/") if nested else params
  state_dict = {}
  for name, x in flat.items():
    module, _, leaf = name.rpartition("/")
    torch_leaf, value = _export(_kind(module), leaf, np.asarray(x))
    state_dict[f"{_rename(module, _FROM_VITJAX)}.{torch_leaf}"] = np.ascontiguousarray(value)
  return state_dict


def param_template(model):
  """Flat {vitjax name: ShapeDtypeStruct} of `model`'s parameters, traced at a tiny size."""
  size = model.downsample_factor  # The shapes do not depend on the image size.
  images = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: flax.linen.unbox(model.init(jax.random.PRNGKey(0), x)["params"]), images)
  return traverse_util.flatten_dict(shapes, sep="/")


def load_vae_state_dict(model, state_dict, what="The state dict"):
  """Params for `model` (a vitjax.models.vae.AutoencoderKL) from diffusers' names and tensors.

  A wrapper prefix ('vae.', 'first_stage_model.') is dropped. Raises CheckpointError for
  what is not a diffusers AutoencoderKL state dict, CheckpointMismatchError (listing what is
  missing, unexpected and differently shaped, and the config that would fit) for one that
  does not fit `model`. Returns nested dicts of NumPy arrays in the model's param_dtype.
  """
  if any(_LDM.search(name) for name in state_dict):
    raise CheckpointError(
        f"{what} is in the original LDM (CompVis) layout ('encoder.down.0.block.0...'), not "
        "diffusers'. Convert it with diffusers: AutoencoderKL.from_single_file(path)"
        ".save_pretrained(directory), then load the directory.")
  found = files.find_layout(state_dict, (("diffusers AutoencoderKL", ANCHOR),), what=what)
  if found is None:
    first = ", ".join(sorted(state_dict)[:8]) or "no arrays"
    raise CheckpointError(f"{what} is not a diffusers AutoencoderKL: it has no {ANCHOR!r}. "
                          f"Found: {first}{', ...' if len(state_dict) > 8 else ''}.")
  _, prefix = found
  params = to_vitjax({name[len(prefix):]: x for name, x in state_dict.items()
                      if name.startswith(prefix)})
  template = param_template(model)
  message = mismatch.mismatch_message(params, template, what, _hints)
  if message:
    raise CheckpointMismatchError(message)
  # np.array copies: the arrays may be read-only views of a memory-mapped file.
  params = {name: np.array(params[name], dtype=t.dtype) for name, t in template.items()}
  return traverse_util.unflatten_dict(params, sep="/")


def load_diffusers_vae(path, *, variant=None, **overrides):
  """(AutoencoderKL, params) from a diffusers directory: config.json + safetensors weights.

  Args:
    path: what `AutoencoderKL.save_pretrained` wrote, or a pipeline's directory (its `vae/`).
    variant: diffusers' weight variant, e.g. 'fp16' (diffusion_pytorch_model.fp16.safetensors).
    **overrides: AutoencoderKL fields on top of the config (dtype, attention_impl, ...).

  Raises:
    CheckpointError: no config.json or weights, or a config vitjax's port does not build.
    CheckpointMismatchError: weights that do not fit the config.
  """
  directory = os.path.expanduser(os.fspath(path))
  if (not os.path.isfile(os.path.join(directory, "config.json"))
      and os.path.isfile(os.path.join(directory, "vae", "config.json"))):
    directory = os.path.join(directory, "vae")
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    what = "a directory" if os.path.isdir(directory) else "not a directory"
    raise CheckpointError(f"{path} is {what} without config.json: load_diffusers_vae reads what "
                          "AutoencoderKL.save_pretrained writes (config.json and "
                          f"{WEIGHTS}.safetensors). For weights alone, build the model and "
                          "call load_vae_state_dict.")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    model = vae.from_diffusers_config(config, **overrides)
  except (ValueError, TypeError) as e:  # JSON errors are ValueErrors.
    raise CheckpointError(f"{config_path}: {e}") from None
  stem = f"{WEIGHTS}.{variant}" if variant else WEIGHTS
  candidates = [os.path.join(directory, f"{stem}.safetensors"),
                os.path.join(directory, f"{stem}.safetensors.index.json")]
  weights = next((c for c in candidates if os.path.isfile(c)), None)
  if weights is None:
    pickled = os.path.join(directory, f"{stem}.bin")
    extra = (f" It has {os.path.basename(pickled)}, a pickle, which vitjax does not read: "
             "convert it with AutoencoderKL.from_pretrained(directory).save_pretrained("
             "directory, safe_serialization=True).") if os.path.isfile(pickled) else ""
    raise CheckpointError(f"{directory} has no {stem}.safetensors.{extra}")
  arrays, _ = files.read_arrays(weights)
  return model, load_vae_state_dict(model, arrays, f"The diffusers AutoencoderKL {weights}")


def save_diffusers_vae(model, params, directory):
  """Writes config.json and diffusion_pytorch_model.safetensors, which diffusers'
  `AutoencoderKL.from_pretrained(directory)` and `load_diffusers_vae` load."""
  directory = os.path.expanduser(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  state_dict = from_vitjax(jax.device_get(params))
  files.write_safetensors(state_dict, os.path.join(directory, f"{WEIGHTS}.safetensors"),
                          metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(vae.to_diffusers_config(model), f, indent=2)


def _architecture(shapes):
  """The config fields that the weights' names and shapes show, {field: value}."""
  def blocks(part, family):
    return sorted({int(m[1]) for n in shapes
                   for m in [re.match(rf"{part}/{family}_(\d+)/", n)] if m})
  found = {}
  encoder = blocks("encoder", "down_blocks")
  widths = [shapes.get(f"encoder/down_blocks_{i}/resnets_0/conv1/kernel") for i in encoder]
  if widths and all(w is not None and len(w) == 4 for w in widths):
    found["block_out_channels"] = tuple(w[-1] for w in widths)
  resnets = {int(m[1]) for n in shapes
             for m in [re.match(r"encoder/down_blocks_0/resnets_(\d+)/", n)] if m}
  if resnets:
    found["layers_per_block"] = max(resnets) + 1
  for field, name, axis in (("in_channels", "encoder/conv_in/kernel", -2),
                            ("latent_channels", "decoder/conv_in/kernel", -2),
                            ("out_channels", "decoder/conv_out/kernel", -1)):
    if name in shapes and len(shapes[name]) == 4:
      found[field] = shapes[name][axis]
  found["mid_block_add_attention"] = any("mid_block/attention/" in n for n in shapes)
  found["use_quant_conv"] = any(n.startswith("quant_conv/") for n in shapes)
  found["use_post_quant_conv"] = any(n.startswith("post_quant_conv/") for n in shapes)
  return found


def _hints(params, template, differing):
  del differing  # The architecture says more than the names.
  have = _architecture({n: tuple(np.shape(v)) for n, v in params.items()})
  want = _architecture({n: tuple(t.shape) for n, t in template.items()})
  fields = [f for f in want if f in have and have[f] != want[f]]
  if not fields:
    return []
  return ["The checkpoint has " + ", ".join(f"{f}={have[f]!r}" for f in fields)
          + "; the model " + ", ".join(f"{f}={want[f]!r}" for f in fields) + ". "
          "load_diffusers_vae(directory) builds the model from the checkpoint's config.json."]
