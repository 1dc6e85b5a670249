"""Classification accuracy: top-1 and top-5 over a whole evaluation split."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_step(model, params, images, labels, mask):
  logits, _ = model.apply({"params": params}, images)
  logits = logits.astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  hits = top_k == labels[:, None]
  return {"top1": jnp.sum(hits[:, 0] * mask), "top5": jnp.sum(jnp.any(hits, -1) * mask),
          "count": jnp.sum(mask)}


def evaluate_classification(model, params, batches, batch_sharding=None):
  """Top-1 / top-5 accuracy over `batches` of {'image', 'label', 'mask'}.

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
    sums = _eval_step(model, params, batch["image"], batch["label"], batch["mask"])
    for key, value in jax.device_get(sums).items():
      totals[key] += float(value)
  if not totals["count"]:
    raise ValueError("Evaluation saw no examples: the evaluation split is empty.")
  return {"top1": totals["top1"] / totals["count"], "top5": totals["top5"] / totals["count"]}


def classification(model, params, dataset, *, batch_size, batch_sharding=None):
  """Top-1 / top-5 over the dataset's evaluation split (the trainer's default evaluator)."""
  return evaluate_classification(
      model, params,
      dataset.eval_iter(batch_size, process_index=jax.process_index(),
                        process_count=jax.process_count()),
      batch_sharding=batch_sharding)
