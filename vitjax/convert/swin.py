"""Swin Transformer weights from timm and Hugging Face transformers checkpoints.

    model = SwinTransformer(...)   # or vitjax.create_model('swin_tiny_patch4_window7_224')
    params = load_swin_weights(model, 'swin_tiny_patch4_window7_224.safetensors')
    params = load_swin_weights(model, 'hf_swin_dir/', head='reinit')   # new classes

Layouts (told from the names inside, never from the file name):
  * timm >= 0.9: `layers.{s}.downsample` opens stage s (s >= 1), head `head.fc`.
  * timm < 0.9 (and the official Microsoft code): `layers.{s}.downsample` closes
    stage s (s < last), head `head`; the two are told apart by where
    `layers.0.downsample` is.
  * HF transformers: `swin.encoder.layers.{s}.downsample` closes stage s; blocks
    `attention.self.query/key/value` as on the hub, or `attention.q_proj/...` as
    transformers >= 5 names them in memory; head `classifier`.
Buffers (`relative_position_index`, `attn_mask`) are recomputed by the model and
ignored here. Tensors change as in vitjax.convert.pytorch (Linear weights
transposed, attention kernels split into heads, conv OIHW -> HWIO); the 2x2
channel order of patch merging is the same in timm, HF and vitjax.
"""

import math
import os
import re

from flax import traverse_util
import numpy as np

from vitjax.convert import files, mismatch, pytorch
from vitjax.convert.files import CheckpointError
from vitjax.convert.mismatch import CheckpointMismatchError
from vitjax.models import param_shapes

TIMM_ANCHOR = "patch_embed.proj.weight"
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_BUFFERS = re.compile(r"(^|\.)(relative_position_index|attn_mask)$")

