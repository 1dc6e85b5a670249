"""Few-shot linear evaluation: closed-form ridge regression on frozen features.

    fewshot(model, params, dataset, batch_size=256)
    -> {'fewshot/1shot': 0.41, 'fewshot/5shot': 0.78, ...}

As big_vision's `fewshot_lsr` evaluator does: the features (`out['pre_logits']`)
of the training and evaluation splits are computed once; for every seed and shot
count k, k examples of each class are drawn from the training split, the features
are standardised with those examples' statistics, a constant bias feature is
appended, and L2-regularised least squares is fitted to +1/-1 one-vs-rest
targets. Its argmax is scored on the whole evaluation split. big_vision uses one
fixed regulariser (2**10 in its configs) and three seeds; so does this by default.
Several `l2_regs` pick the best one per (shots, seed) on training examples that
were not drawn (the evaluation split is never used to choose).

`extract_features` is the frozen-feature pass shared with the linear probe.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

# The appended bias feature: large, so that its weight is barely regularised.
BIAS_FEATURE = 100.0
# How many undrawn training examples score each candidate regulariser.
SELECTION_EXAMPLES = 2000


def extract_features(model, params, dataset, *, split, batch_size, batch_sharding=None,
                     feature_key="pre_logits"):
  """(features [N, D] float32, labels [N]) of one split, ordered, padding removed.

  `split` is 'train' or 'eval' (`dataset.eval_iter`: unaugmented, in order).
  With `batch_sharding` each batch is this host's slice of a global batch; the
  features are gathered whole on every host.
  """
  out_sharding = (None if batch_sharding is None
                  else NamedSharding(batch_sharding.mesh, PartitionSpec()))
  apply = _feature_fn(model, feature_key, out_sharding)
  features, labels = [], []
  batches = dataset.eval_iter(batch_size, split=split, process_index=jax.process_index(),
                              process_count=jax.process_count())
  for batch in batches:
    batch = {"mask": np.ones(len(batch["label"]), bool), **batch}
    if batch_sharding is not None:
      batch = jax.tree_util.tree_map(
          lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)),
          batch)
    batch_features, batch_labels, mask = jax.device_get(
        apply(params, batch["image"], batch["label"], batch["mask"]))
    mask = np.asarray(mask, bool)
    features.append(np.asarray(batch_features, np.float32)[mask])
    labels.append(np.asarray(batch_labels)[mask])
  if not features or not sum(len(f) for f in features):
    raise ValueError(f"The {split!r} split of {dataset!r} is empty: no features to evaluate.")
  return np.concatenate(features), np.concatenate(labels)


@functools.lru_cache(maxsize=16)
def _feature_fn(model, feature_key, out_sharding):
  def features_of(params, images, labels, mask):
    _, out = model.apply({"params": params}, images)
    if feature_key not in out:
      raise KeyError(f"The model's out dict has no {feature_key!r} (it has "
                     f"{', '.join(sorted(out))}); pass feature_key= one of those.")
    features = out[feature_key]
    if features.ndim != 2:
      raise ValueError(f"out[{feature_key!r}] has shape {features.shape}; a feature "
                       f"evaluator needs one vector per image [batch, dim].")
    return features.astype(jnp.float32), labels, mask
  if out_sharding is None:
    return jax.jit(features_of)
  return jax.jit(features_of, out_shardings=out_sharding)


def standardise_with_bias(features, mean, std):
  """Features standardised by (mean, std), with the constant bias feature appended."""
  features = (features - mean) / std
  bias = jnp.full(features.shape[:-1] + (1,), BIAS_FEATURE, features.dtype)
  return jnp.concatenate([features, bias], axis=-1)


def ridge_weights(x, targets, l2_reg):
  """argmin_W |x W - targets|^2 + l2_reg |W|^2, in closed form: [D, C].

  Solved in whichever of the primal (D x D) or dual (N x N) systems is smaller,
  through its eigendecomposition, so that several regularisers cost one solve.
  """
  return _ridge_from_eigh(_ridge_eigh(x, targets), jnp.asarray(l2_reg, x.dtype))


def _ridge_eigh(x, targets):
  """(left, eigenvalues, right): W(l2) = left @ diag(1 / (eigenvalues + l2)) @ right."""
  num_examples, dim = x.shape
  if num_examples >= dim:  # (x'x + l2 I)^-1 x'y
    eigenvalues, vectors = jnp.linalg.eigh(x.T @ x)
    return vectors, eigenvalues, vectors.T @ (x.T @ targets)
  eigenvalues, vectors = jnp.linalg.eigh(x @ x.T)  # x' (x x' + l2 I)^-1 y
  return x.T @ vectors, eigenvalues, vectors.T @ targets


def _ridge_from_eigh(decomposition, l2_reg):
  left, eigenvalues, right = decomposition
  return (left / (eigenvalues + l2_reg)[None, :]) @ right


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fewshot_accuracies(train_x, train_y, select_x, select_y, select_mask, test_x, test_y,
                        l2_regs, num_classes):
  """(test accuracy of the chosen regulariser, its index) for one draw of shots."""
  mean = jnp.mean(train_x, axis=0, keepdims=True)
  std = jnp.std(train_x, axis=0, keepdims=True) + 1e-5
  x = standardise_with_bias(train_x, mean, std)
  targets = 2.0 * jax.nn.one_hot(train_y, num_classes) - 1.0  # +1 / -1, one vs rest.
  decomposition = _ridge_eigh(x, targets)

  def accuracy(weights, features, labels, mask):
    predictions = jnp.argmax(standardise_with_bias(features, mean, std) @ weights, -1)
    return jnp.sum((predictions == labels) * mask) / jnp.maximum(jnp.sum(mask), 1)

  weights = jax.vmap(lambda l2: _ridge_from_eigh(decomposition, l2))(l2_regs)
  selection = jax.vmap(lambda w: accuracy(w, select_x, select_y, select_mask))(weights)
  best = jnp.argmax(selection)  # First best: ties go to the earlier (listed) regulariser.
  test_mask = jnp.ones(test_y.shape, jnp.float32)
  return accuracy(weights[best], test_x, test_y, test_mask), best


def fewshot_from_features(train_features, train_labels, test_features, test_labels, *,
                          num_classes=None, shots=(1, 5, 10, 25), seeds=(0, 1, 2),
                          l2_regs=(2.0 ** 10,)):
  """Few-shot accuracies from precomputed features; see the module docstring.

  Returns {'fewshot/{k}shot': mean test accuracy over seeds} and, with several
  `l2_regs`, {'fewshot/{k}shot_l2': the median chosen regulariser}. A shot count
  larger than the smallest class is an error.
  """
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  counts = np.bincount(train_labels, minlength=num_classes)
  shots = tuple(int(k) for k in np.atleast_1d(shots))
  if min(shots) < 1 or max(shots) > counts.min():
    raise ValueError(f"shots={shots}: every count must be between 1 and the size of the "
                     f"smallest class in the training split ({counts.min()} examples of "
                     f"class {counts.argmin()}).")
  l2_regs = np.atleast_1d(np.asarray(l2_regs, np.float32))
  train_features = np.asarray(train_features, np.float32)
  metrics = {}
  for k in shots:
    accuracies, chosen = [], []
    for seed in seeds:
      drawn = _draw_shots(train_labels, num_classes, k, seed)
      select_x, select_y, select_mask = _selection_set(train_features, train_labels, drawn,
                                                       seed, len(l2_regs) > 1)
      accuracy, best = _fewshot_accuracies(
          train_features[drawn], train_labels[drawn], select_x, select_y, select_mask,
          test_features, test_labels, l2_regs, num_classes)
      accuracy, best = jax.device_get((accuracy, best))
      accuracies.append(float(accuracy))
      chosen.append(float(l2_regs[best]))
    metrics[f"fewshot/{k}shot"] = float(np.mean(accuracies))
    if len(l2_regs) > 1:
      metrics[f"fewshot/{k}shot_l2"] = float(np.median(chosen))
  return metrics


def _draw_shots(labels, num_classes, shots, seed):
  """Indices of `shots` examples of every class, drawn with `seed`."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots]
                         for c in range(num_classes)])


