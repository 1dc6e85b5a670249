"""The interface every task implements; the trainer calls nothing else."""

import jax


class Task:
  """A training objective.

  The trainer calls, in order:
    model = task.build_model()            # before anything is written
    dataset = task.dataset()
    constants = task.prepare(model, mesh, rng)   # once; e.g. a frozen teacher's params
    loss, metrics = task.loss(model, params, batch, rng, constants, step)  # jitted
    task.evaluators()                     # {evaluator name: options} run every eval_every

  `constants` is a pytree of arrays passed to every step (and never trained or
  checkpointed); `metrics` are scalars averaged into the logs as `train/NAME`.
  """

  # Evaluators (see `vitjax.evaluate`) run when config.evaluators is absent.
  default_evaluators = {"classification": {}}

  def __init__(self, config):
    self.config = config

  def build_model(self):
    """The model being trained; by default the one `config.model` names."""
    from vitjax.train import trainer  # pylint: disable=g-import-not-at-top
    return trainer.build_model(self.config)

  def dataset(self):
    from vitjax import data  # pylint: disable=g-import-not-at-top
    return data.get_dataset(self.config)

  def prepare(self, model, mesh, rng):
    """Arrays every step needs besides the trained parameters (placed on `mesh`)."""
    del model, mesh, rng
    return {}

  def evaluators(self):
    """{name: options} of the evaluators to run; config.evaluators overrides the default."""
    configured = self.config.get("evaluators")
    if configured is None:
      return dict(self.default_evaluators)
    return {name: dict(options or {}) for name, options in dict(configured).items()}

  def loss(self, model, params, batch, rng, constants, step):
    """(scalar loss, {name: scalar metric}) of one (micro-)batch; traced under jit."""
    raise NotImplementedError

  @staticmethod
  def apply_model(model, params, images, *, rng, step=None, **kwargs):
    """The model's training forward pass: `(logits, out)`.

    Models whose behaviour depends on training progress (the soft causal mask of an
    iLLaMA ViT) declare `uses_training_step = True` and receive `step`.
    """
    if step is not None and getattr(model, "uses_training_step", False):
      kwargs["step"] = step
    # 'dropout' (dropout, stochastic depth) and 'random' (masking, ...) streams.
    return model.apply({"params": params}, images, train=True,
                       rngs={"dropout": rng, "random": jax.random.fold_in(rng, 1)}, **kwargs)
