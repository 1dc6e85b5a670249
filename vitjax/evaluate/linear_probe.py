"""Linear probe: a linear classifier trained on frozen features.

    linear_probe(model, params, dataset, batch_size=256) -> {'linear_probe/top1': 0.93}

The features (`out['pre_logits']`, or another entry of `out`) of the training and
evaluation splits are computed once, standardised with the training split's
statistics (this takes the place of the parameter-free BatchNorm that MAE puts
before its probe: no learned affine, nothing that the probe could use to adapt
the features), and a linear head is trained on softmax cross-entropy with
decoupled weight decay, full batch, with Adam and a cosine schedule. The whole
optimisation is one jitted `lax.scan` from a seeded initialisation, so a rerun
gives the same accuracy bit for bit.

Full batch keeps it deterministic and tuning-free for what fits in memory (a few
hundred thousand features of a few thousand dimensions); for ImageNet-sized
probes subsample the training split.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax.evaluate.fewshot import extract_features


def train_linear_probe(train_features, train_labels, *, num_classes, steps=300,
                       learning_rate=0.01, weight_decay=1e-4, seed=0):
  """The trained head {'kernel' [D, C], 'bias' [C], 'mean', 'std' [D]}, as NumPy arrays.

  The features are standardised by `mean` and `std` before the linear layer.
  """
  head = _fit(np.asarray(train_features, np.float32), np.asarray(train_labels),
              jax.random.PRNGKey(seed), np.float32(learning_rate), np.float32(weight_decay),
              num_classes=num_classes, steps=int(steps))
  return jax.device_get(head)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(features, labels, rng, learning_rate, weight_decay, *, num_classes, steps):
  mean = jnp.mean(features, axis=0)
  std = jnp.std(features, axis=0) + 1e-6
  x = (features - mean) / std
  head = {"kernel": 0.01 * jax.random.normal(rng, (x.shape[1], num_classes)),
          "bias": jnp.zeros((num_classes,))}
  schedule = optax.cosine_decay_schedule(learning_rate, steps)
  # Decay the kernel only: a bias says how common a class is.
  tx = optax.adamw(schedule, weight_decay=weight_decay,
                   mask={"kernel": True, "bias": False})

  def loss_fn(head):
    logits = x @ head["kernel"] + head["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(carry, _):
    head, opt_state = carry
    grads = jax.grad(loss_fn)(head)
    updates, opt_state = tx.update(grads, opt_state, head)
    return (optax.apply_updates(head, updates), opt_state), None

  (head, _), _ = jax.lax.scan(step, (head, tx.init(head)), None, length=steps)
  return {**head, "mean": mean, "std": std}


def probe_logits(head, features):
  """The head's logits for `features` [N, D] (NumPy)."""
  x = (np.asarray(features, np.float32) - head["mean"]) / head["std"]
  return x @ head["kernel"] + head["bias"]


def linear_probe_from_features(train_features, train_labels, test_features, test_labels, *,
                               num_classes=None, **options):
  """{'linear_probe/top1': accuracy on the test features} of a probe trained on the others."""
  train_labels = np.asarray(train_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), np.max(test_labels))) + 1
  head = train_linear_probe(train_features, train_labels, num_classes=num_classes, **options)
  predictions = np.argmax(probe_logits(head, test_features), -1)
  return {"linear_probe/top1": float(np.mean(predictions == np.asarray(test_labels)))}


def linear_probe(model, params, dataset, *, batch_size, batch_sharding=None, steps=300,
                 learning_rate=0.01, weight_decay=1e-4, seed=0, feature_key="pre_logits"):
  """Top-1 of a linear classifier on frozen `out[feature_key]` features.

  Args:
    model, params: any vitjax model whose `out` has `feature_key` (a vector per image).
    dataset: a `vitjax.data.Dataset`: trained on its training split (unaugmented),
      scored on its evaluation split.
    batch_size, batch_sharding: of the feature pass (as the other evaluators).
    steps, learning_rate, weight_decay: full-batch AdamW with a cosine schedule.
    seed: of the head's initialisation (the only randomness).
    feature_key: which entry of the model's `out` dict is the representation.

  Returns:
    {'linear_probe/top1': accuracy in [0, 1] on the evaluation split}.
  """
  common = dict(batch_size=batch_size, batch_sharding=batch_sharding,
                feature_key=feature_key)
  train_x, train_y = extract_features(model, params, dataset, split="train", **common)
  test_x, test_y = extract_features(model, params, dataset, split="eval", **common)
  return linear_probe_from_features(
      train_x, train_y, test_x, test_y, num_classes=getattr(dataset, "num_classes", None),
      steps=steps, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed)
