"""Bad config values stop a run before it writes anything, with a message that names the fix."""

import os

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vitjax import config as config_lib
from vitjax.train import trainer
from vitjax.train import validation

import cli_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
# Eight entries of the one CPU device: enough for make_mesh to lay out 8-device meshes.
EIGHT_DEVICES = jax.devices()[:1] * 8


def quickstart(*overrides):
  config = config_lib.load_config(QUICKSTART)
  return config_lib.apply_overrides(config, list(overrides))


def validation_error(config, tmp_path, devices=None):
  """The ConfigError `validate` raises; checks that the workdir was not created."""
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError) as error:
    validation.validate(config, str(workdir), devices=devices)
  assert not workdir.exists()
  return str(error.value)


@pytest.mark.parametrize("spec", ["quickstart.py", "mae_digits.py", "simmim_digits.py",
                                  "transfer.py"])
def test_shipped_digits_configs_pass(tmp_path, spec):
  config = config_lib.load_config(os.path.join(ROOT, "configs", spec))
  validation.validate(config, str(tmp_path / "run"), devices=EIGHT_DEVICES)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,allowed,fix", [
    ("total_steps=-5", "an integer >= 1", "--config.total_steps=1000"),
    ("total_steps=0", "an integer >= 1", "--config.total_steps="),
    ("log_every=0", "an integer >= 1", "--config.log_every=50"),
    ("eval_every=-1", "an integer >= 0, or None (0 or None: only at the end)",
     "--config.eval_every="),
    ("checkpoint_every=-300", "an integer >= 0", "--config.checkpoint_every="),
    ("keep_checkpoints=0", "an integer >= 1", "--config.keep_checkpoints="),
    ("batch_size=0", "an integer >= 1", "--config.batch_size="),
    ("eval_batch_size=-1", "an integer >= 1", "--config.eval_batch_size="),
    ("grad_accum_steps=0", "an integer >= 1", "--config.grad_accum_steps=1"),
    ("label_smoothing=1.0", "a number in [0, 1)", "--config.label_smoothing="),
    ("label_smoothing=-0.1", "a number in [0, 1)", "--config.label_smoothing="),
    ("optimizer.learning_rate=-0.002", "a number > 0", "--config.optimizer.learning_rate="),
    ("optimizer.learning_rate=0", "a number > 0", "--config.optimizer.learning_rate="),
    ("optimizer.learning_rate=inf", "a number > 0", "--config.optimizer.learning_rate="),
    ("optimizer.weight_decay=-0.05", "a number >= 0", "--config.optimizer.weight_decay="),
    ("optimizer.warmup_steps=-1", "an integer >= 0", "--config.optimizer.warmup_steps="),
    ("optimizer.grad_clip_norm=-1", "a number >= 0", "--config.optimizer.grad_clip_norm="),
    ("optimizer.b2=1.0", "a number in [0, 1)", "--config.optimizer.b2="),
    ("optimizer.layer_decay=1.5", "a number in (0, 1]", "--config.optimizer.layer_decay="),
    ("optimizer.name=adamx", "one of 'adamw', 'sgd'", "--config.optimizer.name=adamw"),
    ("optimizer.schedule=cosin", "one of 'cosine', 'linear', 'constant'",
     "--config.optimizer.schedule=cosine"),
    ("init_head=keep", "'error', 'reinit'", "--config.init_head=reinit"),
    ("model.dropout=1.0", "a number in [0, 1)", "--config.model.dropout="),
    ("model.drop_path_rate=-0.1", "a number in [0, 1)", "--config.model.drop_path_rate="),
    ("model.image_size=0", "an integer >= 1", "--config.model.image_size="),
    ("model.num_classes=-1", "an integer >= 0", "--config.model.num_classes="),
    ("input.image_size=0", "an integer >= 1", "--config.input.image_size="),
    ("input.channels=2", "one of 1, 3", "--config.input.channels=3"),
    ("input.mixup_prob=1.5", "a number in [0, 1]", "--config.input.mixup_prob="),
    ("input.std=(0.5,0.0,0.5)", "numbers > 0", "--config.input.std="),
    ("input.inception_crop_scale=(0.5,0.1)", "min <= max", "--config.input.inception_crop_scale="),
    ("input.random_erasing_mode=pixels", "'pixel', 'rand', 'const'",
     "--config.input.random_erasing_mode=pixel"),
    ("optimizer.sam_rho=-0.05", "a number >= 0", "--config.optimizer.sam_rho=0.05"),
    ("ema.decay=1.0", "a number in (0, 1), or None (no EMA)", "--config.ema.decay=0.9998"),
    ("ema.decay=0", "a number in (0, 1)", "--config.ema.decay="),
    ("ema.warmup_gamma=0.0", "a number > 0", "--config.ema.warmup_gamma=1.0"),
    ("ema.warmup_power=-1.0", "a number > 0", "--config.ema.warmup_power=0.75"),
])
def test_out_of_range_values_name_key_value_range_and_fix(tmp_path, override, allowed, fix):
  key, _, _ = override.partition("=")
  config = quickstart(override)
  message = validation_error(config, tmp_path)
  value = config_lib.flatten(config)[key]
  assert message.startswith(f"config.{key}={value!r}: must be "), message
  assert allowed in message and fix in message


