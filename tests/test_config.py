"""Config grammar: file.py:args, --config overrides, locked keys with suggestions."""

import os
import subprocess
import sys

import pytest

from vitjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def test_quickstart_has_the_documented_top_level_keys():
  config = config_lib.load_config(QUICKSTART)
  for key in ("seed", "batch_size", "total_steps", "eval_every", "checkpoint_every"):
    assert key in config
  assert config.model.name == "vit"


def test_colon_arguments_reach_get_config_typed():
  config = config_lib.load_config(QUICKSTART + ":steps=7,variant=Ti/4")
  assert config.total_steps == 7 and config.model.variant == "Ti/4"


def test_unknown_colon_argument_suggests():
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'steps'"):
    config_lib.load_config(QUICKSTART + ":stesp=7")


def test_overrides_are_typed_by_the_existing_value():
  config = config_lib.load_config(QUICKSTART)
  config_lib.apply_overrides(config, [
      "batch_size=32", "optimizer.learning_rate=0.5", "model.name=vit_tiny_patch16_224",
      "input.flip=true", "input.mean=(0.1,0.2,0.3)", "data_dir=/tmp/tfds"])
  assert config.batch_size == 32 and isinstance(config.batch_size, int)
  assert config.optimizer.learning_rate == 0.5
  assert config.model.name == "vit_tiny_patch16_224"
  assert config.input.flip is True
  assert tuple(config.input.mean) == (0.1, 0.2, 0.3)
  assert config.data_dir == "/tmp/tfds"
  # 'None' clears a string key (the error messages suggest `--config.init=None`).
  config_lib.apply_overrides(config, ["data_dir=None", "model.name=none"])
  assert config.data_dir is None and config.model.name is None


@pytest.mark.parametrize("override,match", [
    ("batch_szie=3", "Did you mean 'batch_size'"),
    ("optimizer.learning_rat=3", "Did you mean 'optimizer.learning_rate'"),
    ("model.widht=3", "Unknown config key 'model.widht'"),
])
def test_unknown_override_key_suggests(override, match):
  config = config_lib.load_config(QUICKSTART)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.apply_overrides(config, [override])


def test_wrongly_typed_override_is_an_error():
  config = config_lib.load_config(QUICKSTART)
  with pytest.raises(config_lib.ConfigError, match="cannot parse 'many' as one"):
    config_lib.apply_overrides(config, ["batch_size=many"])


def test_missing_config_file_is_explained():
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load_config("configs/nope.py")


@pytest.mark.parametrize("extra,message", [
    (["--config.batch_szie=3"], "batch_size"),
    (["--config.model.name=vit_bsae_patch16_224"], "vit_base_patch16_224"),
    (["--config.dataset=folder:/nonexistent/imagenet", "--config.input.image_size=16"],
     "error: config.dataset='folder:/nonexistent/imagenet': Image folder "
     "'/nonexistent/imagenet' does not exist"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, extra, message):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "vitjax.train", "--config", QUICKSTART, "--workdir", str(workdir)]
      + extra, capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not workdir.exists()
