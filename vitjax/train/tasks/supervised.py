"""Supervised classification: softmax cross-entropy on labels."""

import jax.numpy as jnp
import optax

from vitjax.train.tasks.base import Task


def one_hot(labels, num_classes):
  return (labels[..., None] == jnp.arange(num_classes)).astype(jnp.float32)


def soft_labels(labels):
  """Whether `labels` are target distributions (floats, Mixup's [B, C]), not class indices."""
  return jnp.issubdtype(labels.dtype, jnp.floating)


def classification_targets(batch, num_classes, label_smoothing=0.0):
  """Target distributions: `batch['label']` one-hot, or already soft ([B, C] from Mixup)."""
  labels = batch["label"]
  targets = labels.astype(jnp.float32) if soft_labels(labels) else one_hot(labels, num_classes)
  return optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets


class Supervised(Task):
  """Classification with softmax cross-entropy and optional label smoothing.

  Labels are class indices [B], or target distributions [B, C] (Mixup, CutMix).
  Packed batches (NaViT, `vitjax.data.packing`) have labels and logits per image
  slot, [S, K] and [S, K, C], and a `mask` of the slots that hold an image: the loss
  and accuracy are means over the images, and the step logs how many were packed
  (`packed_images`) and the fraction of tokens that are padding (`padding_fraction`).
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
    losses = optax.softmax_cross_entropy(logits, targets)
    hard_labels = jnp.argmax(targets, -1) if soft_labels(batch["label"]) else batch["label"]
    hits = (jnp.argmax(logits, -1) == hard_labels).astype(jnp.float32)
    if "mask" not in batch:
      return losses.mean(), {"accuracy": hits.mean()}
    mask = batch["mask"].astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    metrics = {"accuracy": jnp.sum(hits * mask) / count}
    if isinstance(batch["image"], dict) and "segment_ids" in batch["image"]:
      metrics["packed_images"] = mask.sum()
      metrics["padding_fraction"] = jnp.mean(batch["image"]["segment_ids"] == 0)
    return jnp.sum(losses * mask) / count, metrics
