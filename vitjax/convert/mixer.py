"""MLP-Mixer weights: the published big_vision / vision_transformer .npz and timm state dicts.

The .npz names are vitjax's own (`stem/kernel`, `MixerBlock_0/token_mixing/Dense_0/kernel`,
...); timm's are renamed here, both ways (`save_weights(..., format='timm')`): `stem.proj`,
`blocks.{i}.norm1`, `blocks.{i}.mlp_tokens.fc1`, `blocks.{i}.norm2`,
`blocks.{i}.mlp_channels.fc1`, `norm`, `head`.
"""

import re

import numpy as np

BIG_VISION_ANCHOR = "stem/kernel"
TIMM_ANCHOR = "stem.proj.weight"

_TIMM_BLOCK = {  # timm name inside blocks.{i}. -> vitjax name inside MixerBlock_{i}/
    "norm1": "LayerNorm_0",
    "norm2": "LayerNorm_1",
    "mlp_tokens.fc1": "token_mixing/Dense_0",
    "mlp_tokens.fc2": "token_mixing/Dense_1",
    "mlp_channels.fc1": "channel_mixing/Dense_0",
    "mlp_channels.fc2": "channel_mixing/Dense_1",
}
_TIMM_TOP = {"norm": "pre_head_layer_norm", "head": "head"}


def is_mixer(arrays):
  return any(name.endswith((BIG_VISION_ANCHOR, TIMM_ANCHOR)) for name in arrays)


def layout(arrays):
  """'big_vision' or 'timm', for messages."""
  return "timm" if any(name.endswith(TIMM_ANCHOR) for name in arrays) else "big_vision"


def to_vitjax(arrays):
  """Flat '/'-joined vitjax names -> arrays, from either layout; unknown names kept as they are."""
  anchor = next(name for name in arrays if name.endswith((BIG_VISION_ANCHOR, TIMM_ANCHOR)))
  if anchor.endswith(BIG_VISION_ANCHOR):
    prefix = anchor[:-len(BIG_VISION_ANCHOR)]  # 'params/', 'opt/target/' or ''.
    return {name[len(prefix):]: value for name, value in arrays.items()
            if name.startswith(prefix)}
  prefix = anchor[:-len(TIMM_ANCHOR)]  # DDP's 'module.' and the like.
  params = {}
  for name, value in arrays.items():
    name = name[len(prefix):] if name.startswith(prefix) else name
    params.update(_from_timm(name, np.asarray(value)))
  return params


def _from_timm(name, value):
  module, _, kind = name.rpartition(".")
  if module == "stem.proj":
    return {f"stem/{'kernel' if kind == 'weight' else 'bias'}":
            np.transpose(value, (2, 3, 1, 0)) if kind == "weight" else value}
  match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
  target = (f"MixerBlock_{match.group(1)}/{_TIMM_BLOCK[match.group(2)]}"
            if match and match.group(2) in _TIMM_BLOCK else _TIMM_TOP.get(module))
  if target is None:
    return {name: value}  # Reported as unexpected by the caller.
  is_norm = "norm" in module.split(".")[-1] or module == "norm"
  if kind == "weight":
    return {f"{target}/{'scale' if is_norm else 'kernel'}": value if is_norm else value.T}
  return {f"{target}/bias": value}


def is_mixer_params(flat):
  """Whether {vitjax name: array} parameters are a vitjax MlpMixer's."""
  return "stem/kernel" in flat and any(name.startswith("MixerBlock_") for name in flat)


def from_vitjax(flat):
  """{vitjax name: array} -> timm MlpMixer state dict; raises naming what has no place."""
  to_timm = {vitjax_name: timm_name for timm_name, vitjax_name in _TIMM_BLOCK.items()}
  to_timm.update({v: k for k, v in _TIMM_TOP.items()})
  state_dict, left = {}, []
  for name, value in flat.items():
    module, _, leaf = name.rpartition("/")
    value = np.asarray(value)
    match = re.fullmatch(r"MixerBlock_(\d+)/(.+)", module)
    if module == "stem":  # (kh, kw, in, out) -> PyTorch's (out, in, kh, kw).
      target, value = "stem.proj", value.transpose(3, 2, 0, 1) if leaf == "kernel" else value
    elif match and match.group(2) in to_timm:
      target = f"blocks.{match.group(1)}.{to_timm[match.group(2)]}"
    elif module in to_timm:
      target = to_timm[module]
    else:
      left.append(name)
      continue
    if leaf == "kernel" and module != "stem":
      value = value.T  # Dense: (in, out) -> Linear's (out, in).
    state_dict[f"{target}.{'bias' if leaf == 'bias' else 'weight'}"] = value
  if left:
    raise ValueError(f"No place in timm's MlpMixer for: {', '.join(sorted(left))}.")
  return state_dict
