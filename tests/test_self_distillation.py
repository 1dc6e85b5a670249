"""DINO / iBOT / DINOv2 (task='dino') and I-JEPA (task='ijepa'): the heads, the schedules,
the task state's bitwise resume, the teacher's weights for fine-tuning, and the errors a
user sees."""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import vitjax
from vitjax import config as config_lib
from vitjax import models
from vitjax import train as train_lib
from vitjax.models import dino
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train import metrics as metrics_lib
from vitjax.train.tasks import self_distillation

from cli_checks import assert_train_rejects
from test_faults import restore_state as saved_state  # The whole saved state, as numpy.
from test_train_state import train_preempted_then_resumed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BACKBONE = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
TINY_HEAD = dict(head_out_dim=32, head_hidden_dim=24, head_bottleneck_dim=8)


# The head, against DINO's as PyTorch writes it (an MLP, F.normalize, a weight-normalised
# Linear without bias whose gain is 1 and frozen with norm_last_layer).

def torch_dino_head(params, norm_last_layer):
  mlp = []
  names = sorted((n for n in params if n.startswith("mlp_")), key=lambda n: int(n[4:]))
  for i, name in enumerate(names):
    layer = torch.nn.Linear(*params[name]["kernel"].shape)
    layer.weight.data = torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy())
    layer.bias.data = torch.from_numpy(np.asarray(params[name]["bias"]).copy())
    mlp += [layer] + ([torch.nn.GELU()] if i < len(names) - 1 else [])
  v = np.asarray(params["kernel_v"])
  last = torch.nn.utils.parametrizations.weight_norm(
      torch.nn.Linear(v.shape[0], v.shape[1], bias=False))
  last.parametrizations.weight.original1.data = torch.from_numpy(v.T.copy())
  gain = np.ones((v.shape[1], 1), np.float32) if norm_last_layer else np.asarray(
      params["kernel_g"])[:, None]
  last.parametrizations.weight.original0.data = torch.from_numpy(gain)
  mlp = torch.nn.Sequential(*mlp)
  return lambda x: last(torch.nn.functional.normalize(mlp(x), dim=-1, p=2))


@pytest.mark.parametrize("norm_last_layer,num_layers", [(True, 3), (False, 2), (True, 1)])
def test_the_head_is_dinos_mlp_and_weight_normalised_prototypes(norm_last_layer, num_layers):
  head = dino.DINOHead(out_dim=12, hidden_dim=20, bottleneck_dim=6, num_layers=num_layers,
                       norm_last_layer=norm_last_layer)
  x = jax.random.normal(jax.random.key(0), (5, 16))
  params = nn.unbox(jax.jit(head.init)(jax.random.key(1), x)["params"])
  if not norm_last_layer:  # A gain that is not all ones, so that it is checked.
    params["kernel_g"] = params["kernel_g"] * jnp.linspace(0.5, 2.0, 12)
  assert ("kernel_g" in params) == (not norm_last_layer)
  got = head.apply({"params": params}, x)
  with torch.no_grad():
    want = torch_dino_head(jax.device_get(params), norm_last_layer)(
        torch.from_numpy(np.asarray(x))).numpy()
  chex.assert_trees_all_close(np.asarray(got), want, atol=1e-5)


def test_dino_model_heads_masks_and_smaller_crops():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  for patch_head, heads in ((None, {"dino_head"}), ("shared", {"dino_head"}),
                            ("separate", {"dino_head", "ibot_head"})):
    model = models.create_model("dino", variant="mu/4", image_size=16, patch_head=patch_head,
                                **TINY_BACKBONE, **TINY_HEAD, patch_out_dim=20)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), images)["params"])
    assert {name for name in params if "head" in name} == heads
    assert ("mask_token" in params) == bool(patch_head)
    logits, out = model.apply({"params": params}, images)
    chex.assert_shape(logits, (2, 32))
    chex.assert_shape(out["pre_logits"], (2, 16))
    if patch_head:
      chex.assert_shape(out["patch_logits"], (2, 16, 20 if patch_head == "separate" else 32))
    # A local crop of 8 px: 4 patches, the position embeddings resized.
    local_logits, _ = model.apply({"params": params}, images[:, :8, :8])
    chex.assert_shape(local_logits, (2, 32))
  # Every patch masked: the output no longer depends on the image.
  params = dict(params, mask_token=jnp.ones_like(params["mask_token"]))
  everything = jnp.ones((2, 16), bool)
  a, _ = model.apply({"params": params}, images, mask=everything)
  b, _ = model.apply({"params": params}, images[::-1], mask=everything)
  chex.assert_trees_all_close(a, b, atol=1e-6)
  c, _ = model.apply({"params": params}, images[::-1])
  assert not np.allclose(a, c, atol=1e-3)


