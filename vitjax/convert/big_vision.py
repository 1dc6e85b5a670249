"""big_vision and vision_transformer (AugReg) .npz checkpoints.

vitjax's parameter names are big_vision's, so the modern layout needs no renaming.
The original vision_transformer / AugReg layout differs in a few names, and
big_vision's `scan=True` models stack the blocks along a leading axis. Position
embeddings without the class token's entry are handled by the loader.
"""

import re

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
  if any(name.startswith(_SCANNED) for name in arrays):
    arrays = _unstack_blocks(arrays)
  return arrays


def _unstack_blocks(arrays):
  # scan=True: one 'encoderblock' whose every parameter has a leading depth axis.
  out = {}
  for name, value in arrays.items():
    if name.startswith(_SCANNED):
      rest = name[len(_SCANNED):]
      for i, layer in enumerate(np.asarray(value)):
        out[f"Transformer/encoderblock_{i}/{rest}"] = layer
    else:
      out[name] = value
  return out