def _selection_set(features, labels, drawn, seed, needed):
  """Undrawn training examples (fixed size, padded with mask 0) that choose the regulariser."""
  if not needed:
    return features[:1], labels[:1], np.zeros(1, np.float32)
  undrawn = np.setdiff1d(np.arange(len(labels)), drawn)
  undrawn = np.random.default_rng(seed + 1).permutation(undrawn)[:SELECTION_EXAMPLES]
  size = min(SELECTION_EXAMPLES, len(labels))  # One shape, one compilation.
  mask = np.zeros(size, np.float32)
  mask[:len(undrawn)] = 1.0
  index = np.pad(undrawn, (0, size - len(undrawn)))
  return features[index], labels[index], mask


def fewshot(model, params, dataset, *, batch_size, batch_sharding=None,
            shots=(1, 5, 10, 25), seeds=(0, 1, 2), l2_regs=(2.0 ** 10,),
            feature_key="pre_logits"):
  """Few-shot linear accuracy of frozen `out[feature_key]` features (see module docstring).

  Args:
    model, params: any vitjax model whose `out` has `feature_key`.
    dataset: a `vitjax.data.Dataset`; shots are drawn from its training split
      and scored on its evaluation split.
    batch_size, batch_sharding: of the feature pass (as the other evaluators).
    shots: examples per class.
    seeds: one draw of shots per seed; accuracies are averaged over them.
    l2_regs: one regulariser (big_vision: 2**10), or candidates chosen among on
      undrawn training examples.
    feature_key: which entry of the model's `out` dict is the representation.

  Returns:
    {'fewshot/{k}shot': accuracy in [0, 1]} for every k in `shots`.
  """
  common = dict(batch_size=batch_size, batch_sharding=batch_sharding,
                feature_key=feature_key)
  train_x, train_y = extract_features(model, params, dataset, split="train", **common)
  test_x, test_y = extract_features(model, params, dataset, split="eval", **common)
  return fewshot_from_features(train_x, train_y, test_x, test_y,
                               num_classes=getattr(dataset, "num_classes", None),
                               shots=shots, seeds=seeds, l2_regs=l2_regs)
