"""Weighted k-nearest-neighbour classification on frozen features, as DINO evaluates.

    knn(model, params, dataset, batch_size=256) -> {'knn/top1': 0.92, 'knn/top5': 0.99}

As DINO's `eval_knn.py` (Caron et al. 2021, after Wu et al. 2018): the features
(`out['pre_logits']`, or another entry of `out`) of the training split
(unaugmented, in order) and of the evaluation split are L2-normalised; each
evaluation example finds the k training examples of highest cosine similarity
s_j, and each of them votes for its class with weight exp(s_j / T). The
prediction is the class with the most votes; top-5 counts the label among the
five classes with the most votes (classes that got none never count, so with
k < 5 it is DINO's top-k). DINO reports k = 20, T = 0.07 (and k in 10, 20, 100,
200). Nothing is trained: no seed, no hyperparameter but k and T.

Exact and deterministic: similarities at full float32 precision (no bfloat16
matmul passes on TPU or TF32 on GPU), votes summed neighbour by neighbour in a
fixed order, ties between equally similar training examples to the earlier one,
ties between equal votes to the lower class index; a rerun gives the same bits
(another `chunk_size` is another matmul shape: votes equal to float32 rounding).
The weights are computed as exp((s_j - s_max) / T): the same ranking as DINO's
exp(s_j / T) (every vote of one example scaled alike), without overflow at
small T. The evaluation features are processed in chunks of `chunk_size`, so
memory is the training features plus chunk_size x (training examples)
similarities.
"""

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.evaluate.fewshot import extract_features

TOP5 = 5


def knn_classify(train_features, train_labels, test_features, *, k=20, temperature=0.07,
                 num_classes=None, ranks=1, chunk_size=256):
  """The `ranks` classes with the most weighted votes for each test feature.

  Args:
    train_features: [N, D]; L2-normalised here.
    train_labels: [N] ints in [0, num_classes).
    test_features: [M, D]; L2-normalised here.
    k: neighbours per test example; larger than N means all N (every training
      example votes).
    temperature: T of the vote weights exp(similarity / T).
    num_classes: default: the largest training label + 1.
    ranks: how many classes to return per example (at most `num_classes`).
    chunk_size: test examples per similarity matrix [chunk_size, N].

  Returns:
    (classes [M, ranks] int32, votes [M, ranks] float32) as NumPy arrays: the
    classes by decreasing vote, ties to the lower class index, and their votes
    in units of the nearest neighbour's weight (its weight is 1). A class with
    vote 0 got no vote.
  """
  train_labels = np.asarray(train_labels)
  train_features, test_features = _normalised(train_features), _normalised(test_features)
  if train_features.ndim != 2 or test_features.ndim != 2 or (
      train_features.shape[1] != test_features.shape[1]):
    raise ValueError(f"Expected features [examples, dim] of the same dim; got training "
                     f"{train_features.shape} and test {test_features.shape}.")
  if train_labels.shape != train_features.shape[:1]:
    raise ValueError(f"{len(train_labels)} training labels for {len(train_features)} "
                     f"training features.")
  if not len(train_labels):
    raise ValueError("No training features: k-NN needs examples to vote.")
  _check_options(k, temperature, chunk_size)
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"Training labels must lie in [0, {num_classes}); they span "
                     f"[{train_labels.min()}, {train_labels.max()}].")
  if not 1 <= ranks <= num_classes:
    raise ValueError(f"ranks={ranks}: must be between 1 and num_classes={num_classes}.")
  neighbours = min(int(k), len(train_labels))
  num_test = len(test_features)
  if not num_test:
    return np.zeros((0, ranks), np.int32), np.zeros((0, ranks), np.float32)
  chunk = max(1, min(int(chunk_size), num_test))  # One shape, one compilation.
  padded = np.pad(test_features, ((0, -num_test % chunk), (0, 0)))
  train_features = jnp.asarray(train_features)
  train_labels = jnp.asarray(train_labels, jnp.int32)
  temperature = np.float32(temperature)
  classes, votes = [], []
  for start in range(0, len(padded), chunk):
    chunk_classes, chunk_votes = jax.device_get(_vote(
        train_features, train_labels, padded[start:start + chunk], temperature,
        k=neighbours, num_classes=int(num_classes), ranks=int(ranks)))
    classes.append(chunk_classes)
    votes.append(chunk_votes)
  return np.concatenate(classes)[:num_test], np.concatenate(votes)[:num_test]


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "ranks"))
def _vote(train_features, train_labels, test_features, temperature, *, k, num_classes,
          ranks):
  similarity = jnp.matmul(test_features, train_features.T,
                          precision=jax.lax.Precision.HIGHEST)  # [chunk, N]
  nearest, index = jax.lax.top_k(similarity, k)  # Ties: the lower index first.
  weights = jnp.exp((nearest - nearest[:, :1]) / temperature)
  labels = train_labels[index]
  rows = jnp.arange(len(test_features))

  def add_vote(j, votes):  # Neighbour by neighbour: a fixed order of sums, memory [chunk, C].
    return votes.at[rows, labels[:, j]].add(weights[:, j])

  votes = jax.lax.fori_loop(0, k, add_vote,
                            jnp.zeros((len(test_features), num_classes), jnp.float32))
  top_votes, top_classes = jax.lax.top_k(votes, ranks)  # Ties: the lower class first.
  return top_classes.astype(jnp.int32), top_votes


