"""MAE / SimMIM checkpoints: Hugging Face ViTMAE state dicts in, encoders out to plain ViTs.

`vitjax.load_weights` sends MaskedAutoencoder and SimMIM models here. They read
  - Hugging Face `ViTMAEForPreTraining` state dicts (hub names, 'vit.encoder.layer.0...',
    or transformers >= 5 names, 'vit.layers.0...'), and `ViTMAEModel` ones (encoder
    only: the decoder is then freshly initialised with head='reinit');
  - vitjax's own .npz (`save_weights`) and training workdirs.
A plain ViT loading any of these gets the encoder alone (`encoder_arrays`): that
is how fine-tuning starts from a pre-trained MAE.
"""

import flax.linen
from flax import traverse_util
import jax
import numpy as np

from vitjax.convert import mismatch, pytorch
from vitjax.models import dummy_input, param_shapes
from vitjax.models import mae as mae_models

# Everything of a MAE / SimMIM that is not the ViT encoder (vitjax names).
DECODER_PARAMS = ("decoder_embed", "mask_token", "decoder_pos_embedding", "Decoder",
                  "decoder_pred")
_HF_ANCHOR = pytorch.HF_ANCHOR  # 'embeddings.patch_embeddings.projection.weight'


def _block_rules(table):
  return [rule for rule in table if "{i}" in rule[0]]


# The encoder: Hugging Face ViT's table (ViTMAE's encoder has the same names).
HF_MAE_ENCODER = [rule for rule in pytorch.HF_IMPORT if rule[1] in (
    "cls", "pos_embedding", "embedding", "Transformer/encoder_norm")] + _block_rules(
        pytorch.HF_IMPORT)
# The decoder: the same blocks under 'decoder.decoder_layers.{i}' (the hub's name; the
# `save_pretrained` of transformers 5 writes 'decoder.decoder_encoder.layer.{i}'), plus its
# own modules.
HF_MAE_DECODER = [
    ("decoder.decoder_embed", "decoder_embed", "dense"),
    ("decoder.mask_token", "mask_token", "param"),
    ("decoder.decoder_pos_embed", "decoder_pos_embedding", "param"),
    ("decoder.decoder_norm", "Decoder/encoder_norm", "norm"),
    ("decoder.decoder_pred", "decoder_pred", "dense"),
] + [(prefix + torch_name.split("{i}.", 1)[1], vitjax_name.replace("Transformer/", "Decoder/"),
      kind)
     for prefix in ("decoder.decoder_layers.{i}.", "decoder.decoder_encoder.layer.{i}.")
     for torch_name, vitjax_name, kind in _block_rules(pytorch.HF_IMPORT)]


def is_decoder_name(name):
  """True for the decoder parts of a MAE / SimMIM checkpoint, in vitjax or Hugging Face names."""
  return name.split("/")[0] in DECODER_PARAMS or name.startswith("decoder.")


def encoder_arrays(arrays):
  """A MAE / SimMIM checkpoint's arrays without the decoder; other checkpoints unchanged."""
  return {name: value for name, value in arrays.items() if not is_decoder_name(name)}


def from_hf(arrays, model):
  """{Hugging Face ViTMAE name: array} -> {vitjax MaskedAutoencoder name: array}."""
  arrays = {name[len("vit."):] if name.startswith("vit.") else name: value
            for name, value in arrays.items()}
  decoder = {n: v for n, v in arrays.items() if n.startswith("decoder.")}
  encoder = {n: v for n, v in arrays.items() if n not in decoder}
  out = pytorch.to_vitjax(encoder, HF_MAE_ENCODER, model.num_heads)
  decoder_heads = getattr(model, "decoder_num_heads", model.num_heads)
  out.update(pytorch.to_vitjax(decoder, HF_MAE_DECODER, decoder_heads))
  return out


def load_masked_weights(model, arrays, source, *, head="error", rng=0):
  """Parameters for a MaskedAutoencoder / SimMIM from the flat `arrays` of `source`.

  `source` is where they were read from (a `vitjax.convert.files.Source`), to
  name it in messages.

  head='reinit' initialises afresh what the checkpoint lacks of the decoder (a
  `ViTMAEModel` holds the encoder only); head='error' reports it as missing.
  """
  if model.scan_layers:
    raise ValueError("Load MAE / SimMIM weights into a model with scan_layers=False; "
                     "vitjax.convert.scan_params stacks the blocks afterwards.")
  if any(name.endswith(_HF_ANCHOR) for name in arrays):
    layout, params = "Hugging Face ViTMAE", from_hf(arrays, model)
  else:
    # vitjax's own names; a timm file is reported by what it is, to be loaded into a ViT.
    layout = "timm" if any(name.endswith(pytorch.TIMM_ANCHOR) for name in arrays) else "vitjax"
    params = {name[len("params/"):] if name.startswith("params/") else name: value
              for name, value in arrays.items()}
  template = traverse_util.flatten_dict(param_shapes(model), sep="/")
  if head == "reinit":
    missing_decoder = [n for n in template if is_decoder_name(n) and n not in params]
    if missing_decoder:
      params.update({n: v for n, v in _fresh_params(model, rng).items() if n in missing_decoder})
  message = mismatch.mismatch_message(params, template, f"The {source.describe(layout)}",
                                      _hints)
  if message:
    raise mismatch.CheckpointMismatchError(message)
  params = {name: np.array(params[name], dtype=t.dtype) for name, t in template.items()}
  return traverse_util.unflatten_dict(params, sep="/")


def _fresh_params(model, rng):
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(rng)
  params = jax.jit(lambda r: flax.linen.unbox(model.init(r, dummy_input(model))["params"]))(rng)
  return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def _hints(params, template, differing):
  hints = []
  if any(name.endswith(pytorch.TIMM_ANCHOR) for name in params):
    hints.append("MAE / SimMIM models read Hugging Face ViTMAE state dicts and vitjax files; "
                 "a timm ViT (such as timm's MAE encoders) loads into a plain ViT "
                 "(vitjax.create_model('vit', ..., pool_type='token')).")
  if not any(is_decoder_name(n) for n in params) and any(is_decoder_name(n) for n in template):
    hints.append("The checkpoint has no decoder (a ViTMAEModel, or an encoder alone): "
                 "head='reinit' initialises a fresh one, or load it into a plain ViT "
                 "(vitjax.create_model('vit', ..., pool_type='token')).")
  count = lambda names, prefix: len({n.split("/")[1] for n in names if n.startswith(prefix)})
  for prefix, option in (("Transformer/encoderblock_", "depth"),
                         ("Decoder/encoderblock_", "decoder_depth")):
    if count(params, prefix) != count(template, prefix):
      hints.append(f"The checkpoint has {count(params, prefix)} {prefix.split('/')[0]} blocks, "
                   f"the model {option}={count(template, prefix)}.")
  del differing
  return hints


def is_masked_model(model):
  return isinstance(model, (mae_models.MaskedAutoencoder, mae_models.SimMIM))
