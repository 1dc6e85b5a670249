"""NaViT weights: SigLIP 2 NaFlex (Hugging Face) and timm NaFlexVit state dicts -> vitjax.

    model = vitjax.convert.naflex.model_from_hf_config(hf_model.config)  # any Siglip2 size
    params = vitjax.load_weights(model, 'siglip2-base-patch16-naflex/model.safetensors')
    model = vitjax.create_model('naflexvit_base_patch16_gap')
    params = vitjax.load_weights(model, 'naflexvit.safetensors')

`vitjax.load_weights` comes here for a `NaViT`. Layouts, told by their names:
Hugging Face `Siglip2VisionModel` (or the image tower of a `Siglip2Model`, whose
text tower is then left out, or `Siglip2ForImageClassification`), timm
`NaFlexVit`, and vitjax's own names (a NaViT saved with `save_weights`, or a
ViT's when its position embeddings fit: a square grid becomes `learned_grid`'s).
The encoder's names are those of the SigLIP (v1) and timm ViT tables
(vitjax.convert.clip, vitjax.convert.pytorch); only the stem differs: a Linear
over flattened (p, p, C) patches, which is the ViT conv kernel reshaped.
"""

import math

from flax import traverse_util
import jax
import numpy as np

from vitjax.convert import big_vision, clip, files, mismatch, pytorch
from vitjax.convert.files import CheckpointError
from vitjax.models import param_shapes
from vitjax.models.navit import NaViT

SIGLIP2_ANCHOR = "embeddings.patch_embedding.weight"
TIMM_ANCHOR = "embeds.proj.weight"
HEAD_NAMES = ("head",)

# HF Siglip2's vision tower: SigLIP's encoder, post-norm and MAP head (clip.VISION), its own
# stem (below); Siglip2ForImageClassification's classifier outside the tower.
SIGLIP2 = [entry for entry in clip.VISION if entry[0].startswith(
    ("encoder.", "post_layernorm", "head."))]
SIGLIP2_OUTSIDE = [("classifier", "head", "dense")]
# timm NaFlexVit: timm's ViT block, norm, attention-pool and head names; its own stem.
TIMM = [entry for entry in pytorch.TIMM if entry[0].startswith(
    ("blocks.", "norm", "attn_pool.", "head"))] + [
        ("fc_norm", "fc_norm", "norm"),
        ("embeds.reg_token", "reg", "param"),
        ("embeds.pos_embed_y", "pos_embedding_row", "param"),
        ("embeds.pos_embed_x", "pos_embedding_col", "param"),
    ]


def layout(arrays):
  """('Hugging Face Siglip2' | 'timm NaFlexVit' | 'vitjax', wrapper prefix) of a state dict."""
  found = files.find_layout(
      arrays, (("Hugging Face Siglip2", SIGLIP2_ANCHOR), ("timm NaFlexVit", TIMM_ANCHOR),
               ("vitjax", big_vision.ANCHOR)),
      what="The checkpoint", preferred=("", "params/", "vision_model.", "model."))
  if found:
    return found
  first = ", ".join(sorted(arrays)[:8]) or "no arrays"
  raise CheckpointError(
      f"Not a NaViT checkpoint vitjax knows ({len(arrays)} arrays: {first}"
      f"{', ...' if len(arrays) > 8 else ''}). NaViT reads Hugging Face Siglip2 vision towers "
      f"('{SIGLIP2_ANCHOR}'), timm NaFlexVit ('{TIMM_ANCHOR}') and vitjax names "
      f"('{big_vision.ANCHOR}').")


def _patch_kernel(weight, model):
  """(p, p, C, width) kernel of a Linear (width, p*p*C) over (p, p, C) patches, or of a conv."""
  weight = np.asarray(weight)
  if weight.ndim == 4:
    return np.transpose(weight, (2, 3, 1, 0))
  channels = model.in_channels
  side = math.isqrt(weight.shape[1] // channels)
  if side * side * channels != weight.shape[1]:
    return weight.T  # Reported against the model's shape.
  return weight.T.reshape(side, side, channels, weight.shape[0])


def _grid(posemb):
  """(G*G, width) [HF] or (1, G, G, width) [timm] -> (G, G, width); else as it is."""
  posemb = np.asarray(posemb)
  if posemb.ndim == 4 and posemb.shape[0] == 1:
    return posemb[0]
  if posemb.ndim == 2 and math.isqrt(posemb.shape[0]) ** 2 == posemb.shape[0]:
    side = math.isqrt(posemb.shape[0])
    return posemb.reshape(side, side, posemb.shape[1])
  return posemb


def to_vitjax(arrays, model):
  """{HF Siglip2 / timm NaFlexVit / vitjax name: array} -> (layout, {vitjax name: array})."""
  kind, prefix = layout(arrays)
  inside = {n[len(prefix):]: v for n, v in arrays.items() if n.startswith(prefix)}
  # torch.nn.MultiheadAttention's fused projection (HF's MAP head), as clip.VISION names it.
  inside = {n.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias",
                                                                  "in_proj.bias"): v
            for n, v in inside.items()}
  if kind == "vitjax":
    params = big_vision.to_vitjax(inside)
    posemb = params.get("pos_embedding")
    if posemb is not None and np.ndim(posemb) == 3 and np.shape(posemb)[0] == 1:
      params["pos_embedding"] = _grid(np.asarray(posemb)[0])  # A ViT's (1, G*G, width).
    return kind, params
  if kind == "Hugging Face Siglip2":
    # A Siglip2Model's text tower and logit scale / bias are not the image model's.
    outside = {n: v for n, v in arrays.items() if not n.startswith(prefix)
               and not n.startswith("text_model.") and n not in ("logit_scale", "logit_bias")}
    stem = {"embeddings.patch_embedding.weight": ("embedding/kernel", _patch_kernel),
            "embeddings.patch_embedding.bias": ("embedding/bias", lambda x, m: np.asarray(x)),
            "embeddings.position_embedding.weight": ("pos_embedding", lambda x, m: _grid(x))}
    table, extra = SIGLIP2, pytorch.to_vitjax(outside, SIGLIP2_OUTSIDE, model.num_heads)
  else:
    stem = {"embeds.proj.weight": ("embedding/kernel", _patch_kernel),
            "embeds.proj.bias": ("embedding/bias", lambda x, m: np.asarray(x)),
            "embeds.pos_embed": ("pos_embedding", lambda x, m: _grid(x))}
    table, extra = TIMM, {}
  params = {stem[n][0]: stem[n][1](v, model) for n, v in inside.items() if n in stem}
  rest = {n: v for n, v in inside.items() if n not in stem}
  params.update(pytorch.to_vitjax(rest, table, model.num_heads))
  params.update(extra)
  for name in ("pos_embedding_row", "pos_embedding_col"):  # timm's (1, G, width).
    if name in params and np.ndim(params[name]) == 3 and np.shape(params[name])[0] == 1:
      params[name] = np.asarray(params[name])[0]
  return kind, params


