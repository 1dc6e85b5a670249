"""The parameters of a vitjax training workdir, read from its orbax checkpoints.

`load_weights(model, workdir)` reads a run's weights with `load_params_and_step`,
and the trainer (vitjax.train.checkpoints) reuses it. It lives here, below the
trainer, so that loading weights never imports vitjax.train. It only reads: a run
may still be writing the workdir.
"""

import functools
import os

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp


class WorkdirCheckpointError(RuntimeError):
  """No checkpoint of the workdir can be restored (none there, or none readable)."""


def first_line(error, limit=200):
  text = str(error).strip().splitlines()
  return text[0][:limit] if text else ""


class _Unreadable(Exception):
  """A checkpoint that cannot be read; str() is 'where: why'."""


class _NotSaved(_Unreadable):
  """A checkpoint that holds none of the arrays asked for."""


# Weights of a run besides its parameters, by the name `load_params_and_step(item=...)`
# and `load_weights('WORKDIR:NAME')` take: their place in the train state.
ITEMS = {"params": ("params",), "ema": ("ema",), "teacher": ("task", "teacher"),
         "target_encoder": ("task", "target_encoder")}


def check_item(workdir, item):
  """Raises `WorkdirCheckpointError` unless `item` (`ITEMS`) is a name of weights that the
  latest checkpoint of `workdir` holds; reads the checkpoint's metadata, not its arrays."""
  load_params_and_step(workdir, item=item, metadata_only=True)


