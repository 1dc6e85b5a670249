"""Few-shot (closed-form ridge regression) and linear-probe evaluators on frozen features."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from vitjax import config as config_lib
from vitjax import data as data_lib
from vitjax import evaluate
from vitjax.evaluate import fewshot as fewshot_lib
from vitjax.evaluate import linear_probe as linear_probe_lib


def separable_features(num_classes=5, per_class=40, dim=16, seed=0, noise=0.3):
  """Gaussian clusters around fixed, well-separated centres; `seed` draws the examples."""
  centres = 3.0 * np.random.default_rng(1234).standard_normal((num_classes, dim))
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
  features = centres[labels] + noise * rng.standard_normal((len(labels), dim))
  return features.astype(np.float32), labels


@pytest.mark.parametrize("num_examples,dim", [(40, 8), (6, 12)])  # primal and dual systems
def test_ridge_weights_equal_numpy_least_squares(num_examples, dim):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((num_examples, dim)).astype(np.float32)
  targets = 2.0 * np.eye(3)[rng.integers(0, 3, num_examples)] - 1.0
  l2 = 0.7
  expected = np.linalg.solve(x.T.astype(np.float64) @ x + l2 * np.eye(dim), x.T @ targets)
  got = fewshot_lib.ridge_weights(x, targets.astype(np.float32), l2)
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4)


def test_fewshot_accuracy_equals_numpy_reference():
  """Per shot count: whitened features + bias feature, +-1 targets, ridge, argmax on test."""
  train_x, train_y = separable_features(noise=3.0, seed=2)
  test_x, test_y = separable_features(noise=3.0, seed=3, per_class=20)
  shots, seed, l2 = 3, 7, 2.0 ** 3
  got = fewshot_lib.fewshot_from_features(train_x, train_y, test_x, test_y, shots=(shots,),
                                          seeds=(seed,), l2_regs=(l2,))

  rng = np.random.default_rng(seed)
  drawn = np.concatenate([rng.permutation(np.flatnonzero(train_y == c))[:shots]
                          for c in range(5)])
  x, y = train_x[drawn].astype(np.float64), train_y[drawn]
  mean, std = x.mean(0), x.std(0) + 1e-5
  with_bias = lambda f: np.concatenate([(f - mean) / std, np.full((len(f), 1), 100.0)], 1)
  x = with_bias(x)
  weights = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ (2 * np.eye(5)[y] - 1))
  expected = np.mean(np.argmax(with_bias(test_x) @ weights, 1) == test_y)
  assert 0.3 < expected < 1.0  # The noise makes this a real check, not a trivial 100%.
  assert got == {"fewshot/3shot": pytest.approx(expected, abs=1e-6)}


def test_fewshot_separable_features_are_perfect_from_one_shot():
  train_x, train_y = separable_features()
  test_x, test_y = separable_features(seed=1, per_class=20)
  metrics = fewshot_lib.fewshot_from_features(train_x, train_y, test_x, test_y,
                                              shots=(1, 5), seeds=(0, 1))
  assert set(metrics) == {"fewshot/1shot", "fewshot/5shot"}
  assert all(value >= 0.99 for value in metrics.values()), metrics


def test_fewshot_chooses_the_regulariser_on_training_examples_only():
  # Noisy, high-dimensional, 3 shots: strong regularisation generalises better.
  train_x, train_y = separable_features(per_class=200, dim=64, noise=6.0)
  test_x, test_y = separable_features(per_class=200, dim=64, noise=6.0, seed=1)
  run = lambda l2_regs, labels=test_y: fewshot_lib.fewshot_from_features(
      train_x, train_y, test_x, labels, shots=(3,), seeds=(0,), l2_regs=l2_regs)
  weak, strong = run((1e-3,))["fewshot/3shot"], run((1e4,))["fewshot/3shot"]
  assert strong > weak + 0.05
  for candidates in ((1e-3, 1e4), (1e4, 1e-3)):
    assert run(candidates) == {"fewshot/3shot": strong, "fewshot/3shot_l2": 1e4}
  # The evaluation labels play no part in the choice.
  assert run((1e-3, 1e4), labels=np.roll(test_y, 1))["fewshot/3shot_l2"] == 1e4


def test_fewshot_more_shots_than_a_class_has_is_a_clear_error():
  train_x, train_y = separable_features(per_class=4)
  with pytest.raises(ValueError, match="smallest class"):
    fewshot_lib.fewshot_from_features(train_x, train_y, train_x, train_y, shots=(5,))


def test_linear_probe_separable_features_high_accuracy_and_deterministic():
  train_x, train_y = separable_features(noise=1.0, dim=32)
  test_x, test_y = separable_features(noise=1.0, dim=32, seed=1)
  train = lambda seed: linear_probe_lib.train_linear_probe(train_x, train_y, num_classes=5,
                                                           steps=100, seed=seed)
  head, again, other_seed = train(3), train(3), train(4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, head, again)
  assert not np.array_equal(head["kernel"], other_seed["kernel"])
  predictions = np.argmax(linear_probe_lib.probe_logits(head, test_x), -1)
  assert np.mean(predictions == test_y) >= 0.98


class PixelFeatures(nn.Module):
  """A stand-in for any vitjax model: `(logits, out)` with `out['pre_logits']`, cheap to compile."""

  @nn.compact
  def __call__(self, images, train=False):
    pre_logits = nn.tanh(nn.Dense(32)(images.reshape(len(images), -1)))
    logits = nn.Dense(10)(pre_logits)
    return logits, {"pre_logits": pre_logits, "logits": logits}


def test_feature_evaluators_read_pre_logits_of_every_example_by_name():
  dataset = data_lib.get_dataset(config_lib.load_config("configs/quickstart.py:image_size=8"))
  model = PixelFeatures()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)))["params"]
  train_x, train_y = fewshot_lib.extract_features(model, params, dataset, split="train",
                                                  batch_size=500)
  test_x, _ = fewshot_lib.extract_features(model, params, dataset, split="eval",
                                           batch_size=500)
  assert train_x.shape == (1437, 32) and test_x.shape == (360, 32)  # Padding dropped.
  first = next(dataset.eval_iter(500, split="train"))
  _, out = model.apply({"params": params}, first["image"][:4])
  np.testing.assert_allclose(train_x[:4], out["pre_logits"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(train_y[:500], first["label"])

  # By name, as the trainer calls them. Random features of digits are far above chance.
  shots = evaluate.run_evaluator("fewshot", model, params, dataset, batch_size=500,
                                 shots=(10,), seeds=(0,))
  probe = evaluate.run_evaluator("linear_probe", model, params, dataset, batch_size=500,
                                 steps=100)
  assert shots["fewshot/10shot"] > 0.6 and probe["linear_probe/top1"] > 0.8, (shots, probe)

  with pytest.raises(KeyError, match="has no 'nope'"):
    fewshot_lib.fewshot(model, params, dataset, batch_size=500, feature_key="nope")