def load_naflex_weights(model, path, *, head="error", rng=0):
  """Parameters of a NaViT `model` from a checkpoint file (see the module docstring).

  `head='reinit'` drops the checkpoint's classifier (`head`) for a freshly
  initialised one. Raises CheckpointMismatchError listing every difference.
  """
  arrays, source = files.read_checkpoint(path)
  kind, params = to_vitjax(arrays, model)
  template = traverse_util.flatten_dict(param_shapes(model), sep="/")
  scanned = big_vision.is_scanned(template)
  if scanned:
    template = big_vision.unstack_blocks(
        template, take=lambda t, i: jax.ShapeDtypeStruct(t.shape[1:], t.dtype))
  if big_vision.is_scanned(params):
    params = big_vision.unstack_blocks(params)
  if head == "reinit":
    params = {n: v for n, v in params.items() if n.split("/")[0] not in HEAD_NAMES}
    params.update({n: v for n, v in mismatch.fresh_head(model, rng, HEAD_NAMES).items() if n in template})
  message = mismatch.mismatch_message(params, template, f"The {source.describe(kind)}", _hints)
  if message:
    raise mismatch.CheckpointMismatchError(message)
  params = {name: np.array(params[name], dtype=t.dtype) for name, t in template.items()}
  if scanned:
    params = big_vision.stack_blocks(params)
  return traverse_util.unflatten_dict(params, sep="/")


def _hints(params, template, differing):
  hints = []
  if any(n.startswith("MAPHead_0") for n in differing):
    hints.append("Pooling differs: a MAP head needs pool_type='map', its absence 'gap'.")
  if any(n.startswith(("pos_embedding", "reg")) for n in differing):
    hints.append("Position embeddings or registers differ: check posemb ('learned_grid' for "
                 "SigLIP 2 and timm's 'learned', 'factorized_grid' for timm's 'factorized'), "
                 "max_grid (the grid's side) and num_registers.")
  if any(n.startswith(("fc_norm", "Transformer/encoder_norm")) for n in differing):
    hints.append("The final norm differs: timm's 'avg' pooling normalises after pooling "
                 "(fc_norm=True).")
  if any("LayerScale" in n for n in differing):
    hints.append("LayerScale differs: set layer_scale_init (timm NaFlexVit: 1e-5) or None.")
  if "head/kernel" in differing:
    hints.append("The classifier differs: set num_classes, or load with head='reinit'.")
  return hints


def model_from_hf_config(config, **overrides):
  """The NaViT of a transformers Siglip2VisionConfig (or a Siglip2Config's vision tower).

  The image tower alone: `logits` are the pooled features (HF's pooler_output).
  """
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  config = dict(config.get("vision_config") or config)
  if not config.get("vision_use_head", True):
    raise ValueError("Siglip2 vision towers without the attention-pooling head "
                     "(vision_use_head=False) are not supported.")
  act = config.get("hidden_act", "gelu_pytorch_tanh")
  if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
    raise ValueError(f"hidden_act={act!r} has no vitjax counterpart.")
  side = math.isqrt(config["num_patches"])
  if side * side != config["num_patches"]:
    raise ValueError(f"num_patches={config['num_patches']} is not a square grid.")
  options = dict(num_classes=0, patch_size=config["patch_size"], width=config["hidden_size"],
                 depth=config["num_hidden_layers"], mlp_dim=config["intermediate_size"],
                 num_heads=config["num_attention_heads"],
                 in_channels=config.get("num_channels", 3), pool_type="map",
                 posemb="learned_grid", max_grid=side, posemb_resize="bilinear",
                 gelu_approximate=act != "gelu", layer_norm_eps=config.get("layer_norm_eps", 1e-6),
                 head_zeroinit=False)
  return NaViT(**{**options, **overrides})
