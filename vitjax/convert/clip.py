"""Two-tower weights: HF transformers CLIPModel / SiglipModel state dicts, vitjax files, per tower.

    model = vitjax.create_model('clip_vit_base_patch16')
    params = vitjax.load_weights(model, 'clip-vit-base-patch16/model.safetensors')
    model = vitjax.convert.clip.model_from_hf_config(hf_model.config)   # any size
    params = vitjax.load_weights(model, {'img': 'vit.npz'})   # LiT: one tower from a file,
                                                              # the rest freshly initialised

Where HF CLIP has no bias (the patch embedding, both projections) vitjax's layers
have one: it is loaded as zeros, which computes the same thing.
"""

from collections.abc import Mapping
import functools

import flax.linen
from flax import traverse_util
import jax
import numpy as np

from vitjax import models
from vitjax.convert import files, mismatch, pytorch
from vitjax.convert.files import CheckpointError
from vitjax.models import two_towers
from vitjax.models.text import TextTransformer

_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_0"
_MAP = "MAPHead_0"
# One transformer encoder (HF CLIP and SigLIP name theirs alike), torch -> vitjax.
_ENCODER = [
    ("encoder.layers.{i}.layer_norm1", _BLOCK + "/LayerNorm_0", "norm"),
    ("encoder.layers.{i}.self_attn.q_proj", _ATTN + "/query", "qkv"),
    ("encoder.layers.{i}.self_attn.k_proj", _ATTN + "/key", "qkv"),
    ("encoder.layers.{i}.self_attn.v_proj", _ATTN + "/value", "qkv"),
    ("encoder.layers.{i}.self_attn.out_proj", _ATTN + "/out", "out"),
    ("encoder.layers.{i}.layer_norm2", _BLOCK + "/LayerNorm_1", "norm"),
    ("encoder.layers.{i}.mlp.fc1", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    ("encoder.layers.{i}.mlp.fc2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
]
VISION = _ENCODER + [  # Under 'vision_model.'; vitjax names under 'img/'.
    ("embeddings.patch_embedding", "embedding", "conv"),
    ("embeddings.class_embedding", "cls", "param"),
    ("embeddings.position_embedding.weight", "pos_embedding", "param"),
    ("pre_layrnorm", "embedding_norm", "norm"),  # CLIP's ln_pre (sic).
    ("post_layernorm", "Transformer/encoder_norm", "norm"),
    # SigLIP's attention-pooling head is big_vision's MAP head.
    ("head.probe", _MAP + "/probe", "param"),
    ("head.attention.in_proj", _MAP + "/MultiHeadDotProductAttention_0", "fused_qkv"),
    ("head.attention.out_proj", _MAP + "/MultiHeadDotProductAttention_0/out", "out"),
    ("head.layernorm", _MAP + "/LayerNorm_0", "norm"),
    ("head.mlp.fc1", _MAP + "/MlpBlock_0/Dense_0", "dense"),
    ("head.mlp.fc2", _MAP + "/MlpBlock_0/Dense_1", "dense"),
]
TEXT = _ENCODER + [  # Under 'text_model.'; vitjax names under 'txt/'.
    ("embeddings.token_embedding.weight", "Embed_0/embedding", "param"),
    ("embeddings.position_embedding.weight", "pos_embedding", "param"),
    ("final_layer_norm", "Transformer/encoder_norm", "norm"),
    ("head", "head", "dense"),  # SigLIP's text head (with a bias).
]
TOP = {"visual_projection": "img/head", "text_projection": "txt/head"}  # CLIP, no bias.
_RESHAPE = {"img/cls": lambda x: x.reshape(1, 1, -1),
            "img/pos_embedding": lambda x: x[None], "txt/pos_embedding": lambda x: x[None],
            "t": lambda x: x.reshape(1), "b": lambda x: x.reshape(1)}


def is_hf_two_towers(arrays):
  return any(n.endswith("text_model.embeddings.token_embedding.weight") for n in arrays) and \
      any(n.startswith("vision_model.") or ".vision_model." in n for n in arrays)


def image_tower(model):
  """The image tower of a TwoTowers `model`, as a standalone module (for load_weights)."""
  options = dict(model.image)
  options["num_classes"] = model.embed_dim if model.image_projection else 0
  options.setdefault("head_zeroinit", False)
  return models.create_model(model.image_model, **options)


def hf_to_vitjax(arrays, image_heads, text_heads):
  """{HF CLIPModel / SiglipModel name: array} -> {vitjax two-tower name: array}."""
  out = {}
  groups = {"vision_model.": ("img/", VISION, image_heads),
            "text_model.": ("txt/", TEXT, text_heads)}
  for torch_prefix, (prefix, table, heads) in groups.items():
    tower = {}
    for name, x in arrays.items():
      if name.startswith(torch_prefix):
        name = name[len(torch_prefix):]
        # torch.nn.MultiheadAttention's fused projection: in_proj_weight -> in_proj.weight.
        name = name.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias",
                                                                        "in_proj.bias")
        tower[name] = x
    out.update({prefix + n: v for n, v in pytorch.to_vitjax(tower, table, heads).items()})
  for name, x in arrays.items():
    module, _, leaf = name.rpartition(".")
    if module in TOP:  # Plain Linear layers outside the towers.
      out[f"{TOP[module]}/kernel" if leaf == "weight" else f"{TOP[module]}/bias"] = (
          np.asarray(x).T if leaf == "weight" else np.asarray(x))
    elif name == "logit_scale":
      out["t"] = np.asarray(x)
    elif name == "logit_bias":
      out["b"] = np.asarray(x)
    elif not name.startswith(tuple(groups)):
      out[name] = x  # Reported as unexpected.
  return {n: _RESHAPE[n](np.asarray(v)) if n in _RESHAPE else v for n, v in out.items()}


def load_two_towers(model, path, *, head="error", rng=0, load_weights):
  """Parameters of a TwoTowers `model` from a file, or from one file per tower.

  `path` is an HF CLIPModel / SiglipModel state dict (.safetensors, .bin, or a
  model directory), a vitjax two-tower .npz ('img/...', 'txt/...', 't', 'b') or
  training workdir, or a dict {'img': path, 'txt': path} of towers to load, the
  others initialised from `rng`: the image tower from any image checkpoint
  `vitjax.load_weights` reads (with `head`, e.g. 'reinit' to drop a classifier),
  the text tower from a vitjax two-tower file. Any other checkpoint is taken as
  the image tower's (LiT from a supervised ViT: `path='vit.npz'`).

  `load_weights` is `vitjax.load_weights`, which calls this function and hands
  itself in to read the image tower (this module sits below it).
  """
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(rng)
  template = traverse_util.flatten_dict(models.param_shapes(model), sep="/")
  towers = functools.partial(_load_towers, model, head=head, rng=rng, template=template,
                             load_weights=load_weights)
  if isinstance(path, Mapping) or hasattr(path, "to_dict"):
    return towers(dict(path.to_dict() if hasattr(path, "to_dict") else path))
  arrays, source = files.read_checkpoint(path)
  if is_hf_two_towers(arrays):
    prefix = _wrapper_prefix(arrays, "text_model.embeddings.token_embedding.weight")
    arrays = {n[len(prefix):]: v for n, v in arrays.items() if n.startswith(prefix)}
    params = hf_to_vitjax(arrays, image_tower(model).num_heads, model.text.get(
        "num_heads", TextTransformer.num_heads))
    what = f"The {source.describe('Hugging Face CLIP/SigLIP')}"
  elif any(n.startswith(("img/", "params/img/")) for n in arrays):
    prefix = "params/" if any(n.startswith("params/img/") for n in arrays) else ""
    params = {n[len(prefix):]: v for n, v in arrays.items() if n.startswith(prefix)}
    what = f"The {source.describe('vitjax two-tower')}"
  else:  # An image model's checkpoint (LiT): the image tower from it, the rest fresh.
    return towers({"img": path})
  # HF CLIP's bias-free layers are vitjax layers with a zero bias.
  for name, shape in template.items():
    if name.endswith("/bias") and name not in params and name[:-5] + "/kernel" in params:
      params[name] = np.zeros(shape.shape, shape.dtype)
  return _checked(params, template, what)


def _wrapper_prefix(arrays, anchor):
  prefixes = {n[:-len(anchor)] for n in arrays if n.endswith(anchor)}
  if len(prefixes) != 1:
    raise CheckpointError(f"Found {len(prefixes)} text towers (prefixes {sorted(prefixes)}); "
                          "vitjax loads one two-tower model at a time.")
  return prefixes.pop()


def _load_towers(model, paths, *, head, rng, template, load_weights):
  unknown = set(paths) - {"img", "txt"}
  if unknown:
    raise ValueError(f"Per-tower weights take the keys 'img' and 'txt'; got {sorted(unknown)}.")
  fresh = jax.jit(lambda rng: flax.linen.unbox(model.init(rng, None)["params"]))(rng)
  params = traverse_util.flatten_dict(jax.device_get(fresh), sep="/")
  if paths.get("img"):
    tower = load_weights(image_tower(model), paths["img"], head=head, rng=rng)
    params.update({f"img/{n}": v for n, v in
                   traverse_util.flatten_dict(tower, sep="/").items()})
  if paths.get("txt"):
    arrays, _ = files.read_checkpoint(paths["txt"])
    prefix = "params/txt/" if any(n.startswith("params/txt/") for n in arrays) else "txt/"
    if not any(n.startswith(prefix) for n in arrays):
      raise CheckpointError(f"{paths['txt']} holds no text tower ('txt/...' names).")
    params = {n: v for n, v in params.items() if not n.startswith("txt/")}
    params.update({"txt/" + n[len(prefix):]: v for n, v in arrays.items()
                   if n.startswith(prefix)})
  return _checked(params, template, "The per-tower checkpoints " + ", ".join(
      f"{k}={v}" for k, v in paths.items()))


def _checked(params, template, what):
  message = mismatch.mismatch_message(params, template, what, _hints)
  if message:
    raise mismatch.CheckpointMismatchError(message)
  params = {n: np.array(params[n], dtype=t.dtype) for n, t in template.items()}
  return traverse_util.unflatten_dict(params, sep="/")


def _hints(params, template, differing):
  hints = []
  if "b" in params and "b" not in template:
    hints.append("The checkpoint has a logit bias (SigLIP) and the model none (CLIP): build "
                 "the model with bias_init set, or model_from_hf_config(config).")
  if any(n.startswith("img/MAPHead_0") for n in differing):
    hints.append("Image pooling differs: SigLIP pools with a MAP head (pool_type='map'), "
                 "CLIP with the class token (pool_type='token').")
  if any(n.startswith("img/pos_embedding") or n.startswith("txt/pos_embedding")
         for n in differing):
    hints.append("Position embeddings differ: check image_size / patch_size and the text "
                 "tower's max_length (HF max_position_embeddings).")
  if differing:
    hints.append("vitjax.convert.clip.model_from_hf_config(hf_config) builds the vitjax model "
                 "that fits an HF CLIP/SigLIP config.")
  return hints


def model_from_hf_config(config):
  """The vitjax TwoTowers matching a transformers CLIPConfig or SiglipConfig (object or dict)."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  vision, text = dict(config["vision_config"]), dict(config["text_config"])
  kind = config.get("model_type")
  if kind not in ("clip", "siglip"):
    raise ValueError(f"model_type {kind!r}: model_from_hf_config reads 'clip' and 'siglip'.")

  def tower(c):
    act = c.get("hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new"):
      raise ValueError(f"hidden_act={act!r} has no vitjax counterpart.")
    return dict(width=c["hidden_size"], depth=c["num_hidden_layers"],
                mlp_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
                layer_norm_eps=c.get("layer_norm_eps", 1e-5),
                activation="quick_gelu" if act == "quick_gelu" else "gelu",
                gelu_approximate=act in ("gelu_pytorch_tanh", "gelu_new"))

  image = dict(tower(vision), image_size=vision["image_size"], patch_size=vision["patch_size"],
               in_channels=vision.get("num_channels", 3))
  text_options = dict(tower(text), vocab_size=text["vocab_size"],
                      max_length=text["max_position_embeddings"])
  if kind == "clip":
    eos = text.get("eos_token_id")
    # transformers keeps CLIP's old rule for configs with eos_token_id == 2: the largest id.
    text_options.update(eos_token_id=None if eos == 2 else eos)
    options = two_towers.clip_options(image, text_options, config.get("projection_dim", 512))
  else:
    if not vision.get("vision_use_head", True):
      raise ValueError("SigLIP vision towers without the attention-pooling head "
                       "(vision_use_head=False) are not supported.")
    embed_dim = text.get("projection_size") or text["hidden_size"]
    options = two_towers.siglip_options(image, text_options, embed_dim)
  return two_towers.TwoTowers(**options)