def _normalised(features):
  features = np.asarray(features, np.float32)
  norms = np.linalg.norm(features, axis=-1, keepdims=True)
  return features / np.maximum(norms, 1e-12)  # As torch's F.normalize, which DINO uses.


def _check_options(k, temperature, chunk_size):
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"k={k!r}: the number of neighbours must be an integer >= 1.")
  if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
      or not math.isfinite(temperature) or temperature <= 0):
    raise ValueError(f"temperature={temperature!r}: must be a finite number > 0 "
                     f"(DINO: 0.07).")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or (
      chunk_size < 1):
    raise ValueError(f"chunk_size={chunk_size!r}: must be an integer >= 1.")


def knn_from_features(train_features, train_labels, test_features, test_labels, *, k=20,
                      temperature=0.07, num_classes=None, chunk_size=256):
  """{'knn/top1', and 'knn/top5' with 5 classes or more}: accuracies in [0, 1]."""
  test_labels = np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
  ranks = min(TOP5, num_classes)
  classes, votes = knn_classify(train_features, train_labels, test_features, k=k,
                                temperature=temperature, num_classes=num_classes,
                                ranks=ranks, chunk_size=chunk_size)
  hits = (classes == test_labels[:, None]) & (votes > 0)  # A class nobody voted for: a miss.
  metrics = {"knn/top1": float(np.mean(hits[:, 0]))}
  if num_classes >= TOP5:
    metrics["knn/top5"] = float(np.mean(np.any(hits, axis=1)))
  return metrics


def knn(model, params, dataset, *, batch_size, batch_sharding=None, k=20, temperature=0.07,
        feature_key="pre_logits", chunk_size=256):
  """Weighted k-NN accuracy of frozen `out[feature_key]` features (see module docstring).

  Args:
    model, params: any vitjax model whose `out` has `feature_key` (a vector per image).
    dataset: a `vitjax.data.Dataset`: neighbours from its training split
      (unaugmented), scored on its evaluation split.
    batch_size, batch_sharding: of the feature pass (as the other evaluators).
    k: neighbours (DINO: 20); more than the training split has means all of it.
    temperature: T of the vote weights exp(cosine similarity / T) (DINO: 0.07).
    feature_key: which entry of the model's `out` dict is the representation.
    chunk_size: evaluation examples compared with the training split at once.

  Returns:
    {'knn/top1': accuracy in [0, 1]}, and 'knn/top5' when there are 5 classes or more.
  """
  _check_options(k, temperature, chunk_size)  # Before the feature pass.
  common = dict(batch_size=batch_size, batch_sharding=batch_sharding,
                feature_key=feature_key)
  train_x, train_y = extract_features(model, params, dataset, split="train", **common)
  test_x, test_y = extract_features(model, params, dataset, split="eval", **common)
  return knn_from_features(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                           num_classes=getattr(dataset, "num_classes", None),
                           chunk_size=chunk_size)
