"""Supervised classification: softmax cross-entropy on labels."""

import jax.numpy as jnp
import optax

from vitjax.train.tasks.base import Task


def one_hot(labels, num_classes):
  return (labels[..., None] == jnp.arange(num_classes)).astype(jnp.float32)


def classification_targets(batch, num_classes, label_smoothing=0.0):
  """Target distributions: `batch['label']` one-hot, or already soft ([B, C] from Mixup)."""
  labels = batch["label"]
  targets = labels.astype(jnp.float32) if labels.ndim == 2 else one_hot(labels, num_classes)
  return optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets


class Supervised(Task):
  """Classification with softmax cross-entropy and optional label smoothing.

  Labels are class indices [B], or target distributions [B, C] (Mixup, CutMix).
  """

  def __init__(self, config):
    super().__init__(config)
    self.label_smoothing = config.get("label_smoothing", 0.0)

  def loss(self, model, params, batch, rng, constants, step):
    del constants
    logits, _ = self.apply_model(model, params, batch["image"], rng=rng, step=step)
    return self.loss_from_logits(logits, batch)

  def loss_from_logits(self, logits, batch):
    logits = logits.astype(jnp.float32)
    targets = classification_targets(batch, logits.shape[-1], self.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    hard_labels = jnp.argmax(targets, -1) if batch["label"].ndim == 2 else batch["label"]
    accuracy = jnp.mean(jnp.argmax(logits, -1) == hard_labels)
    return loss, {"accuracy": accuracy}
