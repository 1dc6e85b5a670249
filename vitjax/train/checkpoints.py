"""Orbax checkpoints of the training state: async saves, keep the last N, resume.

A latest checkpoint that cannot be read (a crash mid-write, a corrupt disk) is
skipped with a warning and the previous one is used instead; the unreadable one
is moved to `workdir/checkpoints_unreadable/` (kept for inspection, never deleted).
"""

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be restored."""


class Checkpointer:
  """Saves and restores `state` pytrees under `workdir/checkpoints/STEP`."""

  def __init__(self, workdir, keep=2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.unreadable_directory = os.path.abspath(os.path.join(workdir, "checkpoints_unreadable"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def save(self, step, state):
    """Starts an asynchronous save; training continues while it is written."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def latest_step(self):
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """Restores the newest readable checkpoint; returns (step, state) or (None, None).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings)
    describing the state to restore into.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None, None
    failures = []
    for step in steps:
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"step {step}: {type(e).__name__}: {_first_line(e)}")
        logging.warning("Checkpoint at step %d in %s cannot be restored (%s); "
                        "trying the previous one.", step, self.directory, _first_line(e))
        print(f"WARNING: checkpoint at step {step} cannot be restored "
              f"({type(e).__name__}); falling back to the previous one.", flush=True)
        continue
      if failures:
        self._set_aside_newer_than(step)
      return step, state
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

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def load_params(workdir, step=None):
  """The model parameters of a training checkpoint (the latest unless `step`), as numpy."""
  checkpointer = Checkpointer(workdir)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {checkpointer.directory}.")
    state = checkpointer._manager.restore(step)  # pylint: disable=protected-access
  finally:
    checkpointer.close()
  return state["params"]


def abstract_like(tree):
  """ShapeDtypeStructs (keeping shardings) of a pytree of arrays."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _first_line(error):
  text = str(error).strip().splitlines()
  return text[0][:200] if text else ""
