"""Train state beyond the parameters: the EMA, a task's own state, aux losses, SAM."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vitjax
from vitjax import config as config_lib
from vitjax import data as data_lib
from vitjax import train as train_lib
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train import optim
from vitjax.train import tasks
from vitjax.train import trainer
from vitjax.train.tasks import supervised

from test_faults import restore_state as saved_state  # The whole saved state, as numpy.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TOY_MODEL = "test_train_state_toy"


class ToyClassifier(nn.Module):
  """A linear classifier of the pixels, with an aux loss: the mean squared weight."""
  num_classes: int = 10
  image_size: int = 8
  with_aux_loss: bool = True

  @nn.compact
  def __call__(self, images, train=False):
    del train
    features = images.reshape(images.shape[0], -1)
    logits = nn.Dense(self.num_classes, name="head")(features)
    out = {"pre_logits": features}
    if self.with_aux_loss:
      out["aux_loss"] = {"toy": jnp.mean(jnp.square(self.variables["params"]["head"]["kernel"]))}
    return logits, out


if TOY_MODEL not in vitjax.models.list_models():
  vitjax.models.register(TOY_MODEL, ToyClassifier)


class CountingTask(supervised.Supervised):
  """Supervised, with a state of its own: examples seen, the sum of the micro-batch
  losses (updated in the loss), and the updates made (updated after each)."""

  def init_state(self, model, params, rng):
    return {"examples": jnp.zeros((), jnp.int32), "loss_sum": jnp.zeros((), jnp.float32),
            "updates": jnp.zeros((), jnp.int32)}

  def stateful_loss(self, model, params, task_state, batch, rng, constants, step):
    loss, metrics = self.loss(model, params, batch, rng, constants, step)
    return loss, metrics, {**task_state,
                           "examples": task_state["examples"] + batch["image"].shape[0],
                           "loss_sum": task_state["loss_sum"] + loss}

  def update_state(self, task_state, params, step):
    return {**task_state, "updates": task_state["updates"] + 1}


@pytest.fixture
def counting_task(monkeypatch):
  monkeypatch.setitem(tasks.TASKS, "counting", f"{__name__}:CountingTask")


def toy_config(*overrides):
  config = config_lib.load_config(QUICKSTART + ":image_size=8")
  with config.unlocked():
    config.model = dict(name=TOY_MODEL, num_classes=10, image_size=8)
  config_lib.apply_overrides(config, [
      "batch_size=16", "eval_batch_size=120", "total_steps=6", "log_every=1",
      "eval_every=3", "checkpoint_every=2", "keep_checkpoints=10",
      "optimizer.warmup_steps=2", *overrides])
  return config


def rows(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


class _Preempted(Exception):
  pass


def test_ema_decay_follows_timms_warmup_rule():
  plain = trainer.StepOptions(ema_decay=0.99)
  warm = plain._replace(ema_warmup=True)
  assert float(trainer.ema_decay(plain, jnp.int32(0))) == pytest.approx(0.99)
  # timm ModelEmaV3.get_decay: 1 - (1 + step / gamma) ** -power with its step = updates - 1.
  expected = [min(0.99, 1 - (1 + step) ** -0.75) for step in (0, 1, 10, 10_000)]
  assert expected[0] == 0.0 and expected[-1] == 0.99
  got = [float(trainer.ema_decay(warm, jnp.int32(step))) for step in (0, 1, 10, 10_000)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  ema = trainer.update_ema({"w": jnp.zeros(2)}, {"w": jnp.ones(2, jnp.bfloat16)}, 0.75)
  assert ema["w"].dtype == jnp.float32 and np.allclose(ema["w"], 0.25)


def _toy_step_inputs(sam_rho):
  config = toy_config("optimizer.schedule=constant", "optimizer.warmup_steps=0",
                      "optimizer.grad_clip_norm=0", f"optimizer.sam_rho={sam_rho}")
  model = train_lib.build_model(config)
  params = vitjax.init_params(model)
  tx, _ = optim.make_optimizer(config, params)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  images = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
  batch = {"image": images, "label": jnp.arange(8) % 10}
  task = supervised.Supervised(config)
  step = jax.jit(lambda s: trainer._train_step(  # pylint: disable=protected-access
      model, tx, task, trainer.step_options(config), s, batch, jax.random.PRNGKey(2), {}))
  return model, task, tx, state, batch, step


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
def test_sam_update_equals_hand_computation(sam_rho):
  model, task, tx, state, batch, step = _toy_step_inputs(sam_rho)
  new_state, metrics = step(state)
  step_rng = jax.random.fold_in(jax.random.PRNGKey(2), 0)
  loss_fn = lambda p: task.training_loss(model, p, {}, batch, step_rng, {}, 0)[0]
  params = state["params"]
  loss, grads = jax.value_and_grad(loss_fn)(params)
  if sam_rho:
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads)))
    nearby = jax.tree_util.tree_map(lambda p, g: p + sam_rho * g / norm, params, grads)
    grads = jax.grad(loss_fn)(nearby)
  # Plain AdamW (rho 0), or AdamW on the gradient at the perturbed point.
  updates, _ = optax.adamw(2e-3, b1=0.9, b2=0.999, weight_decay=0.05,
                           mask=optim.decay_mask(params)).update(
                               grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         new_state["params"], expected)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)  # The unperturbed pass.
  if sam_rho:
    _, _, _, _, _, plain_step = _toy_step_inputs(0.0)
    plain = plain_step(state)[0]["params"]["head"]["kernel"]
    assert not np.allclose(plain, new_state["params"]["head"]["kernel"])


def test_aux_losses_are_weighted_into_the_loss_and_logged():
  config = toy_config("aux_loss_weights={'toy': 0.5}")
  model = train_lib.build_model(config)
  params = vitjax.init_params(model)
  task = supervised.Supervised(config)
  batch = {"image": jnp.ones((4, 8, 8, 3)), "label": jnp.arange(4)}
  rng = jax.random.PRNGKey(0)
  loss, (metrics, task_state) = task.training_loss(model, params, {}, batch, rng, {}, 0)
  task_loss, _ = task.loss(model, params, batch, rng, {}, 0)  # The task's own, alone.
  toy = float(jnp.mean(jnp.square(params["head"]["kernel"])))
  assert float(metrics["aux_loss/toy"]) == pytest.approx(toy)
  assert float(loss) == pytest.approx(float(task_loss) + 0.5 * toy)
  assert task_state == {}
  unweighted = supervised.Supervised(toy_config())
  assert float(unweighted.training_loss(model, params, {}, batch, rng, {}, 0)[0]) == (
      pytest.approx(float(task_loss) + toy))  # A name without a weight: 1.0.
  misspelt = supervised.Supervised(toy_config("aux_loss_weights={'tyo': 0.5}"))
  with pytest.raises(config_lib.ConfigError, match=r"names 'tyo', but the model returns "
                     r"the aux losses \['toy'\]"):
    misspelt.training_loss(model, params, {}, batch, rng, {}, 0)


def train_preempted_then_resumed(config, workdir, monkeypatch):
  """Trains `config` in `workdir`, stopped by an exception after its 3rd batch (past the
  checkpoint of step 2 with checkpoint_every=2), then resumed to the end; the result."""
  dataset_class = type(data_lib.get_dataset(config))
  original = dataset_class.train_iter

  def preempted_after_3(self, *args, **kwargs):
    for i, batch in enumerate(original(self, *args, **kwargs)):
      if i == 3:
        raise _Preempted()
      yield batch

  monkeypatch.setattr(dataset_class, "train_iter", preempted_after_3)
  with pytest.raises(_Preempted):
    train_lib.train(config, workdir, progress=False)
  monkeypatch.setattr(dataset_class, "train_iter", original)
  return train_lib.train(config, workdir, progress=False)


def test_task_state_and_ema_advance_are_checkpointed_and_resume_bitwise(
    tmp_path, monkeypatch, counting_task):
  config = toy_config("task=counting", "grad_accum_steps=2", "ema.decay=0.9",
                      "ema.warmup=True", "aux_loss_weights={'toy': 0.1}")
  straight = train_lib.train(config, str(tmp_path / "straight"), progress=False)
  state = saved_state(str(tmp_path / "straight"), 6)
  assert int(state["task"]["examples"]) == 6 * 16 and int(state["task"]["updates"]) == 6
  # Two micro-batches a step, each adding its own loss; the logged loss is their mean,
  # plus the weighted aux loss.
  task_losses = [r["train/loss"] - 0.1 * r["train/aux_loss/toy"]
                 for r in rows(str(tmp_path / "straight")) if "train/loss" in r]
  assert float(state["task"]["loss_sum"]) == pytest.approx(2 * sum(task_losses), rel=1e-5)
  assert not np.allclose(state["ema"]["head"]["kernel"], state["params"]["head"]["kernel"])
  assert {"train/aux_loss/toy", "eval/top1", "eval_ema/top1"} <= set(straight) | {
      k for r in rows(str(tmp_path / "straight")) for k in r}

  resumed = train_preempted_then_resumed(config, str(tmp_path / "resumed"), monkeypatch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, saved_state(
      str(tmp_path / "resumed"), 6), state)
  assert resumed["eval_ema/top1"] == straight["eval_ema/top1"]


def test_ema_turned_on_or_off_on_resume_and_read_by_load_params(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train_lib.train(toy_config("total_steps=2"), workdir, progress=False)
  train_lib.train(toy_config("total_steps=4", "ema.decay=0.5"), workdir, progress=False)
  assert "the EMA starts from its parameters" in capsys.readouterr().out
  train_lib.train(toy_config("total_steps=6"), workdir, progress=False)  # The EMA dropped.
  step, ema = checkpoints_lib.load_params_and_step(workdir, 4, ema=True)
  assert step == 4 and ema["head"]["kernel"].dtype == np.float32
  assert not np.array_equal(ema["head"]["kernel"],
                            checkpoints_lib.load_params(workdir, 4)["head"]["kernel"])
  assert "ema" not in saved_state(workdir, 6)
  with pytest.raises(checkpoints_lib.CheckpointError, match="holds no EMA of the parameters"):
    checkpoints_lib.load_params_and_step(workdir, ema=True)
