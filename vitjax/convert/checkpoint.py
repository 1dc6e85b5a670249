"""load_weights / save_weights: any supported checkpoint in, vitjax parameters out.

Loading is: read the file's arrays -> tell the layout from the names inside ->
rename to vitjax names -> fit the position embeddings to the model's grid ->
compare with the model's parameter shapes (jax.eval_shape, nothing computed).
Blocks are matched one by one ('Transformer/encoderblock_{i}/...') and stacked
at the end for a `scan_layers=True` model, so a checkpoint of either block
layout loads into a model of either.
"""

import math

import flax.linen
from flax import traverse_util
import jax
import numpy as np

from vitjax.convert import (big_vision, clip, dit, files, flexi, mae, mismatch, mixer,
                            naflex, pytorch, swin)
from vitjax.convert.files import CheckpointError
from vitjax.convert.mismatch import CheckpointMismatchError
from vitjax.models import param_shapes
from vitjax.models.dit import DiT
from vitjax.models.navit import NaViT
from vitjax.models.swin import SwinTransformer
from vitjax.models.two_towers import TwoTowers
from vitjax.models.posemb import resize_posemb

HEAD_NAMES = ("head", "head_dist", "pre_logits")
_LAYOUTS = (  # Name, and a parameter every ViT of that layout has.
    ("big_vision", big_vision.ANCHOR),
    ("timm", pytorch.TIMM_ANCHOR),
    ("Hugging Face transformers", pytorch.HF_ANCHOR),
)


# What load_weights does with a checkpoint's classifier head (`head=`).
HEAD_OPTIONS = ("error", "reinit")
# Top-level parameters that only self-supervised pre-training uses, never a fine-tuned
# ViT: I-JEPA's predictor (vitjax.models.jepa), DINO's and iBOT's projection heads and
# the mask token of masked-patch students (vitjax.models.dino). A model that has none of
# one of these names loads a checkpoint without it: the encoder, for fine-tuning.
PRETRAINING_ONLY = ("predictor", "dino_head", "ibot_head", "mask_token")


def load_weights(model, path, *, head="error", rng=0):
  """Parameters for `model` from a big_vision/AugReg .npz, timm or HF transformers file.

  Args:
    model: a vitjax ViT (e.g. from `vitjax.create_model`), or a MAE / SimMIM
      (Hugging Face ViTMAE state dicts: vitjax.convert.mae). A ViT given a MAE or
      SimMIM checkpoint takes its encoder: fine-tuning after pre-training. So it
      does from an I-JEPA or DINO checkpoint: of the pre-training-only parameters
      (`PRETRAINING_ONLY`: 'predictor', 'dino_head', 'ibot_head', 'mask_token'),
      those the model has none of are dropped (a ViT loading an I-JEPA needs the
      I-JEPA's pool_type='gap' and posemb).
    path: an .npz, .safetensors, .pth/.pt/.bin file, a Hugging Face model
      directory, or a vitjax training workdir (its latest readable checkpoint;
      newer unreadable ones are skipped with a warning). The format is told
      from the names inside, not the file name.
    head: 'error' (default) raises if the classifier does not fit the model;
      'reinit' drops the checkpoint's `head`/`head_dist` (and a `pre_logits` that
      does not fit) and takes freshly initialised ones: fine-tuning on new classes.
      'reinit' also initialises afresh the model's pre-training-only parts the
      checkpoint has none of, as an I-JEPA's predictor from Hugging Face's
      `IJepaModel` (the encoder alone); 'error' reports them as missing.
    rng: seed or PRNG key for the fresh head (and parts) of head='reinit'.

  Returns:
    The params tree (nested dicts of NumPy arrays in the model's param_dtype),
    ready for `model.apply({'params': params}, images)` or `jax.device_put`.
    Position embeddings made for another resolution are resized to the model's,
    and a patch embedding made for another patch size is PI-resized to the
    model's (FlexiViT; vitjax.convert.flexi, e.g. big_vision's FlexiViT .npz).
    The blocks are laid out as the model has them: stacked under
    'Transformer/encoderblock' for `scan_layers=True`, else one per block.

  Raises:
    FileNotFoundError: no file at `path`.
    CheckpointError: not a checkpoint, damaged, or a layout vitjax does not know.
    CheckpointMismatchError: the names or shapes differ from the model's; the
      message lists what is missing, unexpected and differently shaped.
  """
  if head not in HEAD_OPTIONS:
    raise ValueError(f"head={head!r}: use 'error' or 'reinit'.")
  if isinstance(model, SwinTransformer):  # Its own names and stages: vitjax.convert.swin.
    return swin.load_swin_weights(model, path, head=head, rng=rng)
  if isinstance(model, DiT):  # DiT's own .pt files and diffusers' DiT: vitjax.convert.dit.
    return dit.load_dit_weights(model, path)
  if isinstance(model, NaViT):  # SigLIP 2 NaFlex, timm NaFlexVit: vitjax.convert.naflex.
    return naflex.load_naflex_weights(model, path, head=head, rng=rng)
  if isinstance(model, TwoTowers):  # CLIP / SigLIP / LiT, or one tower: vitjax.convert.clip.
    # Its image tower may come from any file load_weights reads: clip is handed this function.
    return clip.load_two_towers(model, path, head=head, rng=rng, load_weights=load_weights)
  arrays, source = files.read_checkpoint(path)
  if mae.is_masked_model(model):  # MAE / SimMIM: vitjax.convert.mae.
    return mae.load_masked_weights(model, arrays, source, head=head, rng=rng)
  arrays = mae.encoder_arrays(arrays)  # A pre-trained MAE / SimMIM's encoder, for fine-tuning.
  layout, params = _to_vitjax_names(arrays, model, source)
  template = traverse_util.flatten_dict(param_shapes(model), sep="/")
  scanned = big_vision.is_scanned(template)
  if scanned:  # Compared block by block, as the checkpoint was unstacked.
    template = big_vision.unstack_blocks(
        template, take=lambda t, i: jax.ShapeDtypeStruct(t.shape[1:], t.dtype))
  params = _drop_pretraining_only(params, template)
  params = _fit_posemb(params, model, template)
  params = flexi.fit_patch_embedding(params, model, template)  # FlexiViT: another patch size.
  if head == "reinit":
    params = _reinit_head(params, model, template, rng)
    params = _fresh_pretraining_only(params, model, template, rng)
  message = _mismatch_message(params, template, f"The {source.describe(layout)}")
  if message:
    if scanned:
      message += ("\nThe model has scan_layers=True: its stacked 'Transformer/encoderblock/...' "
                  "parameters are listed here block by block, as 'encoderblock_{i}'.")
    raise CheckpointMismatchError(message)
  # np.array copies: the arrays may be read-only views of a memory-mapped file.
  params = {name: np.array(params[name], dtype=t.dtype) for name, t in template.items()}
  if scanned:
    params = big_vision.stack_blocks(params)
  return traverse_util.unflatten_dict(params, sep="/")


