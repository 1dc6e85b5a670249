"""Tasks supply the loss and metrics; the trainer's loop is shared by all of them."""

import jax.numpy as jnp
import optax


class Supervised:
  """Classification with softmax cross-entropy and optional label smoothing."""

  def __init__(self, config):
    self.label_smoothing = config.get("label_smoothing", 0.0)

  def loss(self, logits, out, batch):
    """Returns (mean loss, metrics) for a batch; `out` holds the model's intermediates."""
    del out
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax_one_hot(batch["label"], num_classes),
                                  self.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}


def jax_one_hot(labels, num_classes):
  return (labels[..., None] == jnp.arange(num_classes)).astype(jnp.float32)


TASKS = {"supervised": Supervised}


def make_task(config):
  if config.task not in TASKS:
    raise ValueError(f"Unknown task {config.task!r}; available: {', '.join(sorted(TASKS))}.")
  return TASKS[config.task](config)
