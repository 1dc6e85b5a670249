"""The one trainer: config in, trained checkpoint, metrics and plot out.

    from vitjax import config as config_lib, train
    config = config_lib.load_config('configs/quickstart.py')
    result = train.train(config, 'workdirs/quickstart')

Tasks (`vitjax.train.tasks`) supply the loss; the loop, checkpointing, evaluation
and logging are shared by all of them.
"""

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import data as data_lib
from vitjax import models
from vitjax.evaluate import evaluate_classification
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train import metrics as metrics_lib
from vitjax.train import optim
from vitjax.train import tasks


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the message names the step."""


def build_model(config):
  """The model named by `config.model.name`, built from the other `config.model` keys."""
  options = dict(config.model)
  name = options.pop("name")
  for key in ("dtype", "param_dtype"):
    if isinstance(options.get(key), str):
      options[key] = jnp.dtype(options[key])
  return models.create_model(name, **options)


def _train_step(model, tx, task, state, batch, rng):
  """One optimizer update; returns the new state and this step's metrics."""
  step_rng = jax.random.fold_in(rng, state["step"])

  def loss_fn(params):
    logits, out = model.apply({"params": params}, batch["image"], train=True,
                              rngs={"dropout": step_rng})
    return task.loss(logits, out, batch)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = jax.tree_util.tree_map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
  metrics = {"loss": loss, "grad_norm": optax_global_norm(grads),
             "update_norm": optax_global_norm(updates), **metrics}
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def train(config, workdir, *, progress=True):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

  Returns a dict with the final evaluation metrics and the paths written.
  """
  task = tasks.make_task(config)
  model = build_model(config)  # Unknown models fail here, before anything is written.
  dataset = data_lib.get_dataset(config)
  if config.model.num_classes and config.model.num_classes < dataset.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but dataset "
                     f"{config.dataset!r} has {dataset.num_classes} classes.")
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  params = models.init_params(model, init_rng)
  if config.get("init_weights"):
    from vitjax import convert  # pylint: disable=g-import-not-at-top
    params = convert.load_weights(model, config.init_weights,
                                  head=config.get("init_head", "error"), rng=init_rng)
  tx, schedule = optim.make_optimizer(config, params)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  checkpointer = checkpoints_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 2))
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  start_step, restored = checkpointer.restore(checkpoints_lib.abstract_like(state))
  if restored is not None:
    state = restored
    writer.truncate_after(start_step)
    print(f"Resuming from the checkpoint at step {start_step} in {checkpointer.directory}",
          flush=True)
  start_step = start_step or 0

  train_step = jax.jit(functools.partial(_train_step, model, tx, task), donate_argnums=(0,))
  batches = dataset.train_iter(config.batch_size, seed=config.seed, start_step=start_step,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
  total_steps = config.total_steps

  def evaluate(step):
    result = evaluate_classification(
        model, state["params"],
        dataset.eval_iter(config.get("eval_batch_size", config.batch_size),
                          process_index=jax.process_index(),
                          process_count=jax.process_count()))
    result = {f"eval/{k}": v for k, v in result.items()}
    writer.write(step, result)
    return result

  bar = _progress_bar(total_steps, start_step, enabled=progress and is_main)
  pending = []  # Metrics of steps not yet fetched from the device: one sync per log window.
  last_eval = {}
  window_start = time.perf_counter()
  saved_step = start_step if restored is not None else None
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(batches)
      state, step_metrics = train_step(state, batch, train_rng)
      pending.append((step, step_metrics))
      is_last = step == total_steps
      do_eval = is_last or (config.eval_every and step % config.eval_every == 0)
      do_save = is_last or (config.checkpoint_every and step % config.checkpoint_every == 0)
      if do_eval or do_save or step % config.log_every == 0:
        elapsed = time.perf_counter() - window_start
        summary = _check_and_summarise(pending)
        summary["train/lr"] = float(schedule(step - 1))
        summary["train/steps_per_second"] = len(pending) / max(elapsed, 1e-9)
        writer.write(step, summary)
        bar.set_postfix(loss=f"{summary['train/loss']:.4f}",
                        **({"top1": f"{last_eval['eval/top1']:.3f}"} if last_eval else {}))
        bar.update(len(pending))
        pending, window_start = [], time.perf_counter()
      if do_eval:
        last_eval = evaluate(step)
        bar.set_postfix(loss=f"{summary['train/loss']:.4f}", top1=f"{last_eval['eval/top1']:.3f}")
      if do_save:
        checkpointer.save(step, state)
        saved_step = step
  finally:
    bar.close()
    checkpointer.close()  # Waits for the last asynchronous save.
    writer.close()

  if not last_eval:  # Resumed at the end: nothing was trained, evaluate what was restored.
    last_eval = evaluate(total_steps)
  plot_path = None
  if is_main:
    plot_path = metrics_lib.plot_metrics(writer.jsonl_path, writer.plot_path)
  return {**last_eval, "step": total_steps,
          "checkpoint": checkpointer.path(saved_step) if saved_step is not None else None,
          "metrics": writer.jsonl_path, "plot": plot_path,
          "tensorboard": os.path.join(workdir, "tensorboard")}


def _check_and_summarise(pending):
  """Means of the pending steps' metrics; raises on the first non-finite loss."""
  fetched = jax.device_get([metrics for _, metrics in pending])
  for (step, _), metrics in zip(pending, fetched):
    # A finite loss with a non-finite update (e.g. a NaN learning rate) poisons the
    # parameters just the same, so both are checked before anything is saved.
    for name, what in (("loss", "training loss"), ("update_norm", "parameter update")):
      if math.isfinite(float(metrics[name])):
        continue
      raise TrainingDivergedError(
          f"The {what} became {float(metrics[name])} at step {step}. "
          f"No checkpoint was written after it; the last good one is kept. Lower "
          f"config.optimizer.learning_rate, enable config.optimizer.grad_clip_norm, "
          f"or use float32 compute.")
  return {f"train/{name}": float(np.mean([m[name] for m in fetched])) for name in fetched[0]}


def _progress_bar(total, initial, enabled):
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                   dynamic_ncols=True, desc="train")