def save_weights(params, path, *, format="big_vision"):  # pylint: disable=redefined-builtin
  """Writes `params` to `path`, atomically.

  format='big_vision' (default): an .npz with '/'-joined names, which
  `load_weights` (and big_vision) read back exactly, in the params' own block
  layout (stacked 'Transformer/encoderblock/...' from a `scan_layers=True` model,
  as big_vision's scan=True writes). format='timm' or 'hf': a .safetensors state
  dict for timm or Hugging Face transformers (hub names, so every transformers
  version reads it; see `hf_config` for the config), one entry per block. Swin
  parameters go to timm's SwinTransformer or HF's SwinForImageClassification,
  MLP-Mixer ones to timm's MlpMixer (format='timm'); two-tower and MAE / SimMIM
  parameters save as format='big_vision' only.
  """
  if format not in ("big_vision", "timm", "hf"):
    raise ValueError(f"format={format!r}: use 'big_vision', 'timm' or 'hf'.")
  params = params.get("params", params) if set(params) == {"params"} else params
  params = flax.linen.unbox(params)  # Straight from model.init: drop the axis-name boxes.
  flat = {name: np.asarray(v) for name, v in
          traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}
  suffix = str(path).rsplit(".", 1)[-1].lower()
  if format == "big_vision":
    if suffix == "safetensors":
      raise ValueError(f"{path}: format='big_vision' writes an .npz; for .safetensors pass "
                       "format='timm' or format='hf'.")
    files.write_npz(flat, path)
    return
  if suffix in ("npz", "pth", "pt", "bin"):
    raise ValueError(f"{path}: format={format!r} writes .safetensors, not .{suffix}.")
  if swin.is_swin_params(flat):  # timm's SwinTransformer / HF's SwinForImageClassification.
    files.write_safetensors(swin.from_vitjax(flat, format), path, metadata={"format": "pt"})
    return
  _check_family_exports(flat, format)
  if mixer.is_mixer_params(flat):
    files.write_safetensors(mixer.from_vitjax(flat), path, metadata={"format": "pt"})
    return
  flat = big_vision.unstack_blocks(flat)  # PyTorch models number their blocks.
  state_dict = _to_timm(flat) if format == "timm" else _to_hf(flat)
  files.write_safetensors(state_dict, path, metadata={"format": "pt"})