# Rules as in vitjax.convert.pytorch: (torch module, vitjax module, kind). In the
# stage rules `{s}` is the stage (0-based, as in the checkpoint) and `{i}` the block;
# downsampling is renamed beforehand so that `layers.{s}.downsample` opens stage s.
_STAGE = "stage{S}"
_BLOCK = _STAGE + "/block{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_0"
_DOWNSAMPLE = [
    ("layers.{s}.downsample.norm", _STAGE + "/downsample/norm", "norm"),
    ("layers.{s}.downsample.reduction", _STAGE + "/downsample/reduction", "dense"),
]
TIMM = [
    ("patch_embed.proj", "embedding", "conv"),
    ("patch_embed.norm", "embedding_norm", "norm"),
    ("norm", "encoder_norm", "norm"),
    ("head.fc", "head", "dense"),
    ("head", "head", "dense"),
]
TIMM_STAGE = _DOWNSAMPLE + [
    ("layers.{s}.blocks.{i}.norm1", _BLOCK + "/LayerNorm_0", "norm"),
    ("layers.{s}.blocks.{i}.attn.qkv", _ATTN, "fused_qkv"),
    ("layers.{s}.blocks.{i}.attn.proj", _ATTN + "/out", "out"),
    ("layers.{s}.blocks.{i}.attn.relative_position_bias_table",
     _BLOCK + "/relative_position_bias_table", "param"),
    ("layers.{s}.blocks.{i}.norm2", _BLOCK + "/LayerNorm_1", "norm"),
    ("layers.{s}.blocks.{i}.mlp.fc1", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    ("layers.{s}.blocks.{i}.mlp.fc2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
]
# HF names without the 'swin.' and 'encoder.' prefixes; the classifier sits outside both.
HF = [
    ("embeddings.patch_embeddings.projection", "embedding", "conv"),
    ("embeddings.norm", "embedding_norm", "norm"),
    ("layernorm", "encoder_norm", "norm"),
    ("classifier", "head", "dense"),
]
_HF_BLOCK = "layers.{s}.blocks.{i}."
HF_STAGE_HUB = _DOWNSAMPLE + [  # As published on the hub (and written by save_weights).
    (_HF_BLOCK + "layernorm_before", _BLOCK + "/LayerNorm_0", "norm"),
    (_HF_BLOCK + "layernorm_after", _BLOCK + "/LayerNorm_1", "norm"),
    (_HF_BLOCK + "attention.self.query", _ATTN + "/query", "qkv"),
    (_HF_BLOCK + "attention.self.key", _ATTN + "/key", "qkv"),
    (_HF_BLOCK + "attention.self.value", _ATTN + "/value", "qkv"),
    (_HF_BLOCK + "attention.self.relative_position_bias_table",
     _BLOCK + "/relative_position_bias_table", "param"),
    (_HF_BLOCK + "attention.output.dense", _ATTN + "/out", "out"),
    (_HF_BLOCK + "intermediate.dense", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    (_HF_BLOCK + "output.dense", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
]
HF_STAGE = HF_STAGE_HUB + [  # And as transformers >= 5 names them in memory (state_dict()).
    (_HF_BLOCK + "attention.q_proj", _ATTN + "/query", "qkv"),
    (_HF_BLOCK + "attention.k_proj", _ATTN + "/key", "qkv"),
    (_HF_BLOCK + "attention.v_proj", _ATTN + "/value", "qkv"),
    (_HF_BLOCK + "attention.relative_position_bias.relative_position_bias_table",
     _BLOCK + "/relative_position_bias_table", "param"),
    (_HF_BLOCK + "attention.o_proj", _ATTN + "/out", "out"),
    (_HF_BLOCK + "mlp.fc1", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    (_HF_BLOCK + "mlp.fc2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
]


def load_swin_weights(model, path, *, head="error", rng=0):
  """Parameters for a vitjax SwinTransformer from a timm or HF transformers file.

  Args:
    model: a `vitjax.models.swin.SwinTransformer`.
    path: a .safetensors, .pth/.pt/.bin file or a Hugging Face model directory.
    head: 'error' (default) raises if the classifier does not fit the model;
      'reinit' drops the checkpoint's `head` and takes a freshly initialised one.
    rng: seed or PRNG key for the fresh head of head='reinit'.

  Returns:
    The params tree (nested dicts of NumPy arrays in the model's param_dtype).

  Raises:
    CheckpointError: not a checkpoint, or not a Swin in a layout vitjax knows.
    CheckpointMismatchError: names or shapes differ from the model's; the message
      lists what is missing, unexpected and differently shaped, with likely causes.
  """
  if head not in ("error", "reinit"):
    raise ValueError(f"head={head!r}: use 'error' or 'reinit'.")
  arrays, container = files.read_arrays(path)
  layout, params = to_vitjax(arrays, model.num_heads, what=f"{path} ({container})")
  template = traverse_util.flatten_dict(param_shapes(model), sep="/")
  params = _fit_bias_tables(params, template)
  if head == "reinit":
    params = _reinit_head(params, model, rng)
  source = files.Source(os.fspath(path), container)
  message = _mismatch_message(params, template, f"The {source.describe(layout + ' Swin')}")
  if message:
    raise CheckpointMismatchError(message)
  # np.array copies: the arrays may be read-only views of a memory-mapped file.
  params = {name: np.array(params[name], dtype=t.dtype) for name, t in template.items()}
  return traverse_util.unflatten_dict(params, sep="/")


def is_swin_params(flat):
  """Whether {vitjax name: array} parameters are a vitjax SwinTransformer's."""
  return any(re.match(r"stage\d+/block\d+/", name) for name in flat)


def from_vitjax(flat, format):  # pylint: disable=redefined-builtin
  """{vitjax name: array} of a SwinTransformer -> a timm (>= 0.9) or HF hub state dict.

  format='timm': SwinTransformer names of timm >= 0.9 (`layers.{s}.downsample`
  opens stage s, head `head.fc`). format='hf': SwinForImageClassification's hub
  names (SwinModel's without a head), which every transformers version loads.
  Raises ValueError naming any parameter with no place in the target.
  """
  blocks = {}  # vitjax stage (1-based) -> number of blocks.
  for name in flat:
    match = re.match(r"stage(\d+)/block(\d+)/", name)
    if match:
      blocks[int(match[1])] = max(blocks.get(int(match[1]), 0), int(match[2]) + 1)
  hf = format == "hf"
  classifier = hf and "head/kernel" in flat
  prefix = "swin." if classifier else ""
  global_table = HF if hf else [rule for rule in TIMM if rule[0] != "head"]
  table = [(("" if rule[0] == "classifier" else prefix) + rule[0], *rule[1:])
           for rule in global_table]
  for stage, depth in sorted(blocks.items()):
    # timm: the downsampling that opens vitjax stage S is layers.{S-1}; HF: it closes
    # layers.{S-2}, the stage before.
    for torch_name, vitjax_name, kind in (HF_STAGE_HUB if hf else TIMM_STAGE):
      downsample = ".downsample." in f".{torch_name}."
      torch_stage = stage - 1 - int(hf and downsample)
      torch_name = torch_name.replace("{s}", str(torch_stage))
      torch_name = (prefix + "encoder." if hf else "") + torch_name
      vitjax_name = vitjax_name.replace("{S}", str(stage))
      for i in [0] if downsample else range(depth):
        table.append((torch_name.replace("{i}", str(i)), vitjax_name.replace("{i}", str(i)),
                      kind))
  state_dict, left = pytorch.from_vitjax(flat, table)
  if left:
    target = "Hugging Face Swin" if hf else "timm SwinTransformer"
    raise ValueError(f"No place in a {target} for: {', '.join(left)}.")
  return state_dict


def resize_bias_table(table, window):
  """((2w-1)^2, heads) relative position bias table -> ((2*window-1)^2, heads).

  Bicubic interpolation of the table as a (2w-1) x (2w-1) image per head, as timm
  does when loading Swin weights into a model with another window (torch's
  F.interpolate(mode='bicubic', align_corners=False): Keys' cubic with a=-0.75,
  borders clamped).
  """
  side = math.isqrt(table.shape[0])
  new_side = 2 * window - 1
  weights = _bicubic_matrix(side, new_side)
  grid = np.asarray(table, np.float64).reshape(side, side, -1)
  grid = np.einsum("ij,jkh,lk->ilh", weights, grid, weights)
  return grid.reshape(new_side * new_side, -1).astype(np.asarray(table).dtype)


def _bicubic_matrix(size, new_size, a=-0.75):
  """(new_size, size) weights of torch's bicubic resampling along one axis."""
  def cubic(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
  source = (np.arange(new_size) + 0.5) * size / new_size - 0.5
  floor = np.floor(source)
  matrix = np.zeros((new_size, size))
  for tap in range(-1, 3):
    index = np.clip(floor + tap, 0, size - 1).astype(int)
    np.add.at(matrix, (np.arange(new_size), index), cubic(source - (floor + tap)))
  return matrix


def is_swin(arrays):
  """Whether a {name: array} state dict holds a Swin Transformer (timm or HF names)."""
  return (any(name.endswith((TIMM_ANCHOR, HF_ANCHOR)) for name in arrays)
          and any(name.endswith("relative_position_bias_table") for name in arrays))


def to_vitjax(arrays, num_heads, what="the checkpoint"):
  """({torch name: array}, per-stage num_heads) -> (layout, {vitjax name: array}).

  Names no rule knows are kept as they are, to be reported as unexpected.
  """
  num_heads = tuple(np.atleast_1d(num_heads).tolist())  # One number: every stage.
  layout, prefix = _detect_layout(arrays, what)
  if not is_swin(arrays):
    raise CheckpointError(f"{what} has a {layout} patch embedding but no relative position "
                          "bias tables: not a Swin Transformer. ViT/DeiT checkpoints load "
                          "with vitjax.load_weights.")
  renamed = {}
  for name, x in arrays.items():
    if _BUFFERS.search(name):
      continue
    if name.startswith(prefix):
      name = name[len(prefix):]
    if layout == "HF transformers" and name.startswith("encoder.layers."):
      name = name[len("encoder."):]
    renamed[name] = x
  downsample = re.compile(r"layers\.(\d+)\.downsample\.(.*)")
  if layout == "HF transformers" or any(downsample.fullmatch(n) and n.startswith("layers.0.")
                                        for n in renamed):
    # Downsampling at the end of stage s is the start of stage s + 1.
    renamed = {downsample.sub(lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}", name): x
               for name, x in renamed.items()}
    layout = layout if layout == "HF transformers" else "timm (< 0.9)"
  global_table, stage_table = (HF, HF_STAGE) if layout == "HF transformers" else (TIMM, TIMM_STAGE)

  by_stage = {}
  for name, x in renamed.items():
    match = re.match(r"layers\.(\d+)\.", name)
    by_stage.setdefault(int(match[1]) if match else None, {})[name] = x
  params = pytorch.to_vitjax(by_stage.pop(None, {}), global_table, num_heads=1)
  for stage, stage_arrays in sorted(by_stage.items()):
    table = [(torch_name.replace("{s}", str(stage)), vitjax_name.replace("{S}", str(stage + 1)),
              kind) for torch_name, vitjax_name, kind in stage_table]
    heads = num_heads[min(stage, len(num_heads) - 1)]
    params.update(pytorch.to_vitjax(stage_arrays, table, heads))
  return layout, params


def _detect_layout(arrays, what):
  """(layout name, wrapper prefix) from where the patch embedding sits."""
  found = files.find_layout(arrays, (("timm", TIMM_ANCHOR), ("HF transformers", HF_ANCHOR)),
                            what=what)
  if found:
    return found
  first = ", ".join(sorted(arrays)[:8]) or "no arrays"
  raise CheckpointError(
      f"{what} is not a Swin checkpoint in a layout vitjax knows. Found: {first}"
      f"{', ...' if len(arrays) > 8 else ''}. Expected timm names ('patch_embed.proj.weight', "
      "'layers.0.blocks.0.attn.qkv.weight') or HF transformers names "
      "('swin.embeddings.patch_embeddings.projection.weight').")


def _fit_bias_tables(params, template):
  """Resizes relative position bias tables made for another window to the model's."""
  params = dict(params)
  for name, value in params.items():
    want = template.get(name)
    if (name.endswith("relative_position_bias_table") and want is not None
        and np.ndim(value) == 2 and np.shape(value)[1] == want.shape[1]
        and np.shape(value)[0] != want.shape[0] and math.isqrt(want.shape[0]) ** 2 == want.shape[0]
        and math.isqrt(np.shape(value)[0]) ** 2 == np.shape(value)[0]):
      params[name] = resize_bias_table(value, (math.isqrt(want.shape[0]) + 1) // 2)
  return params


def _reinit_head(params, model, rng):
  params = {n: v for n, v in params.items() if n.split("/")[0] != "head"}
  params.update(mismatch.fresh_head(model, rng))
  return params


def _mismatch_message(params, template, what):
  return mismatch.mismatch_message(params, template, what, _hints)


def _architecture(names_shapes):
  """{stage: blocks}, {stage: (table rows, heads)} and the patch kernel, from flat shapes."""
  depths, tables = {}, {}
  for name, shape in names_shapes.items():
    match = re.match(r"stage(\d+)/block(\d+)/", name)
    if match:
      stage, block = int(match[1]), int(match[2])
      depths[stage] = max(depths.get(stage, 0), block + 1)
      if name.endswith("relative_position_bias_table") and len(shape) == 2:
        tables.setdefault(stage, tuple(shape))
  return depths, tables, names_shapes.get("embedding/kernel")


def _hints(params, template, differing):
  """Likely causes of a mismatch, in model-option terms."""
  hints = []
  have = _architecture({n: tuple(np.shape(v)) for n, v in params.items()})
  want = _architecture({n: tuple(t.shape) for n, t in template.items()})
  depths = lambda d: tuple(d[s] for s in sorted(d))
  if have[0] != want[0]:
    hints.append(f"The checkpoint has depths={depths(have[0])}, the model "
                 f"depths={depths(want[0])}.")
  window = lambda rows: (math.isqrt(rows) + 1) // 2
  for stage in sorted(set(have[1]) & set(want[1])):
    (rows, heads), (want_rows, want_heads) = have[1][stage], want[1][stage]
    if rows != want_rows:
      hints.append(f"Stage {stage}: the checkpoint's relative position tables are for "
                   f"{window(rows)}x{window(rows)} windows, the model's for "
                   f"{window(want_rows)}x{window(want_rows)} (window_size, clipped to the "
                   "stage's feature map at image_size).")
    if heads != want_heads:
      hints.append(f"Stage {stage}: the checkpoint has {heads} attention heads, the model "
                   f"{want_heads} (num_heads).")
  if have[2] and want[2] and have[2] != want[2]:
    hints.append(f"Patch embedding: the checkpoint has patch_size={have[2][0]}, "
                 f"embed_dim={have[2][-1]}; the model patch_size={want[2][0]}, "
                 f"embed_dim={want[2][-1]}.")
  if any("absolute_pos_embed" in n or "position_embeddings" in n for n in params):
    hints.append("The checkpoint has absolute position embeddings (timm's ape=True, HF's "
                 "use_absolute_embeddings), which vitjax's Swin does not have.")
  if differing and all(n.split("/")[0] == "head" for n in differing):
    hints.append("Only the classifier differs: head='reinit' loads everything else and "
                 "initialises the model's head afresh.")
  return hints