def test_schedules_follow_dino_and_ijepa():
  cosine = lambda step: float(self_distillation.teacher_momentum(step, 100, 0.996))
  assert cosine(0) == pytest.approx(0.996) and cosine(100) == pytest.approx(1.0)
  assert cosine(50) == pytest.approx(0.998)
  linear = lambda step: float(self_distillation.teacher_momentum(step, 100, 0.996, "linear"))
  assert linear(25) == pytest.approx(0.997)
  temperature = lambda step: float(self_distillation.warmup_temperature(step, 0.04, 0.07, 30))
  assert [temperature(s) for s in (0, 15, 30, 90)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
  teacher = {"w": jnp.zeros(3)}
  updated = self_distillation.update_teacher(teacher, {"w": jnp.ones(3, jnp.bfloat16)}, 0.9)
  chex.assert_trees_all_close(updated, {"w": jnp.full(3, 0.1)})
  assert updated["w"].dtype == jnp.float32


# Training, through the trainer: tiny models, a few steps.

def tiny_config(config_file, *overrides, evaluators=(("knn", {}),)):
  config = config_lib.load_config(os.path.join(ROOT, "configs", config_file))
  with config.unlocked():
    config.evaluators = dict(evaluators)
    config.model.update(TINY_BACKBONE)
    if config.task == "dino":
      config.model.update(TINY_HEAD)
    else:
      config.model.update(predictor_width=8, predictor_depth=1, predictor_num_heads=2)
  config_lib.apply_overrides(config, [
      "batch_size=8", "total_steps=4", "optimizer.warmup_steps=1", "log_every=1",
      "eval_every=0", "checkpoint_every=2", "keep_checkpoints=3", "eval_batch_size=360",
      *overrides])
  return config


@pytest.mark.parametrize("config_file,arguments,teacher", [
    ("dino_digits.py", "method=ibot,local_crops=2", "teacher"),
    ("ijepa_digits.py", "", "target_encoder"),
])
def test_teacher_and_centres_resume_bitwise_and_the_teacher_loads_for_fine_tuning(
    tmp_path, monkeypatch, config_file, arguments, teacher):
  config = tiny_config(f"{config_file}:{arguments}" if arguments else config_file)
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  straight = train_lib.train(config, straight_dir, progress=False)
  state = saved_state(straight_dir, 4)
  resumed = train_preempted_then_resumed(config, resumed_dir, monkeypatch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, saved_state(resumed_dir, 4), state)
  prefix = "eval_teacher" if teacher == "teacher" else "eval_target"
  assert resumed[f"{prefix}/knn/top1"] == straight[f"{prefix}/knn/top1"]
  assert 0.0 <= straight["eval/knn/top1"] <= 1.0

  task = state["task"]
  assert set(task) == ({"teacher", "center", "patch_center"} if teacher == "teacher"
                       else {"target_encoder"})
  # The teacher moved away from its start (the student's initialisation) but is not the
  # student: an EMA.
  first = saved_state(straight_dir, 2)["task"][teacher]
  leaf = lambda tree: np.asarray(tree["Transformer"]["encoder_norm"]["scale"])
  assert not np.array_equal(leaf(first), leaf(task[teacher]))
  assert not np.allclose(leaf(task[teacher]), leaf(state["params"]), atol=1e-7)
  if teacher == "teacher":
    assert np.abs(task["center"]).sum() > 0 and np.abs(task["patch_center"]).sum() > 0

  # Fine-tuning: a plain ViT gets the teacher's backbone ('WORKDIR:teacher'), or the
  # student's (the workdir alone), without the heads, predictor or mask token.
  pool = "token" if teacher == "teacher" else "gap"
  posemb = "learn" if teacher == "teacher" else "sincos2d"
  vit = models.create_model("vit", variant="mu/4", image_size=16, num_classes=10,
                            pool_type=pool, posemb=posemb, **TINY_BACKBONE)
  loaded = vitjax.load_weights(vit, f"{straight_dir}:{teacher}", head="reinit")
  chex.assert_trees_all_equal(loaded["Transformer"], task[teacher]["Transformer"])
  student = vitjax.load_weights(vit, straight_dir, head="reinit")
  chex.assert_trees_all_equal(student["Transformer"], state["params"]["Transformer"])
  with pytest.raises(vitjax.convert.CheckpointError, match="holds no 'ema'|no EMA"):
    vitjax.load_weights(vit, f"{straight_dir}:ema")


def test_collapse_monitors_and_losses_are_logged_every_step(tmp_path):
  config = tiny_config("dino_digits.py:method=dinov2,local_crops=2", "total_steps=2",
                       evaluators=())
  workdir = tmp_path / "run"
  train_lib.train(config, str(workdir), progress=False)
  rows = [r for r in metrics_lib.read_metrics(str(workdir / "metrics.jsonl"))
          if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for row in rows:
    for key in ("loss_dino", "loss_ibot", "loss_koleo", "teacher_entropy",
                "teacher_mean_entropy", "teacher_student_kl", "teacher_temperature",
                "teacher_momentum"):
      assert np.isfinite(row[f"train/{key}"]), key
    # Sinkhorn-Knopp spreads the teacher's batch over the prototypes: the batch-mean
    # distribution is near uniform (entropy near log K).
    assert row["train/teacher_mean_entropy"] > 0.8 * np.log(32)


@pytest.mark.parametrize("config,override,message", [
    ("configs/dino_digits.py", "dino.teacher_temprature=0.04",
     "Did you mean 'dino.teacher_temperature'"),
    ("configs/dino_digits.py", "dino.centering=sinkhorn",
     "config.dino.centering='sinkhorn': use one of 'center', 'sinkhorn_knopp'"),
    ("configs/dino_digits.py", "dino.ibot_weight=1.0",
     "set config.model.patch_head='shared'"),
    ("configs/dino_digits.py", "task=supervised",
     "config.input.multicrop makes batches of several crops per image"),
    ("configs/ijepa_digits.py", "input.multicrop.mask_patch_size=8",
     "set config.input.multicrop.mask_patch_size=4"),
])
def test_bad_values_are_one_line_and_exit_status_2(tmp_path, config, override, message):
  assert_train_rejects(config, override, tmp_path / "run", contains=message)


def test_a_missing_teacher_is_named(tmp_path):
  config = config_lib.load_config(os.path.join(ROOT, "configs", "quickstart.py"))
  config_lib.apply_overrides(config, ["total_steps=1", "batch_size=8", "eval_every=0",
                                      "model.variant=mu/4"])
  with config.unlocked():
    config.evaluators = {}
  with config.unlocked():
    config.model.update(TINY_BACKBONE)
  workdir = str(tmp_path / "run")
  train_lib.train(config, workdir, progress=False)
  with pytest.raises(checkpoints_lib.CheckpointError, match="holds no 'teacher' weights"):
    checkpoints_lib.load_params_and_step(workdir, item="teacher")
  # Through the command line: a misspelt or missing item is one line, exit status 2.
  finetune = "configs/mae_finetune_digits.py:init="
  assert_train_rejects(f"{finetune}{workdir}:teachr", "total_steps=2", tmp_path / "a",
                       contains="has no weights named 'teachr'")
  assert_train_rejects(f"{finetune}{workdir}:teacher", "total_steps=2", tmp_path / "b",
                       contains="holds no 'teacher' weights")