def hf_config(model):
  """Arguments for `transformers.AutoConfig.for_model(**hf_config(model))`.

  The config of the Hugging Face model that `save_weights(..., format='hf')` fits:
  ViTForImageClassification, DeiTForImageClassificationWithTeacher, or ViTModel
  (with a pooler when the model has a representation layer).
  """
  if model.pool_type != "token" or model.posemb != "learn":
    raise ValueError("Hugging Face ViT/DeiT need pool_type='token' and posemb='learn'.")
  if model.num_classes and model.representation_size:
    raise ValueError("Hugging Face's ViTForImageClassification has no pre-logits layer.")
  if not model.num_classes:
    architecture = "DeiTModel" if model.distilled else "ViTModel"
  else:
    architecture = ("DeiTForImageClassificationWithTeacher" if model.distilled
                    else "ViTForImageClassification")
  config = dict(
      model_type="deit" if model.distilled else "vit", architectures=[architecture],
      hidden_size=model.width, num_hidden_layers=model.depth,
      num_attention_heads=model.num_heads, intermediate_size=model.mlp_dim,
      hidden_act="gelu_pytorch_tanh" if model.gelu_approximate else "gelu",
      layer_norm_eps=model.layer_norm_eps, image_size=model.image_size,
      patch_size=model.patch_size, num_channels=model.in_channels, qkv_bias=True)
  if model.num_classes:
    config["num_labels"] = model.num_classes
  if model.representation_size:
    config.update(pooler_output_size=model.representation_size, pooler_act="tanh")
  return config


# --- Loading -------------------------------------------------------------------------------

def _detect_layout(arrays, source):
  """(layout name, wrapper prefix), from where a known parameter name sits."""
  # Training checkpoints also hold optimizer moments named like the parameters.
  found = files.find_layout(arrays, _LAYOUTS, what=f"The {source.describe()}",
                            preferred=("", "params/", "opt/target/"))
  if found:
    return found
  first = ", ".join(sorted(arrays)[:8]) or "no arrays"
  raise CheckpointError(
      f"The {source.describe()} ({len(arrays)} arrays) is not a ViT checkpoint in a layout "
      f"vitjax knows. Found: {first}{', ...' if len(arrays) > 8 else ''}. vitjax reads "
      "big_vision / AugReg .npz ('embedding/kernel', 'Transformer/encoderblock_0/...'), timm "
      "state dicts ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight') and Hugging Face "
      "transformers ViT/DeiT ('vit.embeddings.patch_embeddings.projection.weight'), in .npz, "
      ".safetensors or PyTorch files.")


def _to_vitjax_names(arrays, model, source):
  if swin.is_swin(arrays):
    raise CheckpointError(f"The {source.describe()} holds a Swin Transformer; load it into a "
                          "Swin model, e.g. vitjax.create_model('swin_tiny_patch4_window7_224').")
  if mixer.is_mixer(arrays):
    return f"{mixer.layout(arrays)} MLP-Mixer", mixer.to_vitjax(arrays)
  layout, prefix = _detect_layout(arrays, source)
  if layout == "big_vision":
    # A wrapper ('params/', 'opt/target/', 'img/' of a two-tower model): only what is inside.
    arrays = {name[len(prefix):]: v for name, v in arrays.items() if name.startswith(prefix)}
    return layout, big_vision.to_vitjax(arrays)
  # 'vit.' / 'deit.' / DDP's 'module.': HF classification heads sit outside the prefix.
  arrays = {name[len(prefix):] if name.startswith(prefix) else name: v
            for name, v in arrays.items()}
  unused = pytorch.TIMM_UNUSED if layout == "timm" else pytorch.HF_UNUSED
  arrays = {name: v for name, v in arrays.items() if name not in unused}
  table = pytorch.TIMM_IMPORT if layout == "timm" else pytorch.HF_IMPORT
  return layout, pytorch.to_vitjax(arrays, table, model.num_heads)


def _is_square(n):
  return n >= 0 and math.isqrt(n) ** 2 == n


