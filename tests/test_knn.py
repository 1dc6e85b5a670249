"""DINO's weighted k-NN evaluator: against a NumPy reference, its ties, its options, end to end."""

import jax
import numpy as np
import pytest

import vitjax
from vitjax import config as config_lib
from vitjax import data as data_lib
from vitjax import evaluate
from vitjax.evaluate import fewshot as fewshot_lib
from vitjax.evaluate import knn as knn_lib


def reference_knn(train_features, train_labels, test_features, k, temperature, num_classes):
  """DINO's knn_classifier, example by example in float64: (ranked classes, votes) [M, C]."""
  normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  train = normalise(np.asarray(train_features, np.float64))
  test = normalise(np.asarray(test_features, np.float64))
  ranked, votes = [], []
  for x in test:
    similarity = train @ x
    nearest = np.argsort(-similarity, kind="stable")[:k]
    vote = np.zeros(num_classes)
    for j in nearest:
      vote[train_labels[j]] += np.exp(similarity[j] / temperature)
    order = np.argsort(-vote, kind="stable")
    ranked.append(order)
    votes.append(vote[order] / np.exp(similarity[nearest[0]] / temperature))
  return np.array(ranked), np.array(votes)


def reference_accuracies(train_features, train_labels, test_features, test_labels, k,
                         temperature, num_classes):
  ranked, votes = reference_knn(train_features, train_labels, test_features, k, temperature,
                                num_classes)
  hits = (ranked == test_labels[:, None]) & (votes > 0)
  return {"knn/top1": np.mean(hits[:, 0]), "knn/top5": np.mean(hits[:, :5].any(1))}


def noisy_clusters(num_classes=6, per_class=12, dim=10, noise=1.5, seed=0):
  centres = np.random.default_rng(99).standard_normal((num_classes, dim))
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
  features = centres[labels] + noise * rng.standard_normal((len(labels), dim))
  return features.astype(np.float32), labels


@pytest.mark.parametrize("k,temperature", [(7, 0.1), (1, 0.07), (30, 0.5)])
def test_knn_classify_equals_the_numpy_reference(k, temperature):
  train_x, train_y = noisy_clusters()
  test_x, test_y = noisy_clusters(per_class=8, seed=1)
  classes, votes = knn_lib.knn_classify(train_x, train_y, test_x, k=k,
                                        temperature=temperature, num_classes=6, ranks=6,
                                        chunk_size=16)  # 48 test examples: 3 chunks.
  expected_classes, expected_votes = reference_knn(train_x, train_y, test_x, k,
                                                   temperature, 6)
  np.testing.assert_array_equal(classes, expected_classes)  # Unvoted ones: lower first.
  np.testing.assert_allclose(votes, expected_votes, rtol=1e-5, atol=1e-6)

  metrics = knn_lib.knn_from_features(train_x, train_y, test_x, test_y, k=k,
                                      temperature=temperature, num_classes=6)
  expected = reference_accuracies(train_x, train_y, test_x, test_y, k, temperature, 6)
  assert metrics == pytest.approx(expected, abs=1e-9)
  assert 0.2 < metrics["knn/top1"] < 1.0  # Noisy: a real check, not a trivial 100%.


def test_knn_ties_are_deterministic_and_chunks_change_nothing():
  # One-hot features: exact similarities. Training rows 0 and 1 are the same point.
  train_x = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]
  train_y = np.array([2, 1, 0, 0])
  test_x = np.eye(3, dtype=np.float32)[[0]]
  classify = lambda k: knn_lib.knn_classify(train_x, train_y, test_x, k=k, num_classes=3,
                                            ranks=3)
  assert classify(1)[0][0, 0] == 2  # Equally similar neighbours: the earlier one.
  classes, votes = classify(2)
  assert classes[0, 0] == 1 and votes[0, 0] == votes[0, 1] == 1.0  # Equal votes: lower class.
  # A rerun gives the same bits; the chunk size (and the padding of the last chunk)
  # the same classes, the votes to float32 rounding (another matmul shape).
  train_x, train_y = noisy_clusters()
  test_x, _ = noisy_clusters(per_class=5, seed=2)
  run = lambda size: knn_lib.knn_classify(train_x, train_y, test_x, k=5, ranks=3,
                                          chunk_size=size)
  for first, again in zip(run(7), run(7)):
    np.testing.assert_array_equal(first, again)
  for classes, votes in (run(7), run(1000)):
    np.testing.assert_array_equal(classes, run(1)[0])
    np.testing.assert_allclose(votes, run(1)[1], rtol=1e-5)


def test_knn_k_beyond_the_training_split_uses_all_of_it_and_top5_needs_votes():
  train_x, train_y = noisy_clusters(per_class=2)  # 12 examples.
  test_x, test_y = noisy_clusters(per_class=3, seed=3)
  everything = knn_lib.knn_from_features(train_x, train_y, test_x, test_y, k=12)
  assert knn_lib.knn_from_features(train_x, train_y, test_x, test_y, k=1000) == everything
  # One neighbour votes for one class: top-5 is top-1 (unvoted classes never count).
  one = knn_lib.knn_from_features(train_x, train_y, test_x, test_y, k=1)
  assert one["knn/top5"] == one["knn/top1"]
  # Fewer than 5 classes: no top-5.
  assert set(knn_lib.knn_from_features(train_x, train_y % 3, test_x, test_y % 3)) == {
      "knn/top1"}
  # A tiny temperature neither overflows nor underflows: the nearest neighbour's class wins.
  classes, votes = knn_lib.knn_classify(train_x, train_y, test_x, k=12, temperature=1e-4)
  assert np.all(np.isfinite(votes))
  np.testing.assert_array_equal(
      classes[:, 0], knn_lib.knn_classify(train_x, train_y, test_x, k=1)[0][:, 0])


@pytest.mark.parametrize("options,message", [
    (dict(k=0), "k=0"), (dict(k=2.5), "k=2.5"), (dict(k=True), "k=True"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(chunk_size=0), "chunk_size"), (dict(num_classes=3), r"\[0, 3\)"),
])
def test_knn_invalid_options_are_clear_errors(options, message):
  train_x, train_y = noisy_clusters()
  with pytest.raises(ValueError, match=message):
    knn_lib.knn_classify(train_x, train_y, train_x[:4], **options)


def test_knn_evaluator_on_digits_with_a_tiny_vit():
  dataset = data_lib.get_dataset(config_lib.load_config("configs/quickstart.py:image_size=8"))
  model = vitjax.create_model("vit", variant="mu/4", depth=1, image_size=8, num_classes=10,
                              pool_type="gap")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)))["params"]
  with pytest.raises(ValueError, match="k=0"):  # Before any feature is computed.
    evaluate.run_evaluator("knn", model, params, dataset, batch_size=500, k=0)
  metrics = evaluate.run_evaluator("knn", model, params, dataset, batch_size=500, k=10)
  # The same as k-NN on the features the other feature evaluators see.
  common = dict(batch_size=500)
  train_x, train_y = fewshot_lib.extract_features(model, params, dataset, split="train",
                                                  **common)
  test_x, test_y = fewshot_lib.extract_features(model, params, dataset, split="eval", **common)
  assert metrics == knn_lib.knn_from_features(train_x, train_y, test_x, test_y, k=10,
                                              num_classes=10)
  # A random tiny ViT's features of the digits are far above chance (10%).
  assert metrics["knn/top1"] > 0.5 and metrics["knn/top5"] >= metrics["knn/top1"], metrics