def load_params_and_step(workdir, step=None, *, ema=False, item="params",
                         metadata_only=False):
  """(step, params) of the latest readable checkpoint of `workdir`, or of `step`.

  With `ema`, the EMA of the parameters (float32, as the run kept it) instead; a
  checkpoint without one (config.ema.decay unset) is a `WorkdirCheckpointError`.
  `item` names other weights of the run (`ITEMS`): 'teacher' (DINO's EMA teacher) or
  'target_encoder' (I-JEPA's), float32; a run without them is a `WorkdirCheckpointError`.
  It only reads, since the run may still be writing: an unreadable latest
  checkpoint is skipped with one warning line naming it, the file and the step
  loaded instead, and nothing is moved (a resuming trainer moves it aside).
  Raises `WorkdirCheckpointError` naming each step and file tried when none can be
  read, or when the `step` asked for cannot.
  """
  directory = os.path.abspath(os.path.join(os.path.expanduser(os.fspath(workdir)),
                                           "checkpoints"))
  # Orbax writes a step under a temporary name and renames it when complete.
  steps = sorted(int(name) for name in os.listdir(directory)
                 if name.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise WorkdirCheckpointError(f"No checkpoint in {directory}.")
  item = "ema" if ema else item
  if item not in ITEMS:
    raise WorkdirCheckpointError(f"A training workdir has no weights named {item!r}; it holds "
                                 f"{', '.join(map(repr, ITEMS))} (when its run kept them).")
  if step is not None:
    if step not in steps:
      raise WorkdirCheckpointError(f"No checkpoint of step {step} in {directory}; it holds "
                                   f"steps {steps}.")
    try:
      return step, _read_params(os.path.join(directory, str(step)), item, metadata_only)
    except _Unreadable as e:
      raise WorkdirCheckpointError(
          f"The checkpoint of step {step} cannot be read: {e}.") from None
  failures = []
  for candidate in reversed(steps):
    try:
      params = _read_params(os.path.join(directory, str(candidate)), item, metadata_only)
    except _Unreadable as e:
      failures.append(f"step {candidate}: {e}")
      continue
    if failures:
      print(f"WARNING: skipped the unreadable checkpoint{'s' if len(failures) > 1 else ''} "
            f"of {'; '.join(failures)}; loaded step {candidate} instead, leaving the files "
            "as they are.", flush=True)
    return candidate, params
  raise WorkdirCheckpointError(f"None of the checkpoints in {directory} can be read:\n  "
                               + "\n  ".join(failures))


def _read_params(step_directory, item="params", metadata_only=False):
  """The parameters (`item` 'params') or their EMA ('ema') of one checkpoint, as numpy.

  Raises `_Unreadable`, or `WorkdirCheckpointError` for a readable checkpoint without an EMA.
  """
  state_directory = os.path.join(step_directory, "state")
  if not os.path.isdir(state_directory):
    raise _Unreadable(
        f"{step_directory}: no 'state' item (written by vitjax before 2026-11-22, or by "
        "another program: export its weights with the version that wrote it)")
  path = ITEMS[item]
  if item == "ema":
    no_ema = WorkdirCheckpointError(
        f"{state_directory} holds no EMA of the parameters: its run did not set "
        f"config.ema.decay. Load its parameters (ema=False).")
  else:
    no_ema = WorkdirCheckpointError(
        f"{state_directory} holds no {item!r} weights: its run's task did not keep them "
        f"(config.task={'dino' if item == 'teacher' else 'ijepa'!r} keeps them). Load its "
        "parameters (the workdir without ':" + item + "').")
  try:
    if not metadata_only:
      check_readable(state_directory, prefixes=(".".join(path).encode() + b".",))
    # The handler alone, not a CheckpointManager: a read-only manager logs warnings
    # ('Given directory is read only') on every load.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = handler.metadata(epath.Path(state_directory))
      tree = getattr(tree, "tree", tree)
      if not isinstance(tree, dict) or "params" not in tree:
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise _Unreadable(f"{state_directory}: holds no 'params' (found {found})")
      subtree = tree
      for key in path:
        if not isinstance(subtree, dict) or key not in subtree:
          raise no_ema
        subtree = subtree[key]
      if metadata_only:
        return None
      as_numpy = lambda _: ocp.RestoreArgs(restore_type=np.ndarray)
      nest = lambda value: functools.reduce(lambda inner, key: {key: inner}, reversed(path),
                                            value)
      state = handler.restore(epath.Path(state_directory), args=ocp.args.PyTreeRestore(
          item=nest(subtree), restore_args=nest(jax.tree_util.tree_map(as_numpy, subtree)),
          partial_restore=True))
    finally:
      handler.close()
  except _NotSaved:
    if item != "params":
      raise no_ema from None
    raise
  except (_Unreadable, WorkdirCheckpointError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(describe_read_error(e, state_directory)) from e
  for key in path:
    state = state[key]
  return state


# Zarr's per-array metadata: read for every array (optimizer state included) by orbax.
_ARRAY_METADATA = (b".zarray", b".zattrs", b".zgroup", b"zarr.json")


def check_readable(state_directory, prefixes=(b"params.",)):
  """Reads, with tensorstore directly, the stored arrays named `prefixes...` (None: all).

  Also the per-array metadata of all arrays, which orbax reads for any restore.
  Orbax reads asynchronously and, at the first failing read, closes its event loop
  under the reads still in flight, which then print 'Event loop is closed'
  tracebacks. Here each read is waited for, so a damaged file is one exception.
  Costs a second read of those arrays, mostly from the page cache.
  """
  manifest = os.path.join(state_directory, "manifest.ocdbt")
  if not os.path.exists(manifest):
    if os.path.isdir(os.path.join(state_directory, "d")):  # The data without its index.
      raise _Unreadable(f"{manifest}: missing")
    return  # Not the one-database layout: left to orbax.
  import tensorstore as ts  # pylint: disable=g-import-not-at-top  (orbax's own dependency)
  store = ts.KvStore.open({"driver": "ocdbt",
                           "base": "file://" + os.path.abspath(state_directory) + "/"}).result()
  wanted = lambda key: prefixes is None or key.startswith(tuple(prefixes))
  keys = [key for key in store.list().result()
          if wanted(key) or key.rsplit(b"/", 1)[-1] in _ARRAY_METADATA]
  if prefixes is not None and not any(wanted(key) for key in keys):
    names = ", ".join(repr(prefix.decode().rstrip(".")) for prefix in prefixes)
    raise _NotSaved(f"{state_directory}: holds no {names} arrays")
  reads = [store.read(key) for key in keys]
  errors = []
  for read in reads:
    try:
      read.result()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  if errors:
    raise errors[0]


def describe_read_error(error, state_directory):
  """'file: reason' from a tensorstore error (which names the file), else 'directory: error'."""
  text = str(error)
  if isinstance(error, _Unreadable):  # Described already.
    return text
  marker = 'local file "'
  start = text.rfind(marker)
  if start >= 0:
    path, _, reason = text[start + len(marker):].partition('"')
    reason = reason.lstrip(": ").split(" [tensorstore_spec=")[0].strip()
    if not os.path.exists(path):
      reason = "missing"
    if path.rstrip("/") != os.path.abspath(state_directory).rstrip("/"):
      return f"{path}: {reason or text.split(':')[0]}"
  return (f"{state_directory}: {type(error).__name__}: "
          f"{first_line(error).split(' [tensorstore_spec=')[0]}")