def _fit_posemb(params, model, template):
  """Gives the checkpoint's position embeddings the model's prefix rows and grid.

  A checkpoint holds rows for the prefix (class, distillation) tokens and the grid,
  or for the grid only (big_vision; timm's no_embed_class, DeiT III, rope-vit);
  the model wants prefix rows unless `class_posemb=False`. A missing prefix row is
  zeros; an unwanted one is added into its token (the token only ever appears with
  it: timm converts DINOv2 this way), so the outputs are the same either way.
  """
  posemb = params.get("pos_embedding")
  if posemb is None or "pos_embedding" not in template or np.ndim(posemb) != 3:
    return params
  params = dict(params)
  prefix_names = [name for name in ("cls", "dist") if name in params]
  num_prefix = len(prefix_names)
  model_prefix = model.num_prefix_tokens if getattr(model, "class_posemb", True) else 0
  length = posemb.shape[1]
  # Grid-only unless the rows past the prefix make a grid (or the whole does not).
  has_prefix_rows = num_prefix and (_is_square(length - num_prefix) or not _is_square(length))
  if has_prefix_rows and not model_prefix:
    for i, name in enumerate(prefix_names):
      params[name] = params[name] + posemb[:, i:i + 1]
    posemb = posemb[:, num_prefix:]
  elif num_prefix and model_prefix and not has_prefix_rows:
    posemb = np.concatenate([np.zeros((1, num_prefix, posemb.shape[2]), posemb.dtype), posemb],
                            axis=1)
  rows = num_prefix if model_prefix else 0
  target = template["pos_embedding"].shape
  if (posemb.shape != target and posemb.shape[2] == target[2]
      and _is_square(target[1] - rows) and _is_square(posemb.shape[1] - rows)):
    side = math.isqrt(target[1] - rows)
    posemb = np.asarray(resize_posemb(np.asarray(posemb, np.float32), (side, side), rows,
                                      getattr(model, "posemb_resize", "bilinear")))
  params["pos_embedding"] = posemb
  return params


def _top_names(names):
  return {name.split("/")[0] for name in names}


def _drop_pretraining_only(params, template):
  """`params` without the pre-training-only parts (PRETRAINING_ONLY) the model has none of."""
  dropped = set(PRETRAINING_ONLY) - _top_names(template)
  return {name: value for name, value in params.items() if name.split("/")[0] not in dropped}


def _fresh_pretraining_only(params, model, template, rng):
  """Freshly initialised pre-training-only parts of the model that `params` has none of."""
  missing = (set(PRETRAINING_ONLY) & _top_names(template)) - _top_names(params)
  if not missing:
    return params
  fresh = mismatch.fresh_head(model, rng, tuple(missing))
  return {**params, **{name: value for name, value in fresh.items() if name not in params}}


def _reinit_head(params, model, template, rng):
  """Replaces the checkpoint's classifier by a freshly initialised one."""
  pre_logits = [n for n in template if n.startswith("pre_logits/")]
  keep_pre_logits = pre_logits and all(
      n in params and np.shape(params[n]) == template[n].shape for n in pre_logits)
  params = {n: v for n, v in params.items() if n.split("/")[0] not in HEAD_NAMES
            or (keep_pre_logits and n.startswith("pre_logits/"))}
  fresh = mismatch.fresh_head(model, rng, HEAD_NAMES)
  params.update({n: v for n, v in fresh.items() if n not in params})
  return params


def _mismatch_message(params, template, what):
  return mismatch.mismatch_message(params, template, what, _hints)


