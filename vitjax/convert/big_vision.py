"""big_vision and vision_transformer (AugReg) .npz checkpoints.

vitjax's parameter names are big_vision's, so the modern layout needs no renaming.
The original vision_transformer / AugReg layout differs in a few names, and
big_vision's `scan=True` models stack the blocks along a leading axis. Position
embeddings without the class token's entry are handled by the loader.

vitjax models use either block layout (`scan_layers`); `scan_params` and
`unscan_params` convert a params tree between them, exactly.
"""

import re

import flax.linen
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

ANCHOR = "embedding/kernel"  # Every ViT has it; what precedes it is a wrapper prefix.

_OLD_BLOCK_NAMES = {  # vision_transformer / AugReg name -> big_vision name, inside a block.
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_0": "LayerNorm_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}
_OLD_BLOCK = re.compile(r"^(Transformer/encoderblock_\d+)/(" + "|".join(_OLD_BLOCK_NAMES) + ")/")
_SCANNED = "Transformer/encoderblock/"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")


def to_vitjax(arrays):
  """{'/'-joined name: array} in any big_vision-family layout -> vitjax names."""
  if any("/MlpBlock_3/" in name for name in arrays):
    arrays = {_OLD_BLOCK.sub(lambda m: f"{m[1]}/{_OLD_BLOCK_NAMES[m[2]]}/", name): value
              for name, value in arrays.items()}
  arrays = dict(arrays)
  for old_name in ("Transformer/posembed_input/pos_embedding",  # Original ViT.
                   "Transformer/pos_embedding"):  # big_vision before 2022.
    if old_name in arrays:
      arrays["pos_embedding"] = arrays.pop(old_name)
  if "probe" in arrays:  # A MAP head inlined at the top level (big_vision's ViT-G work).
    inlined = ("probe", "MlpBlock_0/", "MultiHeadDotProductAttention_0/", "LayerNorm_0/")
    arrays = {"MAPHead_0/" + n if n.startswith(inlined) else n: v for n, v in arrays.items()}
  return unstack_blocks(arrays)


def is_scanned(arrays):
  """Whether {'/'-joined name: array} holds blocks stacked as 'Transformer/encoderblock/...'."""
  return any(name.startswith(_SCANNED) for name in arrays)


def unstack_blocks(arrays, take=lambda value, i: value[i]):
  """'Transformer/encoderblock/NAME' (depth, ...) -> 'Transformer/encoderblock_{i}/NAME'.

  big_vision's scan=True layout: one 'encoderblock' whose every parameter has a
  leading depth axis. Anything else passes through; `take` slices other leaf
  types (shape structs).
  """
  out = {}
  for name, value in arrays.items():
    if name.startswith(_SCANNED):
      rest = name[len(_SCANNED):]
      for i in range(value.shape[0]):
        out[f"Transformer/encoderblock_{i}/{rest}"] = take(value, i)
    else:
      out[name] = value
  depths = {arrays[n].shape[0] for n in arrays if n.startswith(_SCANNED)}
  if len(depths) > 1:
    raise ValueError(f"Stacked blocks of different depths {sorted(depths)}: the leading axis of "
                     f"every '{_SCANNED}...' parameter is the layer index.")
  return out


def stack_blocks(arrays):
  """'Transformer/encoderblock_{i}/NAME' -> 'Transformer/encoderblock/NAME', leading axis i.

  The inverse of `unstack_blocks`. Device arrays stay on device (jnp.stack), NumPy
  arrays on the host; names already stacked pass through.
  """
  out, blocks = {}, {}
  for name, value in arrays.items():
    match = _BLOCK.match(name)
    if match:
      blocks.setdefault(match[2], {})[int(match[1])] = value
    else:
      out[name] = value
  if blocks and is_scanned(arrays):
    raise ValueError("The params hold both stacked ('Transformer/encoderblock/...') and "
                     "numbered ('Transformer/encoderblock_0/...') blocks.")
  depth = 1 + max((i for layers in blocks.values() for i in layers), default=-1)
  for rest, layers in sorted(blocks.items()):
    missing = sorted(set(range(depth)) - set(layers))
    if missing:
      raise ValueError(f"Cannot stack the blocks: 'Transformer/encoderblock_{{i}}/{rest}' is "
                       f"missing for i in {missing}.")
    values = [layers[i] for i in range(depth)]
    stack = jnp.stack if any(isinstance(v, jax.Array) for v in values) else np.stack
    out[_SCANNED + rest] = stack(values)
  return out


def scan_params(params, depth=None):
  """A params tree with blocks `encoderblock_{i}` -> the layout of `scan_layers=True`.

  Each block parameter becomes one array with a leading axis of size depth, under
  `Transformer/encoderblock` (big_vision's scan=True layout); values are copied
  exactly. Params already in that layout come back unchanged. `depth`, if given,
  is checked against the number of blocks. Logical-axis boxes (from
  `model.init`) are dropped: the result holds plain arrays.
  """
  flat = stack_blocks(traverse_util.flatten_dict(flax.linen.unbox(params), sep="/"))
  depths = {value.shape[0] for name, value in flat.items() if name.startswith(_SCANNED)}
  if depth is not None and depths != {depth}:
    raise ValueError(f"depth={depth}, but the params have "
                     f"{' or '.join(map(str, sorted(depths))) or 'no'} blocks.")
  return traverse_util.unflatten_dict(flat, sep="/")


def unscan_params(params):
  """A params tree of a `scan_layers=True` model -> blocks `Transformer/encoderblock_{i}`.

  The inverse of `scan_params`, exact. Unscanned params come back unchanged.
  """
  flat = traverse_util.flatten_dict(flax.linen.unbox(params), sep="/")
  return traverse_util.unflatten_dict(unstack_blocks(flat), sep="/")
