"""Reading and writing checkpoint files as flat {name: numpy array} dicts.

The container is told from the file's first bytes, never from its name, and
nothing is ever unpickled: .npz with allow_pickle=False, PyTorch files with
weights_only=True, and safetensors parsed here (its header is JSON).
"""

import dataclasses
import errno
import json
import math
import os
import pickle
import struct
import tempfile
import warnings
import zipfile

from flax import traverse_util
import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A file that is not a checkpoint vitjax can read, or a layout it does not know."""


_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# Files a Hugging Face model directory holds its weights in, in order of preference.
# diffusers' model directories (save_pretrained of a DiT or an AutoencoderKL) name them apart.
_DIRECTORY_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "diffusion_pytorch_model.safetensors",
                    "diffusion_pytorch_model.safetensors.index.json",
                    "diffusion_pytorch_model.bin")


def find_layout(arrays, layouts, *, what, preferred=()):
  """(layout name, wrapper prefix) of a state dict, or None where no layout's anchor is in it.

  `layouts` are (name, anchor) pairs, tried in order: the anchor is a parameter name
  every checkpoint of that layout has (its patch embedding), and what precedes it is
  the wrapper prefix ('vit.', 'module.', 'params/'). Of several prefixes, the first of
  `preferred` found wins (training checkpoints also hold optimizer moments named like
  the parameters); several others are an error naming them, `what` being the file.
  """
  for name, anchor in layouts:
    prefixes = sorted({n[:-len(anchor)] for n in arrays if n.endswith(anchor)
                       and (n == anchor or n[-len(anchor) - 1] in "./")})
    chosen = [prefix for prefix in preferred if prefix in prefixes]
    if len(prefixes) == 1 or chosen:
      return name, (chosen or prefixes)[0]
    if prefixes:
      raise CheckpointError(f"{what} holds several models ({name} layout, prefixes "
                            f"{', '.join(map(repr, prefixes))}); vitjax loads one at a time.")
  return None


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a checkpoint's arrays came from, to name it for what it is in messages."""
  path: str
  container: str  # 'npz', 'safetensors', 'PyTorch', or 'workdir' (a vitjax training run).
  step: int | None = None  # The checkpoint read from a workdir.

  def describe(self, layout=None):
    """E.g. 'timm .safetensors file x', 'vitjax training workdir w (step 40)'.

    A workdir holds vitjax's names, whatever `layout` they were matched as.
    """
    if self.container == "workdir":
      return f"vitjax training workdir {self.path} (step {self.step})"
    kind = _CONTAINER_NAMES.get(self.container, self.container)
    if os.path.isdir(os.path.expanduser(self.path)):
      kind = f"model directory ({kind})"
    return " ".join([*([layout] if layout else []), kind, self.path])


_CONTAINER_NAMES = {"npz": ".npz", "safetensors": ".safetensors file",
                    "PyTorch": "PyTorch file"}


def read_checkpoint(path):
  """({name: np.ndarray}, Source) of a file `read_arrays` reads, or of a training workdir.

  A vitjax training workdir (a directory with `checkpoints/`) gives the parameters
  of its latest readable checkpoint, with vitjax's '/'-joined names; 'WORKDIR:NAME'
  gives its other weights (`workdir_checkpoints.ITEMS`: 'ema', 'teacher',
  'target_encoder').
  """
  expanded = os.path.expanduser(os.fspath(path))
  item = "params"
  workdir, _, name = expanded.rpartition(":")
  if workdir and not os.path.exists(expanded) and os.path.isdir(os.path.join(workdir,
                                                                             "checkpoints")):
    expanded, item = workdir, name  # 'WORKDIR:teacher': other weights of the run.
  if os.path.isdir(os.path.join(expanded, "checkpoints")):
    # Imported here: orbax is needed for workdirs alone.
    from vitjax.convert import workdir_checkpoints  # pylint: disable=import-outside-toplevel
    try:
      step, params = workdir_checkpoints.load_params_and_step(expanded, item=item)
    except workdir_checkpoints.WorkdirCheckpointError as e:  # As load_weights documents.
      raise CheckpointError(str(e)) from None
    flat = traverse_util.flatten_dict(params, sep="/")
    return ({name: np.asarray(value) for name, value in flat.items()},
            Source(os.fspath(path), "workdir", step))
  arrays, container = read_arrays(path)
  return arrays, Source(os.fspath(path), container)


