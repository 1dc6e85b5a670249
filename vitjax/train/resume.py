"""Resuming a workdir: is the new config the same run, and what changed since.

A workdir's `config.json` is the config of the run that wrote its checkpoints. On
resume the new config is compared with it key by key:

  - keys that fix the train state's structure (the model, the input size, the task,
    the optimizer and what it freezes) must be equal: another model in the same
    workdir is `ResumeConfigError` (exit 2) naming the keys, before any checkpoint
    is read;
  - other keys may change (steps, schedule, intervals, evaluators): the changes are
    printed, and recorded in `workdir/resumes.jsonl` with the learning rate before
    and after at the resumed step when the schedule moved.
"""

import datetime
import json

import ml_collections

from vitjax import config as config_lib

CONFIG_NAME = "config.json"
RESUMES_NAME = "resumes.jsonl"

# Keys (or key prefixes ending in '.') that fix the saved state's names and shapes.
STATE_KEYS = ("model.", "input.image_size", "input.channels", "task", "optimizer.name",
              "optimizer.freeze")
# Model keys that change the computation, not the parameters.
COMPUTE_ONLY_KEYS = ("model.attention_impl", "model.dtype", "model.dropout",
                     "model.drop_path_rate", "model.remat_policy", "model.attention_dropout")
# Keys that differ between launches of the same run (a new coordinator port).
LAUNCH_KEYS = ("distributed.",)
# Keys whose change moves the learning-rate schedule.
SCHEDULE_KEYS = ("total_steps", "optimizer.")


class ResumeConfigError(config_lib.ConfigError):
  """The workdir's checkpoints were written by a run of another model or input size."""


def flat_json(config):
  """{'model.name': 'vit', ...} of a ConfigDict or a dict loaded from config.json."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        visit(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value
  visit(config, "")
  return flat


def read_saved_config(workdir):
  """The config.json of the run that wrote the workdir, as a dict; None if absent."""
  path = workdir / CONFIG_NAME
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:
    return None  # Damaged: the checkpoint's own shapes are still checked.


def _matches(key, patterns):
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def changes(saved, config):
  """{key: (saved value, new value)} of every key that differs."""
  old, new = flat_json(saved), flat_json(config)
  missing = object()
  return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
          if old.get(key, missing) != new.get(key, missing) and not _matches(key, LAUNCH_KEYS)}


def check_same_state(changed, workdir, step):
  """Raises `ResumeConfigError` if `changed` holds keys that fix the state's shapes."""
  blocking = {k: v for k, v in changed.items()
              if _matches(k, STATE_KEYS) and not _matches(k, COMPUTE_ONLY_KEYS)}
  if not blocking:
    return
  lines = "\n  ".join(f"{k}: {old!r} in the workdir's run, {new!r} now"
                      for k, (old, new) in blocking.items())
  raise ResumeConfigError(
      f"The workdir {workdir} holds a run of another model or input (checkpoint of step "
      f"{step}); these keys differ from its {CONFIG_NAME}:\n  {lines}\n"
      f"Use another --workdir for the new run, or start the new run from that run's "
      f"weights with --workdir NEW --config.init={workdir}.")


def schedule_changed(changed):
  return any(_matches(k, SCHEDULE_KEYS) for k in changed)


def as_config(saved):
  """A config.json dict as a ConfigDict (for rebuilding the old learning-rate schedule)."""
  return ml_collections.ConfigDict(saved)


def record(workdir, step, changed, learning_rate=None):
  """Appends this resume's changes to `workdir/resumes.jsonl`."""
  row = {"step": int(step),
         "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
         "changed": {k: [old, new] for k, (old, new) in changed.items()}}
  if learning_rate is not None:
    row["learning_rate"] = list(learning_rate)
  path = workdir / RESUMES_NAME
  previous = path.read_text() if path.exists() else ""
  path.write_text(previous + json.dumps(row) + "\n")


def final_metrics(rows, step):
  """The evaluation metrics (`eval/`, `eval_ema/`) logged at `step` (the run's final row)."""
  result = {}
  for row in rows:
    if row.get("step") == step:
      result.update({k: v for k, v in row.items() if k.startswith(("eval/", "eval_ema/"))})
  return result
