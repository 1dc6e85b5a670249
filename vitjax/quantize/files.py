"""Quantized parameters in one .npz: `save_quantized`, `load_quantized` (format: __init__)."""

import json
import os
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import qarray
from qwix._src.providers import ptq as qwix_ptq

from vitjax.quantize import ptq

FORMAT = "vitjax-quantized"
VERSION = 1
METADATA = "__metadata__"
# numpy has no int4 or bfloat16: such arrays are stored in these containers, their dtype
# in the metadata.
_CONTAINERS = {"int4": np.int8, "uint4": np.uint8, "bfloat16": np.float32}


class QuantizedFileError(ValueError):
  """A file that is not a vitjax quantized .npz, or not one of this model."""


def _entries(qparams):
  """{entry name: array} of a quantized tree: quantized weights as .qvalue/.scale/.zero_point."""
  entries = {}
  for name, leaf in ptq.flatten(qparams).items():
    if isinstance(leaf, qwix_ptq.WithAux) and isinstance(leaf.array, qarray.QArray):
      entries[f"{name}.qvalue"] = leaf.array.qvalue
      entries[f"{name}.scale"] = leaf.array.scale
      if leaf.array.zero_point is not None:
        entries[f"{name}.zero_point"] = leaf.array.zero_point
    elif isinstance(leaf, qwix_ptq.WithAux):  # An activation's static scale.
      entries[name] = leaf.array
    else:
      entries[name] = leaf
  return entries


def save_quantized(path, qparams, *, scheme, input_shape, vit_quantizers=False,
                   log2_base="2", float_modules=None, model_config=None):
  """Writes `quantize`'s parameters to `path` (.npz), with what rebuilds the model.

  `input_shape` (batch, height, width, channels): the model's input (the batch is not
  read); `model_config` (optional): `vitjax.create_model` keywords ({'name': 'vit',
  'variant': 'mu/4', ...}) so that `load_quantized(path)` needs no model.
  """
  ptq.check_scheme(scheme)
  if not str(path).endswith(".npz"):
    raise QuantizedFileError(f"{path}: name the quantized file '*.npz'.")
  arrays, described = {}, {}
  for name, value in _entries(qparams).items():
    dtype = jnp.dtype(value.dtype).name
    arrays[name] = np.asarray(jax.device_get(value)).astype(_CONTAINERS.get(dtype, dtype))
    described[name] = dtype
  metadata = {
      "format": FORMAT, "version": VERSION, "scheme": scheme,
      "vit_quantizers": bool(vit_quantizers),
      "log2_base": log2_base if vit_quantizers else None,
      "float_modules": float_modules, "input_shape": [1] + list(input_shape[1:]),
      "qwix_version": qwix.__version__, "model": model_config, "dtypes": described,
  }
  arrays[METADATA] = np.array(json.dumps(metadata, sort_keys=True))
  temporary = f"{path}.partial"
  with open(temporary, "wb") as f:
    np.savez(f, **arrays)
  os.replace(temporary, path)


def read_metadata(path):
  """The metadata of a quantized .npz (a dict); QuantizedFileError if it is not one."""
  return _read(path, arrays=False)[0]


def _read(path, arrays=True):
  try:
    with np.load(path, allow_pickle=False) as f:
      if METADATA not in f.files:
        raise QuantizedFileError(f"{path}: not a vitjax quantized .npz (no {METADATA} "
                                 "entry); write one with vitjax.quantize.save_quantized.")
      metadata = json.loads(str(f[METADATA]))
      content = {name: f[name] for name in f.files if name != METADATA} if arrays else {}
  except QuantizedFileError:
    raise
  except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
    raise QuantizedFileError(f"{path}: cannot be read as a quantized .npz "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             ) from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    raise QuantizedFileError(f"{path}: not a vitjax quantized .npz.")
  if metadata.get("version") != VERSION:
    raise QuantizedFileError(f"{path}: format version {metadata.get('version')}; this "
                             f"vitjax reads version {VERSION}.")
  return metadata, content


def load_quantized(path, model=None):
  """(quantized model, quantized parameters) from a file of `save_quantized`.

  `model`: the float model the file was made from; None builds it from the file's
  `model_config`. QuantizedFileError, naming the differing entries, when the file does
  not fit the model.
  """
  metadata, arrays = _read(path)
  if model is None:
    if not metadata.get("model"):
      raise QuantizedFileError(f"{path} does not name its model (no model_config was "
                               "saved): pass the model, load_quantized(path, model).")
    from vitjax import models  # pylint: disable=g-import-not-at-top
    config = dict(metadata["model"])
    for key in ("dtype", "param_dtype"):  # As a training config writes them.
      if isinstance(config.get(key), str):
        config[key] = jnp.dtype(config[key])
    model = models.create_model(config.pop("name"), **config)
  try:
    qmodel = ptq.quantized_model(model, metadata["scheme"], log2_base=metadata["log2_base"],
                                 float_modules=metadata["float_modules"])
    abstract = ptq.abstract_params(qmodel, metadata["input_shape"])
  except (KeyError, TypeError, ValueError) as e:
    raise QuantizedFileError(f"{path}: its recipe does not build on this model "
                             f"({str(e).splitlines()[0]}).") from None
  expected = _entries(abstract)
  missing = sorted(set(expected) - set(arrays))
  extra = sorted(set(arrays) - set(expected))
  wrong = sorted(name for name in set(expected) & set(arrays)
                 if tuple(arrays[name].shape) != tuple(expected[name].shape)
                 or metadata["dtypes"].get(name) != jnp.dtype(expected[name].dtype).name)
  if missing or extra or wrong:
    show = lambda names: ", ".join(names[:3]) + (f" (and {len(names) - 3} more)"
                                                 if len(names) > 3 else "")
    parts = [f"not in the file: {show(missing)}" if missing else "",
             f"not in the model: {show(extra)}" if extra else "",
             f"other shape or dtype: {show(wrong)}" if wrong else ""]
    raise QuantizedFileError(f"{path} does not fit this model ({metadata['scheme']}): "
                             + "; ".join(p for p in parts if p) + ".")
  values = {name: jnp.asarray(arrays[name]).astype(expected[name].dtype) for name in expected}
  return qmodel, _rebuild(abstract, values)


def _rebuild(abstract, values):
  """The abstract quantized tree with its leaves taken from `values` (entry names)."""
  flat = {}
  for name, leaf in ptq.flatten(abstract).items():
    if isinstance(leaf, qwix_ptq.WithAux) and isinstance(leaf.array, qarray.QArray):
      zero_point = values.get(f"{name}.zero_point")
      flat[name] = leaf.replace(array=qarray.QArray(
          values[f"{name}.qvalue"], values[f"{name}.scale"], zero_point, leaf.array.qtype))
    elif isinstance(leaf, qwix_ptq.WithAux):
      flat[name] = leaf.replace(array=values[name])
    else:
      flat[name] = values[name]
  return flax.traverse_util.unflatten_dict(flat, sep="/")
