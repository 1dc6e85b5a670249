"""Loading weights from damaged training workdirs, and errors that name each source."""

import logging
import os
import shutil

import chex
from flax import traverse_util
import numpy as np
import orbax.checkpoint as ocp
import pytest

import vitjax
from vitjax import config as config_lib
from vitjax import train as train_lib
from vitjax.train import checkpoints as checkpoints_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def tiny_config():
  config = config_lib.load_config(QUICKSTART + ":image_size=8,variant=mu/4")
  config_lib.apply_overrides(config, [
      "batch_size=16", "total_steps=4", "log_every=4", "eval_every=0", "checkpoint_every=2",
      "keep_checkpoints=3", "optimizer.warmup_steps=2"])
  with config.unlocked():
    config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  config.evaluators = {}
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train_lib.train(tiny_config(), workdir, progress=False)
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(trained, copy)
  return copy


def model(**overrides):
  return train_lib.build_model(tiny_config()).clone(**overrides)


def saved_params(workdir, step):
  """The parameters of a checkpoint, read with orbax directly."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    state = checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  finally:
    checkpointer.close()
  return traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state["params"]).items()})


def damage(workdir, step, how):
  """Damages the array files of a checkpoint as a crash or a bad disk would; returns them."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  if how == "truncate":  # Every data file cut in half.
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(state)
             for name in names if os.path.basename(folder) == "d"]
    for path in paths:
      os.truncate(path, os.path.getsize(path) // 2)
  else:  # The files of the database's own directory (its index) deleted.
    paths = [os.path.join(state, "d", name) for name in os.listdir(os.path.join(state, "d"))]
    for path in paths:
      os.remove(path)
  assert paths
  return paths


def listing(workdir):
  return sorted(os.path.join(folder, name) for folder, _, names in os.walk(workdir)
                for name in names)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_unreadable_latest_checkpoint_falls_back_with_one_warning_line(
    workdir, how, capfd, caplog):
  expected = saved_params(workdir, step=2)
  damaged = damage(workdir, 4, how)
  files_before = listing(workdir)
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    params = vitjax.load_weights(model(), workdir)
  out, err = capfd.readouterr()

  chex.assert_trees_all_equal(params, expected)
  lines = [line for line in (out + err).splitlines() if line.strip()]
  assert len(lines) == 1, lines  # No tracebacks, no asyncio noise, no orbax logs.
  assert "step 4" in lines[0] and "loaded step 2 instead" in lines[0]
  assert any(path in lines[0] for path in damaged), lines[0]
  assert listing(workdir) == files_before  # Only read: the run may still be writing.
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_readable_checkpoint_names_each_step_and_file(workdir, capfd):
  damaged = {step: damage(workdir, step, "truncate") for step in (2, 4)}
  capfd.readouterr()
  with pytest.raises(vitjax.CheckpointError) as error:
    vitjax.load_weights(model(), workdir)
  lines = str(error.value).splitlines()
  assert lines[0] == (f"None of the checkpoints in {os.path.join(workdir, 'checkpoints')} "
                      "can be read:")
  for line, step in zip(lines[1:], (4, 2)):
    assert line.strip().startswith(f"step {step}: ") and any(p in line for p in damaged[step])
  # A step asked for is not replaced by another.
  with pytest.raises(checkpoints_lib.CheckpointError, match="step 4 cannot be read: .*/d/"):
    checkpoints_lib.load_params(workdir, step=4)
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err and "WARNING" not in out + err


def test_loading_a_workdir_logs_nothing(workdir, capfd, caplog):
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    params = vitjax.load_weights(model(), workdir)
  chex.assert_trees_all_equal(params, saved_params(workdir, step=4))
  out, err = capfd.readouterr()
  assert "read only" not in out + err and not (out + err).strip()
  assert not [r.getMessage() for r in caplog.records if "read only" in r.getMessage()]


def test_mismatch_errors_name_each_source_for_what_it_is(workdir, tmp_path):
  params = vitjax.load_weights(model(), workdir)
  sources = {"timm": tmp_path / "vit.safetensors", "big_vision": tmp_path / "vit.npz"}
  vitjax.save_weights(params, sources["timm"], format="timm")
  vitjax.save_weights(params, sources["big_vision"])

  def first_line(path, into):
    with pytest.raises(vitjax.CheckpointMismatchError) as error:
      vitjax.load_weights(into, path)
    return str(error.value).splitlines()[0]

  other = model(num_classes=3)
  assert first_line(workdir, other) == (
      f"The vitjax training workdir {workdir} (step 4) does not fit the model.")
  assert first_line(sources["timm"], other) == (
      f"The timm .safetensors file {sources['timm']} does not fit the model.")
  assert first_line(sources["big_vision"], other) == (
      f"The big_vision .npz {sources['big_vision']} does not fit the model.")
  # A MAE given a timm file: named as timm's, not as vitjax's own.
  mae = vitjax.create_model("mae", width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4,
                            image_size=8, decoder_width=16, decoder_depth=1)
  assert first_line(sources["timm"], mae) == (
      f"The timm .safetensors file {sources['timm']} does not fit the model.")


MIXER = dict(hidden_dim=32, depth=2, tokens_mlp_dim=24, channels_mlp_dim=64, patch_size=8,
             image_size=32, num_classes=7, head_zeroinit=False)


def test_mixer_saves_to_timm_and_loads_back(tmp_path):
  mixer = vitjax.create_model("mixer", **MIXER)
  params = vitjax.init_params(mixer, rng=3)
  path = tmp_path / "mixer.safetensors"
  vitjax.save_weights(params, path, format="timm")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  state_dict = load_file(str(path))
  block = [f"blocks.{{i}}.{m}.{leaf}" for m in ("norm1", "norm2", "mlp_tokens.fc1",
                                                 "mlp_tokens.fc2", "mlp_channels.fc1",
                                                 "mlp_channels.fc2") for leaf in ("weight", "bias")]
  assert set(state_dict) == {*(name.format(i=i) for name in block for i in range(2)),
                             *(f"{m}.{leaf}" for m in ("stem.proj", "norm", "head")
                               for leaf in ("weight", "bias"))}
  assert state_dict["stem.proj.weight"].shape == (32, 3, 8, 8)  # PyTorch's (out, in, kh, kw).
  assert state_dict["blocks.0.mlp_tokens.fc1.weight"].shape == (24, 16)  # Linear's (out, in).
  chex.assert_trees_all_equal(vitjax.load_weights(mixer, path), dict(params))

  with pytest.raises(ValueError) as error:
    vitjax.save_weights(params, tmp_path / "mixer_hf.safetensors", format="hf")
  assert str(error.value) == ("MLP-Mixer parameters have no format='hf' export; they save with "
                              "format='big_vision' or 'timm'.")
