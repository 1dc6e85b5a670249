"""Classification accuracy: top-1 and top-5 over a whole evaluation split."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model", "patch_size"))
def _eval_step(model, params, images, labels, mask, patch_size=None):
  # patch_size (FlexiViT): the images cut at that size; None: the model's own.
  at_size = {} if patch_size is None else {"patch_size": patch_size}
  logits, _ = model.apply({"params": params}, images, **at_size)
  # Per-image logits of packed sequences, [S, K, C], are one example per slot.
  logits = logits.astype(jnp.float32).reshape(-1, logits.shape[-1])
  labels, mask = labels.reshape(-1), mask.reshape(-1)
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  hits = top_k == labels[:, None]
  return {"top1": jnp.sum(hits[:, 0] * mask), "top5": jnp.sum(jnp.any(hits, -1) * mask),
          "count": jnp.sum(mask)}


def evaluate_classification(model, params, batches, batch_sharding=None, patch_size=None):
  """Top-1 / top-5 accuracy over `batches` of {'image', 'label', 'mask'}.

  `patch_size`: a FlexiViT-capable model (a ViT) evaluated at that patch size.

  Padded examples (mask False) are not counted, so every example counts once.
  With `batch_sharding`, each batch is this host's slice of a global batch split
  that way over the devices (the trainer's case); without, batches are whole.
  """
  totals = {"top1": 0, "top5": 0, "count": 0}
  for batch in batches:
    batch = {"mask": np.ones(len(batch["label"]), bool), **batch}
    batch["mask"] = batch["mask"].astype(np.float32)
    if batch_sharding is not None:
      batch = jax.tree_util.tree_map(
          lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)
    sums = _eval_step(model, params, batch["image"], batch["label"], batch["mask"],
                      patch_size)
    for key, value in jax.device_get(sums).items():
      totals[key] += float(value)
  if not totals["count"]:
    raise ValueError("Evaluation saw no examples: the evaluation split is empty.")
  return {"top1": totals["top1"] / totals["count"], "top5": totals["top5"] / totals["count"]}


def classification(model, params, dataset, *, batch_size, batch_sharding=None,
                   patch_sizes=()):
  """Top-1 / top-5 over the dataset's evaluation split (the trainer's default evaluator).

  `patch_sizes` (FlexiViT, e.g. (2, 4, 8)): also evaluates the model cut into patches of
  each size (`model.apply(..., patch_size=p)`), as `top1@p2`, `top5@p2`, ... beside the
  metrics at the model's own patch size. In a config:
  `config.evaluators = {'classification': {'patch_sizes': (2, 4, 8)}}`.
  """
  def evaluate_at(patch_size):
    return evaluate_classification(
        model, params,
        dataset.eval_iter(batch_size, process_index=jax.process_index(),
                          process_count=jax.process_count()),
        batch_sharding=batch_sharding, patch_size=patch_size)

  metrics = evaluate_at(None)
  for patch_size in patch_sizes or ():
    metrics.update({f"{name}@p{patch_size}": value
                    for name, value in evaluate_at(int(patch_size)).items()})
  return metrics
