"""End to end: train a tiny config, stop, resume, finish; divergence and corrupt checkpoints."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vitjax import config as config_lib
from vitjax import train as train_lib
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def tiny_config(**overrides):
  config = config_lib.load_config(QUICKSTART + ":image_size=8,variant=mu/4")
  config_lib.apply_overrides(config, [
      "batch_size=16", "eval_batch_size=100", "total_steps=6", "log_every=1",
      "eval_every=3", "checkpoint_every=2", "keep_checkpoints=2",
      "optimizer.warmup_steps=2"] + [f"{k}={v}" for k, v in overrides.items()])
  with config.unlocked():
    config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  return config


def read_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir):
  checkpointer = checkpoints_lib.Checkpointer(workdir)
  step = checkpointer.latest_step()
  checkpointer.close()
  return step, checkpoints_lib.load_params(workdir, step)


class _Preempted(Exception):
  pass


def _interrupt_after(dataset_cls_method, steps):
  """Wraps Dataset.train_iter so that the run dies after `steps` batches, as on preemption."""
  def train_iter(self, *args, **kwargs):
    for i, batch in enumerate(dataset_cls_method(self, *args, **kwargs)):
      if i == steps:
        raise _Preempted()
      yield batch
  return train_iter


def test_train_stop_resume_finish_equals_uninterrupted_run(tmp_path, monkeypatch):
  config = tiny_config()
  straight = train_lib.train(config, str(tmp_path / "straight"), progress=False)

  from vitjax import data as data_lib
  dataset = data_lib.get_dataset(config)
  original = type(dataset).train_iter
  monkeypatch.setattr(type(dataset), "train_iter", _interrupt_after(original, 5))
  with pytest.raises(_Preempted):
    train_lib.train(config, str(tmp_path / "resumed"), progress=False)
  assert final_params(str(tmp_path / "resumed"))[0] == 4
  monkeypatch.setattr(type(dataset), "train_iter", original)
  resumed = train_lib.train(config, str(tmp_path / "resumed"), progress=False)

  assert resumed["eval/top1"] == straight["eval/top1"]
  step_a, params_a = final_params(str(tmp_path / "straight"))
  step_b, params_b = final_params(str(tmp_path / "resumed"))
  assert step_a == step_b == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)
  # Rows written after the last checkpoint by the interrupted run are dropped on resume.
  steps = [row["step"] for row in read_rows(str(tmp_path / "resumed")) if "train/loss" in row]
  assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]


def test_outputs_metrics_tensorboard_plot(tmp_path):
  workdir = str(tmp_path / "run")
  result = train_lib.train(tiny_config(), workdir, progress=False)
  rows = read_rows(workdir)
  names = set().union(*rows)
  assert {"step", "train/loss", "train/lr", "train/accuracy", "eval/top1", "eval/top5"} <= names
  assert [r["step"] for r in rows if "eval/top1" in r] == [3, 6]
  assert 0.0 <= result["eval/top1"] <= result["eval/top5"] <= 1.0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(result["tensorboard"]))
  with open(result["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert result["checkpoint"].endswith(os.path.join("checkpoints", "6"))
  lrs = [r["train/lr"] for r in rows if "train/lr" in r]
  assert lrs[0] == 0.0 and max(lrs) == pytest.approx(config_lib.load_config(QUICKSTART).optimizer.learning_rate)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train(tiny_config(total_steps=4), workdir, progress=False)
  before = final_params(workdir)
  config = tiny_config(total_steps=8)
  config_lib.apply_overrides(config, ["optimizer.learning_rate=nan"])
  with pytest.raises(trainer_lib.TrainingDivergedError, match="at step 5"):
    train_lib.train(config, workdir, progress=False)
  after = final_params(workdir)
  assert after[0] == before[0] == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, before[1], after[1])


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train(tiny_config(total_steps=4), workdir, progress=False)
  for step in ("2", "4"):
    for folder, _, files in os.walk(os.path.join(workdir, "checkpoints", step)):
      for name in files:
        with open(os.path.join(folder, name), "wb") as f:
          f.write(b"\x00garbage")
  with pytest.raises(checkpoints_lib.CheckpointError, match="None of the checkpoints"):
    train_lib.train(tiny_config(total_steps=6), workdir, progress=False)


def test_cli_runs_and_prints_where_things_are(tmp_path):
  workdir = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "vitjax.train", "--config", QUICKSTART + ":image_size=8,steps=2",
       "--workdir", str(workdir), "--config.batch_size=8", "--config.eval_every=2",
       "--no_progress"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "Final eval top-1:" in result.stdout
  for label in ("checkpoint:", "metrics:", "plot:"):
    assert label in result.stdout
  assert (workdir / "metrics.png").exists() and (workdir / "config.json").exists()


def test_bfloat16_compute_trains_float32_parameters(tmp_path):
  config = tiny_config(total_steps=3, eval_every=3, checkpoint_every=3)
  config_lib.apply_overrides(config, ["model.dtype=bfloat16", "optimizer.name=sgd"])
  result = train_lib.train(config, str(tmp_path / "bf16"), progress=False)
  _, params = final_params(str(tmp_path / "bf16"))
  assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params))
  losses = [r["train/loss"] for r in read_rows(str(tmp_path / "bf16")) if "train/loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert 0.0 <= result["eval/top1"] <= 1.0
