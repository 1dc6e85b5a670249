"""The one trainer: config in, trained checkpoint, metrics and plot out.

    from vitjax import config as config_lib, train
    config = config_lib.load_config('configs/quickstart.py')
    result = train.train(config, 'workdirs/quickstart')

Tasks (`vitjax.train.tasks`) supply the model, data, loss and evaluators; the loop,
sharding, checkpointing and logging are shared by all of them.
"""

import contextlib
import functools
import math
import os
import signal
import threading
import time
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import adapt
from vitjax import evaluate as evaluate_lib
from vitjax import models
from vitjax import xla_options
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train import metrics as metrics_lib
from vitjax.train import optim
from vitjax.train import resume as resume_lib
from vitjax.train import sharding as sharding_lib
from vitjax.train import tasks
from vitjax.train.tasks import base as tasks_base
from vitjax.train.tasks.base import update_ema  # The config.ema update, shared with tasks.
from vitjax.train import validation
from vitjax.train import workdir as workdir_lib


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the message names the step."""


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C during training; the message names the step and the last checkpoint."""


class StepOptions(NamedTuple):
  """What one train step does besides the task's loss (from config; see `step_options`)."""
  grad_accum_steps: int = 1
  skip_nonfinite: bool = False
  sam_rho: float = 0.0  # 0: plain gradients; > 0: SAM's.
  ema_decay: Optional[float] = None  # None: no EMA of the parameters.
  ema_warmup: bool = False
  ema_warmup_gamma: float = 1.0
  ema_warmup_power: float = 0.75


def step_options(config):
  ema = config.get("ema") or {}
  return StepOptions(
      grad_accum_steps=config.get("grad_accum_steps", 1),
      skip_nonfinite=bool(config.get("skip_nonfinite_steps")),
      sam_rho=float(config.optimizer.get("sam_rho") or 0.0),
      ema_decay=ema.get("decay"),
      ema_warmup=bool(ema.get("warmup")),
      ema_warmup_gamma=float(ema.get("warmup_gamma", 1.0)),
      ema_warmup_power=float(ema.get("warmup_power", 0.75)))


def ema_decay(options, step):
  """The EMA's decay at the update after `step` earlier ones.

  With config.ema.warmup, timm's ModelEmaV3 rule (its `step` is ours): min(decay,
  1 - (1 + step / warmup_gamma) ** -warmup_power), 0 at the first update (the EMA
  becomes the parameters), 0.41 at the second with the defaults, then up to `decay`.
  """
  if not options.ema_warmup:
    return jnp.float32(options.ema_decay)
  warm = 1.0 - (1.0 + step.astype(jnp.float32) / options.ema_warmup_gamma) ** (
      -options.ema_warmup_power)
  return jnp.minimum(jnp.float32(options.ema_decay), warm)