def test_more_warmup_than_steps_is_allowed_for_short_runs(tmp_path):
  # make_schedule clips the warmup; `configs/quickstart.py:steps=2` smoke runs rely on it.
  validation.validate(quickstart("total_steps=2", "optimizer.warmup_steps=100"),
                      str(tmp_path / "run"))


def test_token_merging_settings_pass(tmp_path):
  for overrides in (["model.token_merging.r=2"],
                    ["model.token_merging.method=evit", "model.token_merging.keep_rate=0.7"]):
    validation.validate(quickstart(*overrides), str(tmp_path / "run"))


def test_zero_means_off_for_eval_and_checkpoint_intervals(tmp_path):
  validation.validate(quickstart("eval_every=0", "checkpoint_every=0"), str(tmp_path / "run"))


def test_unknown_task_and_sharding_preset_suggest_names(tmp_path):
  assert "Did you mean 'supervised'" in validation_error(quickstart("task=supervisd"), tmp_path)
  message = validation_error(quickstart("sharding=fsdpp"), tmp_path)
  assert "config.sharding 'fsdpp'" in message and "fsdp_tp" in message


# The mesh and the batch sizes, on 8 devices.


@pytest.mark.parametrize("overrides,fix", [
    (["mesh.data=3"], "--config.mesh.data=-1"),  # 3 of 8 devices: 5 idle.
    (["mesh.fsdp=3"], "--config.mesh.fsdp=1"),  # data=-1 would take 8 / 3 devices.
    (["mesh.data=16"], "--config.mesh.data=-1"),
])
def test_mesh_that_does_not_divide_the_devices(tmp_path, overrides, fix):
  message = validation_error(quickstart(*overrides), tmp_path, devices=EIGHT_DEVICES)
  assert message.startswith("config.mesh=") and "does not divide the 8 devices" in message
  assert fix in message
  # The devices are CPUs: the message says how to have more of them.
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in message


def test_the_cpu_device_count_hint_is_for_cpus_only():
  class Gpu:  # What the check reads of a device before it fails.
    platform = "gpu"

  with pytest.raises(config_lib.ConfigError) as error:
    validation.check_mesh_and_batch_sizes(quickstart("mesh.data=3"), [Gpu()] * 8)
  assert "does not divide the 8 devices" in str(error.value)
  assert "XLA_FLAGS" not in str(error.value)


@pytest.mark.parametrize("override,match", [
    ("mesh.tensor=0", "config.mesh.tensor=0: must be a positive integer, or -1"),
    ("mesh.fsdp=-1", "at most one axis may be -1"),
])
def test_mesh_sizes_are_positive_or_minus_one(tmp_path, override, match):
  assert match in validation_error(quickstart(override), tmp_path, devices=EIGHT_DEVICES)