def read_arrays(path):
  """Returns ({name: np.ndarray}, container) for an .npz, safetensors or PyTorch file.

  `path` may also be a Hugging Face model directory (model.safetensors, sharded
  or not, or pytorch_model.bin).
  """
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    for name in _DIRECTORY_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return read_arrays(os.path.join(path, name))
    raise CheckpointError(f"{path} is a directory without any of {', '.join(_DIRECTORY_FILES)}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(errno.ENOENT, "No such checkpoint file", path)
  if path.endswith(".index.json"):
    return _read_sharded_safetensors(path), "safetensors"
  with open(path, "rb") as f:
    head = f.read(16)
  if not head:
    raise CheckpointError(f"{path} is empty.")
  if head.startswith(b"PK"):  # A zip archive: .npz, or PyTorch's zip format.
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise CheckpointError(f"{path} is a damaged zip archive (truncated?): {e}") from None
    if any(n.endswith("data.pkl") for n in names):
      return _read_torch(path), "PyTorch"
    if names and all(n.endswith(".npy") for n in names):
      return _read_npz(path), "npz"
    raise CheckpointError(f"{path} is a zip archive but neither an .npz nor a PyTorch file; "
                          f"it holds {', '.join(names[:5]) or 'nothing'}.")
  if _looks_like_safetensors(head):
    return _read_safetensors(path), "safetensors"
  if head[0] == 0x80:  # Pickle protocol 2+: PyTorch's legacy (pre-1.6) format.
    return _read_torch(path), "PyTorch"
  raise CheckpointError(
      f"{path} is not a checkpoint file vitjax can read: it starts with {head[:8]!r}. "
      "Expected an .npz (zip) archive, a .safetensors file, or a PyTorch .pth/.pt/.bin file.")


def _read_npz(path):
  arrays = {}
  try:
    with np.load(path, allow_pickle=False) as npz:
      for name in npz.files:
        arrays[name] = _fix_npz_dtype(npz[name])
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise CheckpointError(f"{path} holds pickled objects, which vitjax never loads.") from None
    raise CheckpointError(f"Cannot read {path} as an .npz archive: {e}") from None
  except Exception as e:  # zlib, zip CRC and EOF errors of a damaged archive.
    raise CheckpointError(f"Cannot read {path} as an .npz archive (damaged or truncated?): "
                          f"{type(e).__name__}: {e}") from None
  return arrays


def _fix_npz_dtype(array):
  # np.save writes bfloat16 (an ml_dtypes type) as 2-byte void; it is the only 2-byte one.
  if array.dtype.kind == "V" and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def _looks_like_safetensors(head):
  # An 8-byte little-endian header length, then the JSON header itself.
  return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1


def _read_safetensors(path):
  """Reads a .safetensors file (memory-mapped), bfloat16 included."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    if 8 + header_size > size:
      raise CheckpointError(f"{path} is truncated: its safetensors header needs {header_size} "
                            f"bytes, the file has {size - 8}.")
    try:
      header = json.loads(f.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path} has a damaged safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} has a damaged safetensors header (not a JSON object).")
  header.pop("__metadata__", None)
  data_size = size - 8 - header_size
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size) if data_size else None
  arrays = {}
  for name, info in header.items():
    try:
      dtype = _SAFETENSORS_DTYPES[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: entry {name!r} of the safetensors header is malformed "
                            f"or has an unsupported dtype: {info!r}") from None
    if end > data_size or end - start != math.prod(shape) * dtype.itemsize:
      raise CheckpointError(f"{path} is truncated or damaged: tensor {name!r} needs bytes "
                            f"{start}..{end}, the file holds {data_size}.")
    arrays[name] = np.asarray(data[start:end]).view(dtype).reshape(shape) if end > start else (
        np.zeros(shape, dtype))
  return arrays


def _read_sharded_safetensors(index_path):
  try:
    with open(index_path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  except (OSError, ValueError, KeyError, AttributeError) as e:
    raise CheckpointError(f"Cannot read the safetensors index {index_path}: {e}") from None
  arrays = {}
  for shard in shards:
    shard_arrays, _ = read_arrays(os.path.join(os.path.dirname(index_path), shard))
    arrays.update(shard_arrays)
  return arrays


def _read_torch(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"{path} is a PyTorch file; reading it needs torch (the CPU build is "
                      "enough: pip install torch), or save it as .safetensors instead.") from None
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message is long; the line after 'WeightsUnpickler error:' names the culprit.
    _, found, detail = str(e).partition("WeightsUnpickler error:")
    lines = (detail if found else str(e)).strip().splitlines()
    reason = lines[0].split(". Please")[0] if lines else type(e).__name__
    raise CheckpointError(
        f"Refusing to load {path}: torch.load(weights_only=True) rejected it ({reason}). "
        "vitjax never unpickles arbitrary Python objects; save the weights as a plain "
        "state dict of tensors, or as .safetensors.") from None
  except Exception as e:  # Truncated or damaged: torch raises RuntimeError, EOFError, ...
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise CheckpointError(f"Cannot read {path} as a PyTorch checkpoint (damaged or "
                          f"truncated?): {type(e).__name__}: {first_line}") from None
  # Training checkpoints wrap the weights: {'model': ...} (DeiT), {'state_dict': ...} (timm).
  for _ in range(3):
    if not isinstance(obj, dict) or any(torch.is_tensor(v) for v in obj.values()):
      break
    wrapped = [k for k in ("state_dict", "model", "model_state_dict", "module")
               if isinstance(obj.get(k), dict)]
    if not wrapped:
      break
    obj = obj[wrapped[0]]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  return {name: _torch_to_numpy(t) for name, t in obj.items() if torch.is_tensor(t)}


def _torch_to_numpy(tensor):
  import torch  # pylint: disable=import-outside-toplevel
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; ml_dtypes does.
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _atomic_write(path, write):
  """Calls write(file) on a temporary file next to `path`, then renames it into place.

  A crash midway leaves the old file (or none), never half a checkpoint.
  """
  path = os.path.expanduser(os.fspath(path))
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_npz(arrays, path):
  """Writes {name: array} as an uncompressed .npz, atomically."""
  # bfloat16 would come back from np.load as raw bytes; float32 holds it exactly.
  arrays = {k: np.asarray(v, np.float32) if np.asarray(v).dtype == ml_dtypes.bfloat16
            else np.asarray(v) for k, v in arrays.items()}
  _atomic_write(path, lambda f: np.savez(f, **arrays))


def write_safetensors(arrays, path, metadata=None):
  """Writes {name: array} as .safetensors (with the `safetensors` package), atomically."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  # safetensors.numpy has no bfloat16; float32 holds it exactly.
  arrays = {k: np.ascontiguousarray(v, np.float32 if np.asarray(v).dtype == ml_dtypes.bfloat16
                                    else None) for k, v in arrays.items()}
  data = save(arrays, metadata=metadata)
  _atomic_write(path, lambda f: f.write(data))