def _train_step(model, tx, task, options, state, batch, rng, constants, prepare_batch=None):
  """One optimizer update, over `grad_accum_steps` micro-batches; returns state and metrics.

  `prepare_batch` (the dataset's `device_fn`) finishes the batch on the device first:
  uint8 images normalized, erased and mixed.

  `state` holds params, opt_state and step, and `ema` (config.ema.decay) and `task`
  (the task's own state) when there are any. With `skip_nonfinite`, an update whose
  loss, gradients or update are NaN or infinite is dropped: everything but the step
  counter stays as it was, and the metric `skipped_steps` is 1.

  With `sam_rho` (SAM, Foret et al. 2021) the update follows the gradient at
  params + rho * g / |g|, g the gradient at params, on the same batch and rng; the
  logged loss and metrics (and the task state kept) are the unperturbed pass's,
  `grad_norm` is the norm of the gradient the optimizer got. With micro-batches, g
  and the perturbed gradient are each the whole batch's (the perturbation is one
  for the batch, as without accumulation).
  """
  if prepare_batch is not None:
    batch = prepare_batch(batch)
  step_rng = jax.random.fold_in(rng, state["step"])
  grad_fn = jax.value_and_grad(
      lambda params, task_state, micro_batch, micro_rng: task.training_loss(
          model, params, task_state, micro_batch, micro_rng, constants, state["step"]),
      has_aux=True)
  accum = options.grad_accum_steps

  def batch_gradients(params, task_state):
    """(loss, metrics, task state, gradients) of the batch at `params`."""
    if accum == 1:
      (loss, (metrics, task_state)), grads = grad_fn(params, task_state, batch, step_rng)
      return loss, metrics, task_state, grads
    # Example i goes to micro-batch i % n, so every micro-batch keeps the batch's
    # split over devices. Equal-size micro-batches: the mean of their mean
    # gradients is the full batch's mean gradient. The task state goes through the
    # micro-batches in order.
    micro_batches = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)

    def accumulate(carry, inputs):
      sums, task_state = carry
      index, micro_batch = inputs
      (loss, (metrics, task_state)), grads = grad_fn(
          params, task_state, micro_batch, jax.random.fold_in(step_rng, index))
      return (jax.tree_util.tree_map(jnp.add, sums, (grads, loss, metrics)), task_state), None

    (loss, (metrics, _)), grads = jax.eval_shape(
        grad_fn, params, task_state, jax.tree_util.tree_map(lambda x: x[0], micro_batches),
        step_rng)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                   (grads, loss, metrics))
    (sums, task_state), _ = jax.lax.scan(accumulate, (zeros, task_state),
                                         (jnp.arange(accum), micro_batches))
    grads, loss, metrics = jax.tree_util.tree_map(lambda x: x / accum, sums)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, metrics, task_state, grads

  loss, metrics, task_state, grads = batch_gradients(state["params"], state.get("task", {}))
  if options.sam_rho:
    # Two gradients per step, written here rather than with optax.contrib.sam, which
    # takes the two over two calls of the step (two batches, two step counts).
    scale = options.sam_rho / (optax_global_norm(grads) + 1e-12)
    perturbed = jax.tree_util.tree_map(
        lambda p, g: p + (scale * g.astype(jnp.float32)).astype(p.dtype), state["params"], grads)
    _, _, _, grads = batch_gradients(perturbed, state.get("task", {}))
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = jax.tree_util.tree_map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
  new_state = {"params": params, "opt_state": opt_state}
  if "ema" in state:
    new_state["ema"] = update_ema(state["ema"], params, ema_decay(options, state["step"]))
  if "task" in state:
    new_state["task"] = task.update_state(task_state, params, state["step"])
  metrics = {"loss": loss, "grad_norm": optax_global_norm(grads),
             "update_norm": optax_global_norm(updates), **metrics}
  if options.skip_nonfinite:
    # The norms are non-finite as soon as one element is.
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
              & jnp.isfinite(metrics["update_norm"]))
    keep_finite = lambda new, old: jnp.where(finite, new, old)
    new_state = {key: jax.tree_util.tree_map(keep_finite, value, state[key])
                 for key, value in new_state.items()}
    metrics["skipped_steps"] = 1.0 - finite.astype(jnp.float32)
  return {**new_state, "step": state["step"] + 1}, metrics


def draw_patch_size(patch_sizes, seed, step):
  """FlexiViT: the patch size of training step `step`, drawn uniformly from `patch_sizes`.

  A function of (seed, step) alone, so a resumed run draws what the first one would have.
  """
  entropy = np.random.SeedSequence([int(seed) % 2**32, int(step)])
  return patch_sizes[int(np.random.default_rng(entropy).integers(len(patch_sizes)))]


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def train(config, workdir, *, progress=True):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

  Returns a dict with the final evaluation metrics and the paths written.
  """
  validation.validate(config, workdir)
  task = tasks.make_task(config)
  model = task.build_model()  # Unknown models fail here, before anything is written.
  evaluators = task.evaluators()
  for name in evaluators:
    try:
      evaluate_lib.get_evaluator(name)  # Unknown evaluators too.
    except ValueError as e:
      raise validation.ConfigError(f"config.evaluators: {e}") from e
  dataset = task.dataset()
  num_classes = config.model.get("num_classes")
  if num_classes and num_classes < getattr(dataset, "num_classes", 0):
    # Also checked by `validate` for digits and TFDS; here for every task's dataset.
    raise validation.ConfigError(
        f"config.model.num_classes={config.model.num_classes} but dataset "
        f"{config.dataset!r} has {dataset.num_classes} classes: set "
        f"--config.model.num_classes={dataset.num_classes}.")
  mesh = sharding_lib.make_mesh(config.get("mesh") or {"data": -1})
  rules = sharding_lib.logical_rules(config)
  is_main = jax.process_index() == 0
  workdir = workdir_lib.as_path(workdir)
  with _workdir_lock(workdir, is_main), sharding_lib.mesh_context(mesh, rules):
    return _train_loop(config, workdir, model, task, evaluators, dataset, mesh, progress,
                       is_main)


@contextlib.contextmanager
def _workdir_lock(workdir, is_main):
  """Process 0 holds the workdir's lock for every host; all hosts stop if it is taken."""
  error = lock_path = None
  if is_main:
    try:
      lock_path = workdir_lib.acquire(workdir)
    except workdir_lib.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
      error = error or workdir_lib.WorkdirLockedError(
          f"Process 0 could not take the lock of the workdir {workdir}: another run holds it.")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock_path is not None:
      workdir_lib.release(lock_path)