def test_batch_sizes_must_split_over_batch_devices_and_micro_batches(tmp_path):
  message = validation_error(quickstart("batch_size=100"), tmp_path, devices=EIGHT_DEVICES)
  assert "config.batch_size=100 must be divisible by grad_accum_steps=1 x the 8 devices" in message
  assert "--config.batch_size=96" in message
  message = validation_error(quickstart("batch_size=128", "grad_accum_steps=3"), tmp_path)
  assert "divisible by grad_accum_steps=3 x the 1 devices" in message
  message = validation_error(quickstart("eval_batch_size=100"), tmp_path,
                             devices=EIGHT_DEVICES)
  assert "config.eval_batch_size=100 must be divisible by the 8 devices" in message
  assert "--config.eval_batch_size=104" in message
  # Fitting sizes on a 2 x 4 mesh: the batch is split over data and fsdp, 8 ways.
  validation.validate(quickstart("mesh.fsdp=2", "eval_batch_size=360"), str(tmp_path / "run"),
                      devices=EIGHT_DEVICES)


# Parameter-name patterns, checked on shapes alone.


@pytest.mark.parametrize("override,match", [
    ("optimizer.freeze=encoder_block",
     "config.optimizer.freeze pattern 'encoder_block' matches no parameter"),
    ("optimizer.freeze=.", "config.optimizer.freeze='.' freezes every parameter"),
    ("optimizer.lr_multipliers=(('nope',2.0),)",
     "config.optimizer.lr_multipliers pattern 'nope' matches no parameter"),
])
def test_parameter_patterns_must_match(tmp_path, override, match):
  message = validation_error(quickstart(override), tmp_path)
  assert match in message
  assert "Transformer/" in message or "Narrow the pattern" in message  # How to fix it.


@pytest.mark.parametrize("override, match", [
    ("model.variant=Q/16", "config.model: Unknown ViT variant 'Q/16': expected SIZE/PATCH"),
    ("model.pool_type=tok", "config.model: Unknown pool_type 'tok'; use one of: 'token', 'gap'"),
    ("model.variant=mu/5", "16x16 images are not a whole number of 5x5 patches"),
    ("model.token_merging.method=tomee", "Unknown token_merging method 'tomee'; use one of"),
    ("model.token_merging.r=-2", "token_merging r=-2: must be an int >= 0"),
])
def test_model_options_the_model_rejects_when_it_runs(tmp_path, override, match):
  """Checked by tracing the model's init: no longer a traceback from inside the model."""
  assert match in validation_error(quickstart(override), tmp_path)


def test_matching_patterns_and_layer_decay_pass(tmp_path):
  validation.validate(quickstart("optimizer.freeze=^embedding/", "optimizer.layer_decay=0.75",
                                 "optimizer.lr_multipliers=(('^head/',10.0),)"),
                      str(tmp_path / "run"))


# Datasets.


def test_digits_split_and_num_classes(tmp_path):
  message = validation_error(quickstart("train_split=trian"), tmp_path)
  assert message.startswith("config.train_split='trian': ") and "'train', 'test'" in message
  message = validation_error(quickstart("model.num_classes=5"), tmp_path)
  assert "config.model.num_classes=5 but dataset 'digits' has 10 classes" in message
  assert "--config.model.num_classes=10" in message
  # A wider head than the labels need trains; it is allowed.
  validation.validate(quickstart("model.num_classes=20", "eval_split=test[:50%]"),
                      str(tmp_path / "run"))


def test_input_config_errors_name_the_key(tmp_path):
  message = validation_error(quickstart("input.crop_pct=2.0"), tmp_path)
  assert message.startswith("config.input.crop_pct must be in (0, 1]")


def test_misspelled_tfds_dataset_suggests_registered_names(tmp_path):
  message = validation_error(quickstart("dataset=mnsit"), tmp_path)
  assert message.startswith("config.dataset='mnsit': ") and "'mnist'" in message


def test_unprepared_tfds_dataset_says_where_and_how(tmp_path):
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  message = validation_error(quickstart("dataset=mnist", f"data_dir={data_dir}"), tmp_path)
  assert message.startswith(f"config.dataset='mnist' with config.data_dir='{data_dir}'")
  assert f"tfds build mnist --data_dir {data_dir} --file_format array_record" in message
  assert os.listdir(data_dir) == []


