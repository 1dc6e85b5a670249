"""The interface every task implements; the trainer calls nothing else."""

import contextlib

import jax
import jax.numpy as jnp

from vitjax import adapt
from vitjax import config as config_lib
from vitjax import models


def build_model(config):
  """The model named by `config.model.name`, built from the other `config.model` keys,
  with `config.peft`'s adapters (LoRA, prompts, AdaptFormer) if it has any."""
  options = dict(config.model)
  name = options.pop("name")
  for key in ("dtype", "param_dtype"):
    if isinstance(options.get(key), str):
      options[key] = jnp.dtype(options[key])
  model = models.create_model(name, **options)
  peft = config.get("peft") if hasattr(config, "get") else None  # A teacher's namespace: none.
  try:
    if peft and adapt.has_adapters(peft):
      model = adapt.adapted(model, peft)
  except ValueError as e:  # Its messages name the config.peft key.
    raise config_lib.ConfigError(str(e)) from None
  return model


def float32_copy(params):
  """`params` in float32: the start of an average of them (an EMA, a teacher).

  float32 whatever the parameters' dtype: in bfloat16, (1 - 0.9999) * (params - ema)
  is below the average's resolution and it would stop moving.
  """
  return jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)


def update_ema(ema, params, decay):
  """ema + (1 - decay) * (params - ema), in float32 (the EMA's dtype): the trainer's
  config.ema and the tasks' teachers (DINO, I-JEPA's target encoder) alike."""
  return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e),
                                ema, params)


# The `out['aux_loss']` dicts of the forward passes of the loss being traced (a stack:
# one list per `collect_aux_losses` block). A module-level stack rather than a return
# value, so every task's loss gets them without passing them on.
_AUX_LOSSES = []


@contextlib.contextmanager
def collect_aux_losses():
  """Inside the block, `Task.apply_model` appends each `(out['aux_loss'], out['aux_metrics'])`
  to the list yielded."""
  collected = []
  _AUX_LOSSES.append(collected)
  try:
    yield collected
  finally:
    _AUX_LOSSES.pop()


def add_aux_losses(loss, metrics, collected, weights):
  """`loss` + sum of weight * value over the collected aux losses; each logged unweighted.

  `weights` is config.aux_loss_weights ({name: weight}); a name without one weighs 1.0
  (a model returns its aux losses at the scale it was published with). A weight for a
  name the model never returns is a `ConfigError`: the typo would otherwise do nothing.
  """
  totals = {}
  for aux in collected:  # Summed over forward passes (two views: two load-balancing terms).
    for name, value in aux.items():
      totals[name] = totals.get(name, 0.0) + jnp.asarray(value, jnp.float32)
  unknown = sorted(set(weights) - set(totals))
  if unknown:
    raise config_lib.ConfigError(
        f"config.aux_loss_weights names {', '.join(map(repr, unknown))}, but the model "
        f"returns the aux losses {sorted(totals) or 'none'} (out['aux_loss']).")
  metrics = dict(metrics)
  for name, value in sorted(totals.items()):
    loss = loss + float(weights.get(name, 1.0)) * value
    metrics[f"aux_loss/{name}"] = value
  return loss, metrics


def add_aux_metrics(metrics, collected):
  """`metrics` with the models' `out['aux_metrics']` (an MoE's dropped tokens), logged as
  `aux/NAME`: the mean over the forward passes."""
  passes = {}
  for aux in collected:
    for name, value in aux.items():
      passes.setdefault(name, []).append(jnp.asarray(value, jnp.float32))
  return {**metrics, **{f"aux/{name}": sum(values) / len(values)
                        for name, values in sorted(passes.items())}}