def _init_state(config, model, mesh, rng):
  """The train state, created directly sharded (never whole on one device), and its shardings."""
  init_rng, _ = jax.random.split(rng)
  images = models.dummy_input(model)
  boxed = jax.eval_shape(lambda r: model.init(r, images)["params"], init_rng)
  param_shardings = sharding_lib.param_shardings(boxed, mesh, nn.get_logical_axis_rules())
  params = jax.jit(lambda r: nn.unbox(model.init(r, images)["params"]),
                   out_shardings=param_shardings)(init_rng)
  init_path = config.get("init")
  if init_path:
    from vitjax import convert  # pylint: disable=g-import-not-at-top
    base = adapt.base_model(model)  # With config.peft: the base weights, then the adapters.
    loaded = convert.load_weights(base, init_path,
                                  head=config.get("init_head", "error"), rng=init_rng)
    if base is not model:
      loaded = adapt.combine(params, loaded)
    params = jax.device_put(loaded, param_shardings)
  tx, schedule = optim.make_optimizer(config, params)
  opt_shardings = sharding_lib.like_params(jax.eval_shape(tx.init, params), params,
                                           param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = {"params": params, "opt_state": opt_state,
           "step": jax.device_put(jnp.zeros((), jnp.int32), sharding_lib.replicated(mesh))}
  shardings = {"params": param_shardings, "opt_state": opt_shardings,
               "step": sharding_lib.replicated(mesh)}
  if (config.get("ema") or {}).get("decay"):
    state["ema"], shardings["ema"] = ema_of(params, param_shardings), param_shardings
  return state, shardings, tx, schedule


def ema_of(params, param_shardings):
  """A float32 copy of `params` (tasks_base.float32_copy), sharded like them: the EMA's start."""
  return jax.jit(tasks_base.float32_copy, out_shardings=param_shardings)(params)


def _init_task_state(task, model, params, param_shardings, mesh, rng):
  """The task's own state at step 0 and its shardings ({} and {} for most tasks)."""
  init = functools.partial(task.init_state, model)
  abstract = jax.eval_shape(init, params, rng)
  if not jax.tree_util.tree_leaves(abstract):
    return {}, {}
  shardings = sharding_lib.like_params(abstract, params, param_shardings, mesh)
  return jax.jit(init, out_shardings=shardings)(params, rng), shardings


def data_state(config, dataset, step):
  """The input pipeline's state at `step`: with the config, it fixes every later batch."""
  return {"dataset": getattr(dataset, "name", config.get("dataset")),
          "train_split": config.get("train_split"),
          "num_train": getattr(dataset, "num_train", None),
          "batch_size": config.batch_size, "seed": config.seed, "step": int(step)}


def _output_paths(options, **fields):
  """Evaluator options with `{workdir}`, `{step}` and `{weights}` ('eval' or 'eval_ema')
  filled in where a `*_path` option names them: a file per evaluation, e.g.
  png_path='{workdir}/samples_{weights}_{step}.png'."""
  return {key: value.format(**fields) if key.endswith("_path") and isinstance(value, str)
          else value for key, value in options.items()}


def _train_loop(config, workdir, model, task, evaluators, dataset, mesh, progress, is_main):
  """The loop proper, inside the mesh and sharding-rules context."""
  rng = jax.random.PRNGKey(config.seed)
  train_rng = jax.random.split(rng)[1]
  state, state_shardings, tx, schedule = _init_state(config, model, mesh, rng)
  task_rng = jax.random.fold_in(rng, 3)
  task_state, task_shardings = _init_task_state(task, model, state["params"],
                                                state_shardings["params"], mesh, task_rng)
  if task_state:
    state["task"], state_shardings["task"] = task_state, task_shardings
  constants = task.prepare(model, mesh, jax.random.fold_in(rng, 2))
  constant_shardings = jax.tree_util.tree_map(lambda x: x.sharding, constants)

  checkpointer = checkpoints_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 2))
  try:
    start_step, restored, changed = _restore(config, workdir, dataset, checkpointer, state)
  except Exception:
    checkpointer.close()
    raise
  if restored is not None and start_step >= config.total_steps:
    checkpointer.close()
    return _completed(config, workdir, start_step)
  if is_main:
    if restored is not None and changed:
      _note_changes(config, workdir, start_step, changed, schedule)
    (workdir / resume_lib.CONFIG_NAME).write_text(
        config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  # Rows a previous run logged after its last checkpoint (all of them, if it had none).
  writer.truncate_after(start_step or 0)
  if restored is not None:
    print(f"Resuming from the checkpoint at step {start_step} in {checkpointer.directory}",
          flush=True)
    state = _complete_restored(restored, state_shardings, task, model, mesh, task_rng,
                               start_step)
  start_step = start_step or 0

  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)

  def compiled_step(step_model):
    return jax.jit(
        functools.partial(_train_step, step_model, tx, task, step_options(config),
                          prepare_batch=dataset.device_fn),
        in_shardings=(state_shardings, batch_sharding, replicated, constant_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=xla_options.compiler_options())

  # FlexiViT (config.model.patch_sizes): one compiled step per patch size, each training a
  # clone of the model that cuts the images at that size; the parameters are shared.
  patch_sizes = tuple(getattr(model, "patch_sizes", None) or ())
  train_steps = ({size: compiled_step(model.clone(train_patch_size=size))
                  for size in patch_sizes} if patch_sizes else {None: compiled_step(model)})
  batches = dataset.train_iter(config.batch_size, seed=config.seed, start_step=start_step,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
  total_steps = config.total_steps

  def evaluate(step):
    """`eval/NAME` of the parameters and, with config.ema.decay, `eval_ema/NAME` of the EMA;
    a task's own weights (`Task.eval_weights`) under their prefix."""
    weights = {"eval": state["params"]}
    if "ema" in state:  # Evaluated in the parameters' dtype, as the parameters are.
      weights["eval_ema"] = jax.tree_util.tree_map(lambda e, p: e.astype(p.dtype),
                                                   state["ema"], state["params"])
    # A task's other weights (a DINO teacher): `eval_teacher/NAME`.
    weights.update(task.eval_weights(state.get("task", {}), state["params"]))
    result = {}
    for prefix, params in weights.items():
      for name, options in evaluators.items():
        metrics = evaluate_lib.run_evaluator(
            name, model, params, dataset,
            batch_size=config.get("eval_batch_size", config.batch_size),
            batch_sharding=batch_sharding,
            **_output_paths(options, workdir=workdir, step=step, weights=prefix))
        result.update({f"{prefix}/{k}": v for k, v in metrics.items()})
    if result:
      writer.write(step, result)
    return result

  bar = _progress_bar(total_steps, start_step, enabled=progress and is_main)
  pending = []  # Metrics of steps not yet fetched from the device: one sync per log window.
  last_eval = {}
  window_start = time.perf_counter()
  data_wait = 0.0  # Seconds of the log window spent blocked on the input pipeline.
  saved_step = start_step if restored is not None else None
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      wait_start = time.perf_counter()
      batch = sharding_lib.global_batch(next(batches), batch_sharding)
      data_wait += time.perf_counter() - wait_start
      patch_size = draw_patch_size(patch_sizes, config.seed, step) if patch_sizes else None
      state, step_metrics = train_steps[patch_size](state, batch, train_rng, constants)
      if patch_size is not None:  # Logged as train/patch_size, the log window's mean.
        step_metrics = {**step_metrics, "patch_size": np.float32(patch_size)}
      pending.append((step, step_metrics))
      is_last = step == total_steps
      do_eval = is_last or (config.eval_every and step % config.eval_every == 0)
      do_save = is_last or (config.checkpoint_every and step % config.checkpoint_every == 0)
      if do_eval or do_save or step % config.log_every == 0:
        summary = _check_and_summarise(pending)
        elapsed = time.perf_counter() - window_start
        # The rate of the last applied update: skipped steps do not advance the schedule.
        count = optim.schedule_count(state["opt_state"])
        summary["train/lr"] = float(schedule(step - 1 if count is None else max(int(count) - 1, 0)))
        summary["train/steps_per_second"] = len(pending) / max(elapsed, 1e-9)
        summary["train/data_wait_fraction"] = min(data_wait / max(elapsed, 1e-9), 1.0)
        summary.update(_data_counters(dataset))
        writer.write(step, summary)
        bar.set_postfix(**_loss_postfix(summary), **_headline(last_eval))
        bar.update(len(pending))
        pending, window_start, data_wait = [], time.perf_counter(), 0.0
        checkpointer.check()  # A save that failed in the background stops the run now.
      if do_eval:
        last_eval = evaluate(step)
        bar.set_postfix(**_loss_postfix(summary), **_headline(last_eval))
      if do_save:
        with _interrupt_after():
          checkpointer.save(step, state, data_state(config, dataset, step))
          saved_step = step
  except KeyboardInterrupt:
    raise TrainingInterrupted(
        f"Interrupted at step {step}; the last checkpoint is "
        f"{'step ' + str(saved_step) if saved_step is not None else 'none (no step was saved)'}"
        f". Rerun the same command to resume.") from None
  finally:
    bar.close()
    close_batches = getattr(batches, "close", None)
    if close_batches is not None:
      close_batches()  # Input worker processes end here, not at interpreter exit.
    try:
      checkpointer.close()  # Waits for the last asynchronous save; raises if it failed.
    finally:
      writer.close()

  plot_path = None
  if is_main:
    plot_path = metrics_lib.plot_metrics(writer.jsonl_path, writer.plot_path)
  return _result(last_eval, total_steps, workdir,
                 checkpointer.path(saved_step) if saved_step is not None else None, plot_path)


@contextlib.contextmanager
def _interrupt_after():
  """Holds a Ctrl-C (SIGINT) that arrives inside the block and raises it at the block's end.

  A KeyboardInterrupt raised inside the checkpointer's save (its threads, its locks) could
  leave it waiting forever in `close()`, and Ctrl-C would hang instead of ending the run;
  the save is short, so the interrupt waits for it. Only the main thread takes signals.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
  if received:
    raise KeyboardInterrupt


def _result(metrics, step, workdir, checkpoint, plot):
  """What `train` returns: the final metrics, and the paths written, as strings."""
  paths = {"checkpoint": checkpoint, "metrics": workdir / "metrics.jsonl", "plot": plot,
           "tensorboard": workdir / "tensorboard"}
  return {**metrics, "step": step,
          **{k: None if v is None else os.fspath(v) for k, v in paths.items()}}


def _restore(config, workdir, dataset, checkpointer, state):
  """(step, state, changed config keys) of the workdir's latest readable checkpoint.

  Before reading it, the config is compared with the workdir's config.json: another
  model or input size is a `ResumeConfigError`; another input stream a
  `DataStateMismatchError`. (None, None, {}) when there is no checkpoint.
  """
  if checkpointer.latest_step() is None:
    return None, None, {}
  saved = resume_lib.read_saved_config(workdir)
  changed = resume_lib.changes(saved, config) if saved is not None else {}
  resume_lib.check_same_state(changed, workdir, checkpointer.latest_step())
  step, restored, saved_data_state = checkpointer.restore(checkpoints_lib.abstract_like(state))
  if restored is None:
    return None, None, {}
  checkpoints_lib.check_data_state(saved_data_state, data_state(config, dataset, step),
                                   checkpointer.path(step))
  if step > config.total_steps:
    raise resume_lib.ResumeConfigError(
        f"The workdir {workdir} holds a checkpoint of step {step}, past config.total_steps="
        f"{config.total_steps}: there is nothing to train. Set --config.total_steps={step} "
        f"(or more), or use another --workdir.")
  return step, restored, changed


def _complete_restored(restored, shardings, task, model, mesh, task_rng, step):
  """The restored state, with what its checkpoint lacks made from the resumed parameters.

  A run resumed with config.ema.decay newly set starts its EMA at the resumed
  parameters; a task state the checkpoint lacks starts afresh (`Task.init_state`).
  Parts the checkpoint holds and this run does not use (an EMA, now off) were not read.
  """
  state = {**restored}
  if "ema" in shardings and "ema" not in restored:
    print(f"NOTE: the checkpoint of step {step} holds no EMA (config.ema.decay was not set); "
          f"the EMA starts from its parameters.", flush=True)
    state["ema"] = ema_of(restored["params"], shardings["params"])
  if "task" in shardings and "task" not in restored:
    print(f"NOTE: the checkpoint of step {step} holds no state of the task; it starts afresh "
          f"from the resumed parameters.", flush=True)
    state["task"], _ = _init_task_state(task, model, restored["params"], shardings["params"],
                                        mesh, task_rng)
  return state


def _note_changes(config, workdir, step, changed, schedule):
  """Prints and records the config keys changed since the run that wrote the workdir."""
  learning_rate = None
  lines = [f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()]
  if resume_lib.schedule_changed(changed):
    try:
      old_schedule = optim.make_schedule(resume_lib.as_config(
          resume_lib.read_saved_config(workdir)))
      learning_rate = (float(old_schedule(step)), float(schedule(step)))
    except Exception:  # pylint: disable=broad-except  (a config.json of an older vitjax)
      learning_rate = (None, float(schedule(step)))
    before = "unknown" if learning_rate[0] is None else f"{learning_rate[0]:.4g}"
    lines.append(f"  The learning-rate schedule moved: at step {step} the rate was {before}, "
                 f"it is now {learning_rate[1]:.4g}.")
  print(f"NOTE: resuming {workdir} at step {step} with a changed config (recorded in "
        f"{workdir / resume_lib.RESUMES_NAME}):\n" + "\n".join(lines), flush=True)
  resume_lib.record(workdir, step, changed, learning_rate)


def _completed(config, workdir, step):
  """The result of a run that is already complete; nothing is written."""
  metrics_path = workdir / "metrics.jsonl"
  rows = metrics_lib.read_metrics(metrics_path) if metrics_path.exists() else []
  final = resume_lib.final_metrics(rows, step)
  shown = "  ".join(f"{k.replace('eval_', '').replace('eval/', '')}: {v:.4f}"
                    for k, v in final.items()) or "-"
  print(f"The run in {workdir} is complete (step {step} of config.total_steps="
        f"{config.total_steps}; final eval {shown}). Nothing was trained or written; raise "
        f"--config.total_steps to train on, or use another --workdir.", flush=True)
  plot = workdir / "metrics.png"
  return {**_result(final, step, workdir, workdir / "checkpoints" / str(step),
                    plot if plot.exists() else None), "complete": True}


def _check_and_summarise(pending):
  """Means of the pending steps' metrics; raises on the first non-finite loss.

  Steps the train step skipped (config.skip_nonfinite_steps) are left out of the
  means and counted in `train/skipped_steps`.
  """
  fetched = jax.device_get([metrics for _, metrics in pending])
  kept, skipped = [], []
  for (step, _), metrics in zip(pending, fetched):
    if metrics.get("skipped_steps", 0.0):
      skipped.append(step)
      continue
    # A finite loss with a non-finite update (e.g. a NaN learning rate) poisons the
    # parameters just the same, so both are checked before anything is saved.
    for name, what in (("loss", "training loss"), ("update_norm", "parameter update")):
      if math.isfinite(float(metrics[name])):
        continue
      raise TrainingDivergedError(
          f"The {what} became {float(metrics[name])} at step {step}. "
          f"No checkpoint was written after it; the last good one is kept. Lower "
          f"config.optimizer.learning_rate, enable config.optimizer.grad_clip_norm, "
          f"use float32 compute, or set config.skip_nonfinite_steps=True to skip such "
          f"updates.")
    kept.append(metrics)
  summary = {f"train/{name}": float(np.mean([m[name] for m in kept]))
             for name in fetched[0] if kept and name != "skipped_steps"}
  if "skipped_steps" in fetched[0]:
    summary["train/skipped_steps"] = float(len(skipped))  # In this log window.
  if skipped:
    print(f"WARNING: skipped the non-finite update of step(s) "
          f"{', '.join(map(str, skipped))} (config.skip_nonfinite_steps).", flush=True)
  return summary


def _data_counters(dataset):
  """Counters the dataset exposes: how many undecodable images it skipped so far.

  Logged from the first skipped image on, so clean runs get no always-zero series.
  """
  bad_images = getattr(dataset, "bad_images_skipped", None)
  if callable(bad_images):
    bad_images = bad_images()
  return {"data/bad_images_skipped": float(bad_images)} if bad_images else {}


def _loss_postfix(summary):
  return {"loss": f"{summary['train/loss']:.4f}"} if "train/loss" in summary else {}


def _headline(eval_metrics):
  """The first evaluation metric, of the EMA when there is one ('ema_top1'), for the bar."""
  ema = [key for key in eval_metrics if key.startswith("eval_ema/")]
  for key in ema or eval_metrics:
    return {("ema_" if ema else "") + key.split("/")[-1]: f"{eval_metrics[key]:.3f}"}
  return {}


def _progress_bar(total, initial, enabled):
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                   dynamic_ncols=True, desc="train")
