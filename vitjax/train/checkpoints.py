"""Orbax checkpoints of the training state: async saves, keep the last N, resume.

Each checkpoint `workdir/checkpoints/STEP/` holds two items written atomically
together: `state` (params, optimizer state, step, and the EMA of the params and the
task's own state where the run has them) and `data`, the input
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
from vitjax.convert import workdir_checkpoints

# The input-pipeline state keys that must match for a resumed run to see the
# examples an uninterrupted run would have seen.
DATA_STATE_KEYS = ("dataset", "train_split", "num_train", "batch_size", "seed")


# No checkpoint in the directory can be restored. The reading of a workdir's parameters
# lives in vitjax.convert (load_weights reads workdirs without importing the trainer).
CheckpointError = workdir_checkpoints.WorkdirCheckpointError
load_params_and_step = workdir_checkpoints.load_params_and_step


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
        f"{type(error).__name__}: {workdir_checkpoints.first_line(error)}. The run stops "
        f"rather than train on without checkpoints; {previous}. Free disk space or fix the directory's "
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
    """(state, data_state) of `step`; the state holds the parts of `abstract_state` saved.

    Parts saved and not asked for (an EMA of a run resumed without one) are read, as
    orbax restores whole trees, placed like the parameters, and dropped.
    """
    saved = self._metadata(step)
    wanted = dict(abstract_state)
    if isinstance(saved, dict) and "params" in saved:
      wanted = {key: value for key, value in abstract_state.items() if key in saved}
      extra = {key: value for key, value in saved.items() if key not in abstract_state}
      if extra:
        from vitjax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
        params = abstract_state["params"]
        first = jax.tree_util.tree_leaves(params)[0].sharding
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), extra)
        if hasattr(first, "mesh"):
          shardings = sharding_lib.like_params(
              shapes, params, jax.tree_util.tree_map(lambda x: x.sharding, params), first.mesh)
        else:  # One device.
          shardings = jax.tree_util.tree_map(lambda _: first, shapes)
        wanted.update(jax.tree_util.tree_map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            shapes, shardings))
    items = {"state": ocp.args.StandardRestore(wanted)}
    if (self.path(step) / "data").is_dir():
      items["data"] = ocp.args.JsonRestore()
    with quiet_orbax():
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = {key: value for key, value in restored["state"].items() if key in abstract_state}
    return state, restored.get("data")

  def _metadata(self, step):
    """The saved state's tree of array metadata, or None where it cannot be read."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
      with quiet_orbax():
        tree = handler.metadata(self.path(step) / "state")
    except Exception:  # pylint: disable=broad-except
      return None  # The restore reports it, and falls back to an older checkpoint.
    finally:
      handler.close()
    return getattr(tree, "tree", tree)

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
    return workdir_checkpoints.describe_read_error(error, os.fspath(self.path(step) / "state"))

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
    tree = self._metadata(step)
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
  workdir_checkpoints.check_readable(os.fspath(state), prefixes=None)


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


def load_params(workdir, step=None, *, ema=False):
  """The model parameters of a training checkpoint (the latest unless `step`), as numpy.

  Only the parameters (or with `ema`, their EMA) are read, not the optimizer state,
  onto the host, whatever mesh wrote them. A latest checkpoint that cannot be read is
  skipped with a warning: see `load_params_and_step`.
  """
  return load_params_and_step(workdir, step, ema=ema)[1]


def abstract_like(tree):
  """ShapeDtypeStructs (keeping shardings) of a pytree of arrays."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
