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

import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

# The input-pipeline state keys that must match for a resumed run to see the
# examples an uninterrupted run would have seen.
DATA_STATE_KEYS = ("dataset", "train_split", "num_train", "batch_size", "seed")


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be restored."""


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed; the earlier checkpoints are intact."""


class DataStateMismatchError(ValueError):
  """The checkpoint was written by a run whose example stream differs from the config's."""


class Checkpointer:
  """Saves and restores `state` pytrees under `workdir/checkpoints/STEP`."""

  def __init__(self, workdir, keep=2, read_only=False):
    """`read_only` for reading a run's checkpoints while it may still be writing them."""
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.unreadable_directory = os.path.abspath(os.path.join(workdir, "checkpoints_unreadable"))
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
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def wait(self):
    """Waits for the save in flight; raises `CheckpointWriteError` if it failed."""
    try:
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
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

  def latest_step(self):
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """Restores the newest readable checkpoint: (step, state, data_state), or Nones.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings)
    describing the state to restore into. `data_state` is None for a checkpoint
    written without one.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None, None, None
    failures = []
    for step in steps:
      try:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if os.path.isdir(os.path.join(self.path(step), "data")):
          items["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"step {step}: {type(e).__name__}: {_first_line(e)}")
        logging.warning("Checkpoint at step %d in %s cannot be restored (%s); "
                        "trying the previous one.", step, self.directory, _first_line(e))
        print(f"WARNING: checkpoint at step {step} ({self.path(step)}) cannot be restored "
              f"({type(e).__name__}); falling back to the previous one.", flush=True)
        continue
      if failures:
        self._set_aside_newer_than(step)
      return step, restored["state"], restored.get("data")
    raise CheckpointError(
        f"None of the checkpoints in {self.directory} can be restored:\n  "
        + "\n  ".join(failures)
        + "\nMove the directory away to start from scratch, or point --workdir elsewhere.")

  def _set_aside_newer_than(self, step):
    """Moves unreadable checkpoints newer than `step` out of the way of new saves."""
    if jax.process_index() == 0:
      for newer in sorted(s for s in self._manager.all_steps() if s > step):
        target = os.path.join(self.unreadable_directory, str(newer))
        os.makedirs(self.unreadable_directory, exist_ok=True)
        if os.path.exists(target):
          target += f".{len(os.listdir(self.unreadable_directory))}"
        shutil.move(self.path(newer), target)
        print(f"WARNING: moved the unreadable checkpoint of step {newer} to {target}.",
              flush=True)
    self._manager.reload()

  def path(self, step):
    return os.path.join(self.directory, str(step))

  def close(self):
    """Waits for the last save (raising `CheckpointWriteError` if it failed), then closes."""
    try:
      if not self._write_failed:  # A failure is reported once, where it was found.
        self.wait()
    finally:
      self._manager.close()


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
  mesh wrote them.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoint in {directory}.")
  manager = ocp.CheckpointManager(
      directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                "data": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {directory}.")
    if step not in manager.all_steps():
      raise CheckpointError(f"No checkpoint of step {step} in {directory}; it holds steps "
                            f"{sorted(manager.all_steps())}.")
    if not os.path.isdir(os.path.join(directory, str(step), "state")):
      raise CheckpointError(
          f"The checkpoint {os.path.join(directory, str(step))} has no 'state' item: it was "
          f"written by vitjax before 2026-11-22 (one unnamed item) or by another program. "
          f"Export weights with the version that wrote it (vitjax.save_weights), or retrain.")
    tree = manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
      raise CheckpointError(f"The checkpoint of step {step} in {directory} holds no "
                            f"'params' (found {sorted(tree) if isinstance(tree, dict) else tree}).")
    as_numpy = lambda _: ocp.RestoreArgs(restore_type=np.ndarray)
    restore_args = jax.tree_util.tree_map(as_numpy, tree["params"])
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": tree["params"]}, restore_args={"params": restore_args},
        partial_restore=True)))["state"]
  finally:
    manager.close()
  return state["params"]


def abstract_like(tree):
  """ShapeDtypeStructs (keeping shardings) of a pytree of arrays."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _first_line(error):
  text = str(error).strip().splitlines()
  return text[0][:200] if text else ""
