"""DiT weights: the official checkpoints (facebookresearch/DiT) and diffusers' DiT, both ways.

    model, params = load_dit('DiT-XL-2-256x256.pt')            # official: model by shape
    model, params = load_dit('path/to/DiT-XL-2-256/transformer')  # diffusers directory
    save_diffusers(model, params, 'out/transformer')  # DiTTransformer2DModel.from_pretrained

Names (vitjax <- official <- diffusers):
    embedding                      x_embedder.proj        pos_embed.proj
    t_embedder/mlp_{0,2}           t_embedder.mlp.{0,2}   transformer_blocks.{i}.norm1.emb
    y_embedder/embedding_table     y_embedder.embedding_table   .timestep_embedder.linear_{1,2}
                                                           / .class_embedder.embedding_table
    .../adaLN_modulation/Dense_0   blocks.{i}.adaLN_modulation.1   transformer_blocks.{i}.norm1.linear
    .../MultiHeadDotProductAttention_0   blocks.{i}.attn.qkv, .proj   attn1.to_{q,k,v}, to_out.0
    .../MlpBlock_0/Dense_{0,1}     blocks.{i}.mlp.fc{1,2}  ff.net.0.proj, ff.net.2
    final_adaLN_modulation/Dense_0 final_layer.adaLN_modulation.1   proj_out_1
    final_linear                   final_layer.linear      proj_out_2

diffusers gives every block its own timestep and class embedder (its final layer uses
block 0's); DiT has one. Checkpoints converted from DiT's carry the same copy in every
block, and vitjax loads them; blocks whose embedders differ are refused. diffusers'
DiT also embeds the timestep with frequencies spaced over 127 instead of 128
(`freq_shift=1`) and normalises the MLP branch with epsilon 1e-5: a model built from
a diffusers config has both, so it computes what diffusers computes.
The fixed sin-cos position embeddings (`pos_embed` in both) are not parameters in
vitjax: a checkpoint's must equal DiT's, or it is refused.
"""

import json
import os

from flax import traverse_util
import numpy as np

from vitjax.convert import files, pytorch
from vitjax.convert.files import CheckpointError
from vitjax.convert.mismatch import CheckpointMismatchError, mismatch_message
from vitjax.models import param_shapes
from vitjax.models.dit import DIT_SIZES, DiT
from vitjax.models.mae import mae_sincos_2d

_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_0"

