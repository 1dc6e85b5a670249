"""Orbax checkpoints of the training state: async saves, keep the last N, resume.

Each checkpoint `workdir/checkpoints/STEP/` holds two items written atomically
together: `state` (params, optimizer state, step) and `data`, the input
pipeline's state as JSON. The pipeline is deterministic by step, so its state is
the step plus what fixes the example stream (dataset, split size, batch size,
seed); on resume that is checked against the config.

Faults:
  - A latest checkpoint that cannot be read (a crash mid-write, a corrupt disk) is
    skipped with a warning naming it and the previous one is used instead; the
    unreadable one is moved to `workdir/checkpoints_unreadable/` (kept for
    inspection, never deleted).
  - A save that fails (no space, no permission) raises `CheckpointWriteError`
    at that save or, for the asynchronous part of the write, at the next save or
    wait at the latest. A checkpoint only replaces older ones once it is complete,
    so the previous one stays valid.
"""

import contextlib
import logging
import os
import sys

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vitjax.convert import checkpoint as convert_checkpoint

# The input-pipeline state keys that must match for a resumed run to see the
# examples an uninterrupted run would have seen.
DATA_STATE_KEYS = ("dataset", "train_split", "num_train", "batch_size", "seed")


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be restored."""


# The workdir's arrays have other names or shapes than the model's: the error
# `load_weights` raises for a checkpoint that does not fit, so one except catches both.
CheckpointMismatchError = convert_checkpoint.CheckpointMismatchError


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed; the earlier checkpoints are intact."""


class DataStateMismatchError(ValueError):
  """The checkpoint was written by a run whose example stream differs from the config's."""