def _hints(params, template, differing):
  """Likely causes of a mismatch, in model-option terms."""
  hints = []
  depth = lambda names: len({n.split("/")[1] for n in names
                             if n.startswith("Transformer/encoderblock_")})
  if depth(params) != depth(template):
    hints.append(f"The checkpoint has {depth(params)} blocks, the model depth={depth(template)}.")
  kernel, want = params.get("embedding/kernel"), template.get("embedding/kernel")
  if kernel is not None and want is not None and np.shape(kernel) != want.shape:
    hints.append(f"Patch embedding: the checkpoint has patch_size={np.shape(kernel)[0]}, "
                 f"width={np.shape(kernel)[-1]}; the model patch_size={want.shape[0]}, "
                 f"width={want.shape[-1]}.")
  query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
  if (query in params and query in template and np.ndim(params[query]) == 3
      and np.shape(params[query])[1] != template[query].shape[1]):
    hints.append(f"The checkpoint has {np.shape(params[query])[1]} attention heads, the model "
                 f"num_heads={template[query].shape[1]}.")
  if "dist" in params and "head/kernel" in params and "head_dist/kernel" not in params:
    hints.append("The checkpoint has a distillation token but a single head (like HF's "
                 "DeiTForImageClassification, which classifies from the class token alone); "
                 "vitjax's distilled models average two heads.")
  if "fc_norm.weight" in params:
    hints.append("timm's fc_norm (a LayerNorm after average pooling) has no counterpart: vitjax "
                 "normalises the tokens before pooling.")
  rope = lambda names: any(n.endswith("/rope_frequencies") for n in names)
  if rope(params) and not rope(template):
    hints.append("The checkpoint has learned RoPE frequencies (RoPE-Mixed): the model needs "
                 "rope='mixed'.")
  elif rope(template) and not rope(params):
    hints.append("The model has rope='mixed' but the checkpoint has no learned RoPE "
                 "frequencies: rope='axial' (fixed frequencies) or None may be what it was "
                 "trained with.")
  if "cls" in template and "cls" not in params:
    hints.append("The checkpoint has no class token (an average-pooled model, such as "
                 "I-JEPA's): build the model with pool_type='gap'.")
  if "pos_embedding" in params and "pos_embedding" not in template:
    hints.append("The checkpoint has position embeddings ('pos_embedding'), the model none: "
                 "build it with posemb='learn' (fixed sin-cos embeddings stored as a "
                 "parameter, as Hugging Face's IJepaModel holds I-JEPA's, load so too).")
  elif "pos_embedding" in template and "pos_embedding" not in params:
    hints.append("The checkpoint has no position embeddings: it was trained with fixed ones "
                 "(posemb='sincos2d', as vitjax's I-JEPA) or none; build the model so.")
  lacking = sorted((set(PRETRAINING_ONLY) & _top_names(template)) - _top_names(params))
  if lacking:
    hints.append(f"The checkpoint has none of the model's pre-training parts "
                 f"{', '.join(map(repr, lacking))} (Hugging Face's IJepaModel is the encoder "
                 "alone): head='reinit' initialises them afresh; or load it into a plain ViT.")
  if all(n.split("/")[0] in HEAD_NAMES for n in differing):
    hints.append("Only the classifier differs: head='reinit' loads everything else and "
                 "initialises the model's head afresh.")
  return hints


# --- Saving to PyTorch layouts -------------------------------------------------------------

def _check_family_exports(flat, format):  # pylint: disable=redefined-builtin
  """Raises naming the model family and the formats it saves to, if `format` is not one."""
  if mixer.is_mixer_params(flat):
    family, formats, hint = "MLP-Mixer", ("big_vision", "timm"), ""
  elif (any(name.startswith("img/") for name in flat)
        and any(name.startswith("txt/") for name in flat)):
    family, formats, hint = "Two-tower (CLIP / SigLIP / LiT)", ("big_vision",), ""
  elif any(mae.is_decoder_name(name) for name in flat):
    family, formats = "MAE / SimMIM", ("big_vision",)
    hint = (" The encoder alone, vitjax.models.mae.encoder_params(params), is a ViT's and "
            "saves with format='timm' or 'hf'.")
  else:
    return
  if format not in formats:
    raise ValueError(f"{family} parameters have no format={format!r} export; they save with "
                     f"format={' or '.join(map(repr, formats))}.{hint}")


def _check_exportable(flat, target):
  if "pos_embedding" not in flat:
    raise ValueError(f"{target} needs learned position embeddings; these params have none "
                     "(posemb='sincos2d').")


def _to_timm(flat):
  _check_exportable(flat, "timm's VisionTransformer")
  state_dict, left = pytorch.from_vitjax(flat, pytorch.TIMM)
  if left:
    raise ValueError(f"No place in a timm VisionTransformer for: {', '.join(left)}.")
  return state_dict


def _to_hf(flat):
  """Hub names of ViTForImageClassification, DeiTForImageClassificationWithTeacher, ViTModel."""
  _check_exportable(flat, "Hugging Face ViT")
  if "cls" not in flat:
    raise ValueError("Hugging Face ViT/DeiT classify from the class token; these params have "
                     "none (pool_type='gap'/'map'). Export with format='timm' instead.")
  table = pytorch.HF
  prefix, heads = "", []
  if "head/kernel" in flat:
    # The classification models have no pooler, so a pre_logits layer is left over.
    kind = "deit" if "dist" in flat else "vit"
    prefix, heads = kind + ".", pytorch.HF_HEADS[kind]
    table = [rule for rule in pytorch.HF if rule[1] != "pre_logits"] + heads
  state_dict, left = pytorch.from_vitjax(flat, table, prefix, {rule[0] for rule in heads})
  if left:
    raise ValueError(f"No place in a Hugging Face ViT/DeiT for: {', '.join(left)}.")
  return state_dict