class Task:
  """A training objective.

  The trainer calls, in order:
    model = task.build_model()            # before anything is written
    dataset = task.dataset()
    constants = task.prepare(model, mesh, rng)   # once; e.g. a frozen teacher's params
    task_state = task.init_state(model, params, rng)  # once, unless a checkpoint holds it
    # Every step, jitted:
    loss, (metrics, task_state) = task.training_loss(model, params, task_state, batch,
                                                     rng, constants, step)
    task_state = task.update_state(task_state, params, step)  # after the optimizer update
    task.evaluators()                     # {evaluator name: options} run every eval_every
    task.eval_weights(task_state, params) # {prefix: params} evaluated besides params

  A task overrides `loss` (no state of its own) or `stateful_loss` (reads and returns
  its state: a DINO centre from the teacher's outputs, a MoCo queue), and
  `update_state` for what follows the new parameters (an EMA teacher).

  `constants` is a pytree of arrays passed to every step (never trained or
  checkpointed); the task state is a pytree of arrays, checkpointed and restored
  bitwise with the parameters ({} by default: nothing saved). `metrics` are scalars
  averaged into the logs as `train/NAME`.

  With config.grad_accum_steps=n, `stateful_loss` runs once per micro-batch, in order,
  each seeing the state the previous one returned; `update_state` runs once per step.
  With config.optimizer.sam_rho, the state of the first (unperturbed) pass is kept.
  A step skipped as non-finite (config.skip_nonfinite_steps) keeps the old state.
  """

  # Evaluators (see `vitjax.evaluate`) run when config.evaluators is absent.
  default_evaluators = {"classification": {}}
  # Whether the task reads multi-crop batches (config.input.multicrop: `global_crops`, ...,
  # no `image`); the others refuse them.
  takes_multicrop = False

  def __init__(self, config):
    self.config = config
    multicrop = (config.get("input") or {}).get("multicrop")
    if multicrop and not self.takes_multicrop:
      raise ValueError(f"config.input.multicrop makes batches of several crops per image for "
                       f"self-supervised tasks ('dino', 'ijepa'); config.task="
                       f"{config.get('task', 'supervised')!r} takes whole images. Set "
                       "--config.input.multicrop=None.")

  def build_model(self):
    """The model being trained; by default the one `config.model` names."""
    return build_model(self.config)

  def dataset(self):
    from vitjax import data  # pylint: disable=g-import-not-at-top
    return data.get_dataset(self.config)

  def prepare(self, model, mesh, rng):
    """Arrays every step needs besides the trained parameters (placed on `mesh`)."""
    del model, mesh, rng
    return {}

  def init_state(self, model, params, rng):
    """The task's own state at step 0 (a pytree of arrays, e.g. a copy of `params` as an
    EMA teacher); {} for none. Traced under jit; placed like `params` where it has their
    shapes, replicated otherwise."""
    del model, params, rng
    return {}

  def evaluators(self):
    """{name: options} of the evaluators to run; config.evaluators overrides the default."""
    configured = self.config.get("evaluators")
    if configured is None:
      return dict(self.default_evaluators)
    return {name: dict(options or {}) for name, options in dict(configured).items()}

  def eval_weights(self, task_state, params):
    """{prefix: params} of weights the evaluators also run on besides `params` (logged
    as `PREFIX/NAME`), e.g. {'eval_teacher': the EMA teacher}; {} by default."""
    del task_state, params
    return {}

  def loss(self, model, params, batch, rng, constants, step):
    """(scalar loss, {name: scalar metric}) of one (micro-)batch; traced under jit."""
    raise NotImplementedError

  def stateful_loss(self, model, params, task_state, batch, rng, constants, step):
    """(loss, metrics, new task state) of one (micro-)batch; by default `loss`, state kept."""
    loss, metrics = self.loss(model, params, batch, rng, constants, step)
    return loss, metrics, task_state

  def update_state(self, task_state, params, step):
    """The task state after the optimizer update to `params` (the new ones) at `step`."""
    del params, step
    return task_state

  def training_loss(self, model, params, task_state, batch, rng, constants, step):
    """What the trainer differentiates: `(loss, (metrics, task_state))`.

    The task's loss plus the weighted aux losses its model returned
    (config.aux_loss_weights), each logged as `train/aux_loss/NAME`.
    """
    with collect_aux_losses() as collected:
      loss, metrics, task_state = self.stateful_loss(model, params, task_state, batch, rng,
                                                     constants, step)
    weights = dict(self.config.get("aux_loss_weights") or {})
    loss, metrics = add_aux_losses(loss, metrics, [losses for losses, _ in collected], weights)
    metrics = add_aux_metrics(metrics, [aux for _, aux in collected])
    return loss, (metrics, task_state)

  @staticmethod
  def apply_model(model, params, images, *, rng, step=None, **kwargs):
    """The model's training forward pass: `(logits, out)`.

    Models whose behaviour depends on training progress (the soft causal mask of an
    iLLaMA ViT) declare `uses_training_step = True` and receive `step`. A model with
    auxiliary losses (MoE load balancing) returns them as `out['aux_loss']`, a dict
    {name: scalar}; inside `training_loss` they are added to the task's loss.
    """
    if step is not None and getattr(model, "uses_training_step", False):
      kwargs["step"] = step
    # 'dropout' (dropout, stochastic depth) and 'random' (masking, ...) streams.
    logits, out = model.apply({"params": params}, images, train=True,
                              rngs={"dropout": rng, "random": jax.random.fold_in(rng, 1)},
                              **kwargs)
    if _AUX_LOSSES and isinstance(out, dict) and (out.get("aux_loss") or
                                                  out.get("aux_metrics")):
      _AUX_LOSSES[-1].append((out.get("aux_loss") or {}, out.get("aux_metrics") or {}))
    return logits, out