class Checkpointer:
  """Saves and restores `state` pytrees under `workdir/checkpoints/STEP`."""

  def __init__(self, workdir, keep=2, read_only=False):
    """`read_only` for reading a run's checkpoints while it may still be writing them."""
    workdir = epath.Path(workdir)
    self.directory = _absolute(workdir / "checkpoints")
    self.unreadable_directory = _absolute(workdir / "checkpoints_unreadable")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=True,
            # Half-written saves of a killed run are removed when the next run starts.
            cleanup_tmp_directories=not read_only))
    self._writing_step = None  # The step of the save that may still be in flight.
    self._write_failed = False

  def save(self, step, state, data_state=None):
    """Starts an asynchronous save of `state` (and the JSON-able `data_state`).

    Raises `CheckpointWriteError` if this save cannot start or the previous
    one failed in the background.
    """
    self.wait()
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self._writing_step = step
    try:
      with quiet_orbax():
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def check(self):
    """Raises `CheckpointWriteError` if a save failed in the background; never waits.

    Called every log window, so a failed write stops the run within seconds, not at
    the next checkpoint.
    """
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def wait(self):
    """Waits for the save in flight; raises `CheckpointWriteError` if it failed."""
    try:
      with quiet_orbax():
        self._manager.wait_until_finished()
        self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e
    finally:
      self._writing_step = None

  def _write_error(self, error):
    self._write_failed = True
    step = self._writing_step
    kept = [s for s in self._complete_steps() if s != step]
    previous = (f"the last complete checkpoint, step {kept[-1]}, is intact"
                if kept else "no earlier checkpoint exists")
    return CheckpointWriteError(
        f"Writing the checkpoint of step {step} to {self.directory} failed: "
        f"{type(error).__name__}: {_first_line(error)}. The run stops rather than train on "
        f"without checkpoints; {previous}. Free disk space or fix the directory's "
        f"permissions, then rerun the same command to resume.")

  def _complete_steps(self):
    """Steps whose directories are complete (orbax renames a save in when it is done)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state):
    """Restores the newest readable checkpoint: (step, state, data_state), or Nones.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings)
    describing the state to restore into. `data_state` is None for a checkpoint
    written without one. A checkpoint whose arrays have other names or shapes than
    `abstract_state` raises `CheckpointMismatchError` listing them; unreadable ones
    are skipped (one warning each) and moved to `checkpoints_unreadable/`.

    In a multi-host run, process 0 decides which checkpoint is readable and every
    host restores that one (`_agreed_step`).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None, None, None
    if jax.process_count() > 1:
      step = self._agreed_step(steps)
      self._check_fits(step, abstract_state)
      return step, *self._restore_step(step, abstract_state)
    failures = {}
    for step in steps:
      if not self._readable(step, failures):
        continue
      self._check_fits(step, abstract_state)
      try:
        state, data = self._restore_step(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        failures[step] = self._describe(step, e)
        continue
      self._set_aside(failures, step)
      return step, state, data
    raise self._none_readable(failures)

  def _restore_step(self, step, abstract_state):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if (self.path(step) / "data").is_dir():
      items["data"] = ocp.args.JsonRestore()
    with quiet_orbax():
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored.get("data")

  def _readable(self, step, failures):
    """Whether every stored value of `step` reads; if not, records why in `failures`.

    Read and waited for one by one before orbax restores: orbax, at its first failing
    read, closes its event loop under the reads in flight, and each of those prints
    an 'Event loop is closed' traceback.
    """
    try:
      read_all_arrays(self.directory, step)
    except Exception as e:  # pylint: disable=broad-except
      failures[step] = self._describe(step, e)
      return False
    return True

  def _describe(self, step, error):
    """'file: reason' of a checkpoint that cannot be read."""
    return _describe_read_error(error, os.fspath(self.path(step) / "state"))

  def _none_readable(self, failures):
    return CheckpointError(
        f"None of the checkpoints in {self.directory} can be read:\n  "
        + "\n  ".join(f"step {step}: {why}" for step, why in failures.items())
        + "\nMove the directory away to start from scratch, or point --workdir elsewhere.")

  def _agreed_step(self, steps):
    """Multi-host: process 0 reads each checkpoint alone and broadcasts the first readable.

    Every host then restores that step, so no host resumes from another step than the
    others; the unreadable ones are moved aside once, by process 0, between barriers.
    """
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    chosen, failures = -1, {}
    if jax.process_index() == 0:
      chosen = next((step for step in steps if self._readable(step, failures)), -1)
    chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
    if chosen < 0:
      raise self._none_readable(failures or {s: "unreadable (process 0)" for s in steps})
    if chosen != steps[0]:
      multihost_utils.sync_global_devices("vitjax: checkpoint chosen")
      self._set_aside(failures, chosen, reload=False)  # Only process 0 moves files.
      multihost_utils.sync_global_devices("vitjax: unreadable checkpoints set aside")
      self._manager.reload()
    return chosen

  def _check_fits(self, step, abstract_state):
    """Raises `CheckpointMismatchError` if the checkpoint's arrays do not fit the state.

    Compared from the checkpoint's metadata, before anything is read: a run resumed
    with another model gets the list of names and shapes, not orbax's internals.
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
      with quiet_orbax():
        tree = handler.metadata(self.path(step) / "state")
    except Exception:  # pylint: disable=broad-except
      return  # Unreadable metadata: the restore below reports it and falls back.
    finally:
      handler.close()
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
      return
    from vitjax.convert import mismatch  # pylint: disable=g-import-not-at-top
    saved = _flat_shapes(tree["params"])
    wanted = _flat_shapes(abstract_state["params"])
    message = mismatch.mismatch_message(
        {k: np.empty(v, np.uint8) for k, v in saved.items()},
        {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in wanted.items()},
        f"The checkpoint of step {step} in {self.directory}",
        lambda *_: [f"The workdir holds another model's run: use another --workdir, or "
                    f"start a new run from its weights with --workdir NEW "
                    f"--config.init={self.directory.parent}."])
    if message:
      raise CheckpointMismatchError(message)

  def _set_aside(self, failures, step, reload=True):
    """Moves the unreadable checkpoints newer than `step` out of the way of new saves.

    Process 0 moves them (one warning line each), then the list of steps is reloaded.
    """
    if jax.process_index() == 0 and failures:
      for newer in sorted(s for s in self._manager.all_steps() if s > step):
        self.unreadable_directory.mkdir(parents=True, exist_ok=True)
        target = self.unreadable_directory / str(newer)
        if target.exists():
          target = self.unreadable_directory / (
              f"{newer}.{len(list(self.unreadable_directory.iterdir()))}")
        self.path(newer).rename(target)
        print(f"WARNING: the checkpoint of step {newer} cannot be read "
              f"({failures.get(newer, 'unreadable')}); moved it to {target} and resumed from "
              f"step {step}.", file=sys.stderr, flush=True)
    if reload and failures:
      self._manager.reload()

  def path(self, step):
    return self.directory / str(step)

  def close(self):
    """Waits for the last save (raising `CheckpointWriteError` if it failed), then closes."""
    try:
      if not self._write_failed:  # A failure is reported once, where it was found.
        self.wait()
    finally:
      if not self._write_failed:
        # After a failed write orbax's background threads may wait minutes on the
        # directory that was never made; closing would wait with them.
        self._manager.close()


@contextlib.contextmanager
def quiet_orbax():
  """Silences orbax's own error logs (tracebacks of its threads) inside the block.

  vitjax catches what orbax raises and reports it in one line; `--verbose` (or
  VITJAX_VERBOSE=1) keeps orbax's logs.
  """
  if os.environ.get("VITJAX_VERBOSE", "") not in ("", "0"):
    yield
    return
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _absolute(path):
  """`path` made absolute; a `gs://...` path is left as it is (not `os.path.abspath`)."""
  return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(os.fspath(path)))


def _flat_shapes(tree):
  """{'a/b/c': shape} of a pytree of arrays or array metadata."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    flat[name] = tuple(getattr(leaf, "shape", np.shape(leaf)))
  return flat


def read_all_arrays(directory, step):
  """Reads every stored value of the checkpoint `directory/step`; raises if one fails.

  The readability check of a multi-host restore: process 0 runs it alone.
  """
  state = epath.Path(directory) / str(step) / "state"
  if "://" in os.fspath(state):
    return  # An object store: orbax's own read reports what fails.
  _check_readable(os.fspath(state), prefixes=None)


def check_data_state(saved, current, directory):
  """Raises `DataStateMismatchError` naming what changed between `saved` and `current`.

  Both are input-pipeline states (dicts with `DATA_STATE_KEYS`); `saved` is None
  for checkpoints written before vitjax stored one, which are trusted.
  """
  if saved is None:
    return
  changed = [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
             for key in DATA_STATE_KEYS if saved.get(key) != current.get(key)]
  if changed:
    raise DataStateMismatchError(
        f"The checkpoint in {directory} was written by a run with another input stream, "
        f"so resuming would not see the examples it would have seen:\n  "
        + "\n  ".join(changed)
        + "\nRerun with the original config values, or start a new run with another --workdir.")


def load_params(workdir, step=None):
  """The model parameters of a training checkpoint (the latest unless `step`), as numpy.

  Only the parameters are read (not the optimizer state), onto the host, whatever
  mesh wrote them. A latest checkpoint that cannot be read is skipped with a
  warning: see `load_params_and_step`.
  """
  return load_params_and_step(workdir, step)[1]


def abstract_like(tree):
  """ShapeDtypeStructs (keeping shardings) of a pytree of arrays."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _first_line(error, limit=200):
  text = str(error).strip().splitlines()
  return text[0][:limit] if text else ""


class _Unreadable(Exception):
  """A checkpoint that cannot be read; str() is 'where: why'."""


def load_params_and_step(workdir, step=None):
  """(step, params) of the latest readable checkpoint of `workdir`, or of `step`.

  It only reads, since the run may still be writing: an unreadable latest
  checkpoint is skipped with one warning line naming it, the file and the step
  loaded instead, and nothing is moved (a resuming trainer moves it aside).
  Raises `CheckpointError` naming each step and file tried when none can be read,
  or when the `step` asked for cannot.
  """
  directory = os.path.abspath(os.path.join(os.path.expanduser(os.fspath(workdir)),
                                           "checkpoints"))
  # Orbax writes a step under a temporary name and renames it when complete.
  steps = sorted(int(name) for name in os.listdir(directory)
                 if name.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise CheckpointError(f"No checkpoint in {directory}.")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"No checkpoint of step {step} in {directory}; it holds steps "
                            f"{steps}.")
    try:
      return step, _read_params(os.path.join(directory, str(step)))
    except _Unreadable as e:
      raise CheckpointError(f"The checkpoint of step {step} cannot be read: {e}.") from None
  failures = []
  for candidate in reversed(steps):
    try:
      params = _read_params(os.path.join(directory, str(candidate)))
    except _Unreadable as e:
      failures.append(f"step {candidate}: {e}")
      continue
    if failures:
      print(f"WARNING: skipped the unreadable checkpoint{'s' if len(failures) > 1 else ''} "
            f"of {'; '.join(failures)}; loaded step {candidate} instead, leaving the files "
            "as they are.", flush=True)
    return candidate, params
  raise CheckpointError(f"None of the checkpoints in {directory} can be read:\n  "
                        + "\n  ".join(failures))


def _read_params(step_directory):
  """The parameters of one checkpoint, as numpy; raises `_Unreadable`."""
  state_directory = os.path.join(step_directory, "state")
  if not os.path.isdir(state_directory):
    raise _Unreadable(
        f"{step_directory}: no 'state' item (written by vitjax before 2026-11-22, or by "
        "another program: export its weights with the version that wrote it)")
  try:
    _check_readable(state_directory)
    # The handler alone, not a CheckpointManager: a read-only manager logs warnings
    # ('Given directory is read only') on every load.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = handler.metadata(epath.Path(state_directory))
      tree = getattr(tree, "tree", tree)
      if not isinstance(tree, dict) or "params" not in tree:
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise _Unreadable(f"{state_directory}: holds no 'params' (found {found})")
      as_numpy = lambda _: ocp.RestoreArgs(restore_type=np.ndarray)
      state = handler.restore(epath.Path(state_directory), args=ocp.args.PyTreeRestore(
          item={"params": tree["params"]},
          restore_args={"params": jax.tree_util.tree_map(as_numpy, tree["params"])},
          partial_restore=True))
    finally:
      handler.close()
  except _Unreadable:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(_describe_read_error(e, state_directory)) from e
  return state["params"]


# Zarr's per-array metadata: read for every array (optimizer state included) by orbax.
_ARRAY_METADATA = (b".zarray", b".zattrs", b".zgroup", b"zarr.json")


def _check_readable(state_directory, prefixes=(b"params.",)):
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
    raise _Unreadable(f"{state_directory}: holds no {names} arrays")
  reads = [store.read(key) for key in keys]
  errors = []
  for read in reads:
    try:
      read.result()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  if errors:
    raise errors[0]


def _describe_read_error(error, state_directory):
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
          f"{_first_line(error).split(' [tensorstore_spec=')[0]}")