OFFICIAL = [
    ("x_embedder.proj", "embedding", "conv"),
    ("t_embedder.mlp.0", "t_embedder/mlp_0", "dense"),
    ("t_embedder.mlp.2", "t_embedder/mlp_2", "dense"),
    ("y_embedder.embedding_table.weight", "y_embedder/embedding_table", "param"),
    ("blocks.{i}.adaLN_modulation.1", _BLOCK + "/adaLN_modulation/Dense_0", "dense"),
    ("blocks.{i}.attn.qkv", _ATTN, "fused_qkv"),
    ("blocks.{i}.attn.proj", _ATTN + "/out", "out"),
    ("blocks.{i}.mlp.fc1", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    ("blocks.{i}.mlp.fc2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
    ("final_layer.adaLN_modulation.1", "final_adaLN_modulation/Dense_0", "dense"),
    ("final_layer.linear", "final_linear", "dense"),
]

_EMBEDDER = "transformer_blocks.{i}.norm1.emb."
DIFFUSERS = [
    ("pos_embed.proj", "embedding", "conv"),
    (_EMBEDDER + "timestep_embedder.linear_1", "t_embedder/mlp_0", "dense"),
    (_EMBEDDER + "timestep_embedder.linear_2", "t_embedder/mlp_2", "dense"),
    (_EMBEDDER + "class_embedder.embedding_table.weight", "y_embedder/embedding_table", "param"),
    ("transformer_blocks.{i}.norm1.linear", _BLOCK + "/adaLN_modulation/Dense_0", "dense"),
    ("transformer_blocks.{i}.attn1.to_q", _ATTN + "/query", "qkv"),
    ("transformer_blocks.{i}.attn1.to_k", _ATTN + "/key", "qkv"),
    ("transformer_blocks.{i}.attn1.to_v", _ATTN + "/value", "qkv"),
    ("transformer_blocks.{i}.attn1.to_out.0", _ATTN + "/out", "out"),
    ("transformer_blocks.{i}.ff.net.0.proj", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    ("transformer_blocks.{i}.ff.net.2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
    ("proj_out_1", "final_adaLN_modulation/Dense_0", "dense"),
    ("proj_out_2", "final_linear", "dense"),
]
_ANCHORS = (("official DiT", "x_embedder.proj.weight"),
            ("diffusers DiT", "pos_embed.proj.weight"))
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def model_from_diffusers_config(config):
  """The DiT a diffusers `DiTTransformer2DModel` config (dict or config.json path) describes."""
  if not isinstance(config, dict):
    with open(config, encoding="utf-8") as f:
      config = json.load(f)
  if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
    raise CheckpointError(f"A diffusers DiT with norm_type={config['norm_type']!r}: vitjax's "
                          "DiT is the adaLN-Zero one (norm_type='ada_norm_zero').")
  in_channels = config.get("in_channels", 4)
  out_channels = config.get("out_channels") or in_channels
  if out_channels not in (in_channels, 2 * in_channels):
    raise CheckpointError(f"A diffusers DiT with in_channels={in_channels}, out_channels="
                          f"{out_channels}: vitjax's DiT predicts in_channels or twice as many "
                          "(learn_sigma).")
  return DiT(image_size=config.get("sample_size", 32), in_channels=in_channels,
             patch_size=config.get("patch_size", 2),
             width=config["num_attention_heads"] * config["attention_head_dim"],
             depth=config["num_layers"], num_heads=config["num_attention_heads"],
             num_classes=config.get("num_embeds_ada_norm") or 0,
             learn_sigma=out_channels == 2 * in_channels, freq_shift=1.0,
             mlp_norm_eps=config.get("norm_eps", 1e-5))


def model_from_official(arrays):
  """The DiT an official state dict is: size from its width and depth, patch, channels,
  classes and learned sigma from its shapes (the image size from `pos_embed`)."""
  kernel = arrays["x_embedder.proj.weight"]  # (width, channels, p, p)
  width, in_channels, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
  depth = len({n.split(".")[1] for n in arrays if n.startswith("blocks.")})
  sizes = [name for name, (w, d, _) in DIT_SIZES.items() if (w, d) == (width, depth)]
  if not sizes:
    raise CheckpointError(f"An official DiT state dict of width {width} and depth {depth} is "
                          f"none of DiT's sizes ({', '.join(DIT_SIZES)}), so its number of "
                          "heads is unknown: pass model=vitjax.create_model('dit', width=..., "
                          "depth=..., num_heads=..., ...).")
  num_heads = DIT_SIZES[sizes[0]][2]
  out_channels = arrays["final_layer.linear.weight"].shape[0] // patch ** 2
  grid = int(round(arrays["pos_embed"].shape[-2] ** 0.5)) if "pos_embed" in arrays else 32 // patch
  rows = arrays["y_embedder.embedding_table.weight"].shape[0]
  return DiT(image_size=grid * patch, in_channels=in_channels, patch_size=patch, width=width,
             depth=depth, num_heads=num_heads, num_classes=rows - 1,
             learn_sigma=out_channels == 2 * in_channels)


def load_dit(path, model=None):
  """(model, params) from an official DiT .pt file or a diffusers DiT directory / file.

  Without `model`, it is built from the diffusers config.json beside the weights or
  from the official state dict's shapes. Raises CheckpointError for a file that is no
  DiT, CheckpointMismatchError (listing the differences) for one that does not fit.
  """
  arrays, source = files.read_checkpoint(path)
  layout = _layout(arrays, source)
  if model is None:
    config = os.path.join(os.path.expanduser(os.fspath(path)), "config.json")
    if layout == "diffusers DiT" and os.path.isfile(config):
      model = model_from_diffusers_config(config)
    elif layout == "diffusers DiT":
      raise CheckpointError(f"{source.describe(layout)} has no config.json beside it: pass "
                            "model= (e.g. vitjax.create_model('dit_xlarge_patch2_256', "
                            "freq_shift=1.0, mlp_norm_eps=1e-5)).")
    else:
      model = model_from_official(arrays)
  return model, _to_params(model, arrays, layout, source)


def load_dit_weights(model, path):
  """Parameters for the DiT `model` from either layout (what `load_weights` calls)."""
  arrays, source = files.read_checkpoint(path)
  return _to_params(model, arrays, _layout(arrays, source), source)


def _layout(arrays, source):
  if source.container == "workdir":
    return "vitjax"
  found = files.find_layout(arrays, _ANCHORS, what=source.describe())
  if found is None:
    raise CheckpointError(f"{source.describe()} is not a DiT checkpoint: it has neither "
                          f"{' nor '.join(anchor for _, anchor in _ANCHORS)}.")
  layout, prefix = found
  if prefix:
    raise CheckpointError(f"{source.describe(layout)} wraps its names in {prefix!r}; save the "
                          "DiT's own state dict.")
  return layout


def _to_params(model, arrays, layout, source):
  what = f"The {source.describe(None if layout == 'vitjax' else layout)}"
  if layout == "vitjax":
    flat = dict(arrays)
  else:
    arrays = dict(arrays)
    _check_posemb(arrays.pop("pos_embed", arrays.pop("pos_embed.pos_embed", None)), model, what)
    if layout == "diffusers DiT":
      arrays = _shared_embedder(arrays, what)
      table = DIFFUSERS
    else:
      table = OFFICIAL
    flat = pytorch.to_vitjax(arrays, table, model.num_heads)
  template = traverse_util.flatten_dict(param_shapes(model), sep="/")
  message = mismatch_message(flat, template, what, lambda *_: _hints(model))
  if message:
    raise CheckpointMismatchError(message)
  params = {name: np.array(flat[name], dtype=t.dtype) for name, t in template.items()}
  return traverse_util.unflatten_dict(params, sep="/")


def _hints(model):
  return [f"The model is DiT(width={model.width}, depth={model.depth}, patch_size="
          f"{model.patch_size}, in_channels={model.in_channels}, num_classes="
          f"{model.num_classes}, learn_sigma={model.learn_sigma}); load_dit(path) without "
          "model= builds the checkpoint's own."]


def _check_posemb(posemb, model, what):
  if posemb is None:
    return
  posemb = np.asarray(posemb, np.float32).reshape(-1, np.shape(posemb)[-1])
  grid = int(round(len(posemb) ** 0.5))
  expected = mae_sincos_2d(grid, grid, posemb.shape[-1])[0, 1:]
  if posemb.shape != expected.shape or not np.allclose(posemb, expected, atol=1e-5):
    raise CheckpointError(f"{what} has position embeddings that are not DiT's fixed 2-D "
                          "sin-cos ones; vitjax's DiT computes those and has no others.")
  del model


def _shared_embedder(arrays, what):
  """diffusers' per-block embedders -> block 0's under a block-free name, if all are equal."""
  prefix = _EMBEDDER.format(i=0)
  shared = {name: value for name, value in arrays.items() if name.startswith(prefix)}
  out = {}
  for name, value in arrays.items():
    parts = name.split(".", 2)
    if name.startswith("transformer_blocks.") and ".norm1.emb." in name:
      reference = shared.get(prefix + name.split(".norm1.emb.", 1)[1])
      if reference is None or not np.array_equal(np.asarray(reference), np.asarray(value)):
        raise CheckpointError(
            f"{what} gives block {parts[1]} its own timestep / class embedder "
            f"({name} differs from block 0's). DiT shares one embedder across blocks, as "
            "every checkpoint converted from DiT's does; vitjax loads only those.")
      if parts[1] != "0":
        continue
    out[name] = value
  return out


def to_diffusers(model, params):
  """{diffusers name: array} of vitjax DiT `params`: the embedders copied into every block."""
  flat = {name: np.asarray(v) for name, v in
          traverse_util.flatten_dict(params, sep="/").items()}
  # The embedders are block 0's in diffusers' names; from_vitjax numbers only {i} in both.
  table = [(name if "{i}" in path else name.format(i=0), path, kind)
           for name, path, kind in DIFFUSERS]
  state_dict, unused = pytorch.from_vitjax(flat, table)
  if unused:
    raise ValueError(f"Parameters with no place in diffusers' DiT: {', '.join(unused)}.")
  block0 = _EMBEDDER.format(i=0)
  for name in [n for n in state_dict if n.startswith(block0)]:
    for i in range(1, model.depth):
      state_dict[_EMBEDDER.format(i=i) + name[len(block0):]] = state_dict[name]
  return state_dict


def diffusers_config(model):
  """The `DiTTransformer2DModel` config of `model` (what config.json holds)."""
  return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": model.num_heads,
          "attention_head_dim": model.width // model.num_heads,
          "in_channels": model.in_channels, "out_channels": model.out_channels,
          "num_layers": model.depth, "dropout": 0.0, "norm_num_groups": 32,
          "attention_bias": True, "sample_size": model.image_size,
          "patch_size": model.patch_size, "activation_fn": "gelu-approximate",
          "num_embeds_ada_norm": model.num_classes, "upcast_attention": False,
          "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
          "norm_eps": model.mlp_norm_eps or model.layer_norm_eps}


def save_diffusers(model, params, directory):
  """Writes config.json and diffusion_pytorch_model.safetensors for diffusers'
  `DiTTransformer2DModel.from_pretrained(directory)`.

  diffusers embeds timesteps with `freq_shift=1` and its MLP norm with `norm_eps`: a
  model with other values (DiT's own: 0 and 1e-6) exports, but diffusers computes
  slightly different outputs from it, as it does from DiT's converted checkpoints.
  """
  if not model.num_classes:
    raise ValueError("diffusers' DiTTransformer2DModel is class-conditional; an "
                     "unconditional DiT (num_classes=0) has no diffusers layout.")
  os.makedirs(directory, exist_ok=True)
  state_dict = to_diffusers(model, params)
  files.write_safetensors(state_dict, os.path.join(directory, _DIFFUSERS_WEIGHTS),
                          metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(diffusers_config(model), f, indent=2)


__all__ = ["DIFFUSERS", "OFFICIAL", "diffusers_config", "load_dit", "load_dit_weights",
           "model_from_diffusers_config", "model_from_official", "save_diffusers",
           "to_diffusers"]