class VitjaxValidationClasses(tfds.core.GeneratorBasedBuilder):
  """Six 4x4 grayscale PNGs in 3 classes, a train and a test split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 1)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(6)),
            "test": self._generate_examples(range(3))}

  def _generate_examples(self, values):
    for value in values:
      yield value, {"image": Image.fromarray(np.full((4, 4), value, np.uint8)),
                    "label": value % 3}


def test_prepared_tfds_dataset_splits_and_classes(tmp_path):
  data_dir = str(tmp_path / "tfds")
  VitjaxValidationClasses(data_dir=data_dir, file_format="array_record").download_and_prepare()
  base = ["dataset=vitjax_validation_classes", f"data_dir={data_dir}", "input.image_size=4",
          "input.random_crop_padding=0", "model.image_size=4", "model.num_classes=3",
          "batch_size=2", "eval_batch_size=3"]
  validation.validate(quickstart(*base, "train_split=train[:50%]"), str(tmp_path / "run"))
  message = validation_error(quickstart(*base, "eval_split=validation"), tmp_path)
  assert message.startswith("config.eval_split='validation' is not a split of "
                            "'vitjax_validation_classes'")
  assert "'train'" in message and "'test'" in message
  message = validation_error(quickstart(*base, "model.num_classes=2"), tmp_path)
  assert "--config.model.num_classes=3" in message


# Weights to start from, and the workdir.


def test_init_paths_must_exist(tmp_path):
  missing = str(tmp_path / "missing.npz")
  message = validation_error(quickstart(f"init={missing}"), tmp_path)
  assert message.startswith(f"config.init={missing!r} does not exist")
  assert "config.init=None to start from scratch" in message
  existing = tmp_path / "weights.npz"
  existing.write_bytes(b"")  # Read later, by the trainer: validation only checks it is there.
  validation.validate(quickstart(f"init={existing}"), str(tmp_path / "run"))
  config = quickstart()
  with config.unlocked():
    config.init_weights = str(existing)  # Its old name: no longer read, so an error.
  assert (validation_error(config, tmp_path)
          == "config.init_weights is not a vitjax key: set config.init instead.")


def test_ema_keys_are_known_ones_and_valid_settings_pass(tmp_path):
  config = quickstart()
  with config.unlocked():
    config.ema.decy = 0.999  # A typo in a config file (on the command line: unknown key).
  assert validation_error(config, tmp_path).startswith(
      "config.ema.decy is not a key of config.ema (its keys: decay, warmup, warmup_gamma, "
      "warmup_power). Did you mean config.ema.decay?")
  assert validation_error(quickstart("aux_loss_weights={'load_balance':-1}"), tmp_path) == (
      "config.aux_loss_weights={'load_balance': -1}: must be a dict {name: weight >= 0}, or "
      "None (all 1.0). Set it in the config file or on the command line, e.g. "
      "--config.aux_loss_weights=\"{'load_balance':0.01}\".")
  validation.validate(quickstart("ema.decay=0.9998", "ema.warmup=True", "optimizer.sam_rho=0.05",
                                 "aux_loss_weights={'load_balance':0.01}"),
                      str(tmp_path / "run"))


def test_workdir_that_is_a_file_or_under_a_file(tmp_path):
  file = tmp_path / "file.txt"
  file.write_text("not a directory")
  config = quickstart()
  with pytest.raises(config_lib.ConfigError, match="is an existing file, not a directory"):
    validation.validate(config, str(file))
  with pytest.raises(config_lib.ConfigError, match=f"cannot be created, {file} is a file"):
    validation.validate(config, str(file / "run"))
  assert file.read_text() == "not a directory"


def test_train_validates_before_writing(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.total_steps=-5"):
    trainer.train(quickstart("total_steps=-5"), str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("total_steps=-5", "config.total_steps=-5: must be an integer >= 1"),
    ("log_every=0", "config.log_every=0: must be an integer >= 1"),
    ("optimizer.freeze=encoder_block", "pattern 'encoder_block' matches no parameter"),
    ("model.num_classes=5", "--config.model.num_classes=10"),
    ("ema.decy=0.99", "Unknown config key 'ema.decy'. Did you mean 'ema.decay'?"),
    ("model.token_merging.rr=2", "Did you mean 'model.token_merging.r',"),
])
def test_cli_bad_value_exits_2_and_writes_nothing(tmp_path, override, message):
  cli_checks.assert_train_rejects("configs/quickstart.py", override, tmp_path / "w",
                                  contains=message)
