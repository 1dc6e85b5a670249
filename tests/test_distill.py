"""DeiT distillation: the hard / soft losses, the task end to end through the trainer, errors."""

import json
import os

import jax
import numpy as np
import pytest

import vitjax
from vitjax import config as config_lib
from vitjax import data as data_lib
from vitjax import train as train_lib
from vitjax.models import param_shapes
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train.tasks import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEIT_DIGITS = os.path.join(ROOT, "configs", "deit_digits.py")
TINY = dict(variant="mu/4", width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4)
TEACHER_CLASS = 3


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_hard_and_soft_distillation_losses_equal_hand_computation():
  rng = np.random.default_rng(0)
  cls, dist, teacher = (rng.standard_normal((4, 5)).astype(np.float32) for _ in range(3))
  labels = np.array([0, 2, 4, 1])
  targets = np.eye(5, dtype=np.float32)[labels]
  ce = lambda logits, y: -np.mean(log_softmax(logits)[np.arange(len(y)), y])
  loss_fn = jax.jit(distill.distillation_loss, static_argnames=("kind",))

  loss, parts = loss_fn(cls, dist, teacher, targets, kind="hard")
  expected = 0.5 * ce(cls, labels) + 0.5 * ce(dist, teacher.argmax(-1))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(parts["loss_dist"], ce(dist, teacher.argmax(-1)), rtol=1e-5)

  alpha, tau = 0.3, 2.5
  loss, _ = loss_fn(cls, dist, teacher, targets, kind="soft", alpha=alpha, tau=tau)
  p_teacher = np.exp(log_softmax(teacher / tau))
  kl = np.sum(p_teacher * (log_softmax(teacher / tau) - log_softmax(dist / tau)), -1).mean()
  np.testing.assert_allclose(loss, (1 - alpha) * ce(cls, labels) + alpha * tau ** 2 * kl,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="'hard', 'soft'"):
    distill.distillation_loss(cls, dist, teacher, targets, kind="medium")


def random_params(model, seed=0):
  """Normal(0, 0.02) parameters of the model's shapes (no init to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: 0.02 * rng.standard_normal(x.shape, np.float32),
                                param_shapes(model))


def teacher_model(**overrides):
  """The teacher of `distill_config`: 16 px (twice the student's), global average pooling."""
  return vitjax.create_model("vit", **{**TINY, **overrides}, image_size=16, num_classes=10,
                             pool_type="gap")


def constant_teacher(path):
  """A teacher whose head always says TEACHER_CLASS, saved to `path`; returns its params.

  All weights are zero (every token, norm and pooled feature is 0) except the head's
  bias, so its logits are that bias whatever the image.
  """
  params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype),
                                  param_shapes(teacher_model()))
  params["head"]["bias"] = 5.0 * np.eye(10, dtype=np.float32)[TEACHER_CLASS]
  vitjax.save_weights(params, path)
  return params


def distill_config(teacher_path, **overrides):
  """An 8 px student, hard-distilled from the 16 px teacher of `constant_teacher`."""
  config = config_lib.load_config(f"{DEIT_DIGITS}:steps=8,teacher={teacher_path}")
  config_lib.apply_overrides(config, [
      "input.image_size=8", "input.random_crop_padding=1", "model.image_size=8",
      "batch_size=32", "log_every=1", "optimizer.warmup_steps=1",
      "optimizer.learning_rate=0.01", "distill.type=hard"]
                            + [f"{k}={v}" for k, v in overrides.items()])
  with config.unlocked():
    config.model.update(TINY)
    config.teacher.model.update(TINY)
  return config


def test_distillation_trains_the_dist_head_on_the_teacher_through_the_trainer(
    tmp_path, monkeypatch):
  teacher_path = str(tmp_path / "teacher.npz")
  teacher_params = constant_teacher(teacher_path)
  config = distill_config(teacher_path)
  prepared = []
  original_prepare = distill.Distillation.prepare
  monkeypatch.setattr(distill.Distillation, "prepare", lambda *args: prepared.append(
      original_prepare(*args)) or prepared[-1])
  result = train_lib.train(config, str(tmp_path / "run"), progress=False)

  with open(result["metrics"]) as f:
    rows = [row for row in map(json.loads, f) if "train/loss" in row]
  assert [row["step"] for row in rows] == list(range(1, 9))
  # The teacher ran with the loaded weights, resized input and all: it always says 3.
  batches = data_lib.get_dataset(config).train_iter(config.batch_size, seed=config.seed)
  for row in rows:
    labels = next(batches)["label"]
    assert row["train/teacher_accuracy"] == pytest.approx(np.mean(labels == TEACHER_CLASS))
  assert rows[-1]["train/dist_head_agreement"] == 1.0
  # Frozen: after 8 steps the teacher's parameters are still the file's.
  jax.tree_util.tree_map(np.testing.assert_array_equal, teacher_params,
                         jax.device_get(prepared[0]["teacher"]))

  # The student's distillation head learned the teacher's answer, its class head the labels.
  params = checkpoints_lib.load_params(str(tmp_path / "run"))
  assert "head_dist" in params and "teacher" not in params
  student = train_lib.build_model(config)
  images = next(data_lib.get_dataset(config).eval_iter(360))["image"]
  _, out = jax.jit(student.apply)({"params": params}, images)
  assert np.mean(np.argmax(out["logits_dist"], -1) == TEACHER_CLASS) == 1.0
  assert np.mean(np.argmax(out["logits_cls"], -1) == TEACHER_CLASS) < 0.5


def test_student_without_distillation_token_is_a_clear_error(tmp_path):
  config = distill_config(str(tmp_path / "unused.npz"), **{"model.distilled": False})
  with pytest.raises(ValueError, match="config.model.distilled=True"):
    distill.Distillation(config).build_model()


def test_teacher_with_other_classes_is_a_clear_error(tmp_path):
  config = distill_config(str(tmp_path / "unused.npz"), **{"teacher.model.num_classes": 7})
  with pytest.raises(ValueError, match="teacher predicts 7 classes and the student 10"):
    distill.Distillation(config).build_model()


def test_teacher_from_a_training_workdir_and_a_mismatched_one(tmp_path):
  teacher = teacher_model()
  params = random_params(teacher, seed=2)
  checkpointer = checkpoints_lib.Checkpointer(str(tmp_path))
  checkpointer.save(5, {"params": params, "step": np.int32(5)})
  checkpointer.close()
  loaded = distill.load_teacher_params(teacher, str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)

  with pytest.raises(ValueError, match="Shapes differ"):
    distill.load_teacher_params(teacher_model(width=24), str(tmp_path))


def test_teacher_input_is_resized_and_renormalised():
  config = distill_config("unused", **{"teacher.mean": "(0.0,0.0,0.0)",
                                       "teacher.std": "(1.0,1.0,1.0)"})
  task = distill.Distillation(config)
  task.teacher = teacher_model()  # 16 px; build_model() would also load its weights.
  student_images = np.full((2, 8, 8, 3), -0.5, np.float32)  # Student's (x - 0.5) / 0.5.
  teacher_images = np.asarray(task.teacher_input(student_images))
  assert teacher_images.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(teacher_images, 0.25)  # The pixels, (x - 0) / 1.
