"""DINO / iBOT / DINOv2 losses against float64 NumPy references written from the papers.

The references loop over view pairs, images and tokens and run the reference
code's Sinkhorn-Knopp in the linear domain, so they share no code (and no
vectorisation trick) with `vitjax.train.tasks.dino_losses`. lightly is not used
as the oracle: it requires torchvision and pytorch_lightning.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.train.tasks import dino_losses

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def cross_entropy(p, student_logits, temperature):
  """-sum_k p_k log softmax(s / T)_k of one sample."""
  s = np.asarray(student_logits, np.float64) / temperature
  log_q = s - s.max() - np.log(np.sum(np.exp(s - s.max())))
  return -np.sum(np.asarray(p, np.float64) * log_q)


def entropy(p):
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0))


def reference_dino_loss(student, teacher_probs, temperature):
  """DINO's main_dino.py DINOLoss: for each teacher view, every other student view."""
  total, pairs = 0.0, 0
  for t in range(len(teacher_probs)):
    for s in range(len(student)):
      if s == t:
        continue
      total += np.mean([cross_entropy(teacher_probs[t, b], student[s, b], temperature)
                        for b in range(student.shape[1])])
      pairs += 1
  return total / pairs


def reference_kl(student, teacher_probs, temperature):
  total, pairs = 0.0, 0
  for t in range(len(teacher_probs)):
    for s in range(len(student)):
      if s != t:
        total += np.mean([cross_entropy(teacher_probs[t, b], student[s, b], temperature)
                          - entropy(teacher_probs[t, b]) for b in range(student.shape[1])])
        pairs += 1
  return total / pairs


def reference_ibot_loss(student, teacher_probs, masks, temperature):
  """iBOT's loss2: per view and image, masked tokens' CE / max(#masked, 1); mean, mean."""
  views, batch, tokens, _ = student.shape
  per_view = []
  for v in range(views):
    per_image = []
    for b in range(batch):
      total = sum(cross_entropy(teacher_probs[v, b, i], student[v, b, i], temperature)
                  for i in range(tokens) if masks[v, b, i])
      per_image.append(total / max(masks[v, b].sum(), 1))
    per_view.append(np.mean(per_image))
  return np.mean(per_view)


def reference_sinkhorn_knopp(logits, temperature, iterations):
  """DINOv2's sinkhorn_knopp_teacher, line by line, on samples [R, K]."""
  q = np.exp(np.asarray(logits, np.float64) / temperature).T  # K x R, as in the paper.
  num_samples, num_prototypes = q.shape[1], q.shape[0]
  q /= q.sum()
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= num_prototypes
    q /= q.sum(axis=0, keepdims=True)
    q /= num_samples
  q *= num_samples
  return q.T


def reference_koleo(features, eps=1e-8):
  """DINOv2's KoLeoLoss: normalise, nearest neighbour by dot product, PairwiseDistance."""
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
  losses = []
  for i in range(len(x)):
    others = [j for j in range(len(x)) if j != i]
    nearest = others[int(np.argmax([x[i] @ x[j] for j in others]))]
    distance = np.linalg.norm(x[i] - x[nearest] + eps)  # torch.pairwise_distance's eps.
    losses.append(-np.log(distance + eps))
  return np.mean(losses)


def random_logits(shape, seed, scale=3.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def test_teacher_probabilities_are_centred_sharpened_softmax():
  logits, center = random_logits((2, 5, 16), 0), random_logits((1, 16), 1)
  got = jax.jit(dino_losses.teacher_probabilities)(logits, center, 0.04)
  chex.assert_trees_all_close(got, softmax((logits - center) / 0.04), **TOLERANCE)
  # bfloat16 logits, float32 probabilities.
  half = dino_losses.teacher_probabilities(logits.astype(jnp.bfloat16), center[0], 0.5)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("student_views", [2, 4])  # 2 pairs; 2 global + 2 local crops: 6.
def test_dino_loss_and_kl_equal_the_reference_over_view_pairs(student_views):
  teacher_probs = softmax(random_logits((2, 6, 32), 2) / 0.5).astype(np.float32)
  student = random_logits((student_views, 6, 32), 3)
  got = jax.jit(dino_losses.dino_loss, static_argnums=2)(student, teacher_probs, 0.1)
  chex.assert_trees_all_close(got, reference_dino_loss(student, teacher_probs, 0.1),
                              **TOLERANCE)
  kl = dino_losses.teacher_student_kl(student, teacher_probs, 0.1)
  chex.assert_trees_all_close(kl, reference_kl(student, teacher_probs, 0.1), **TOLERANCE)
  assert got.dtype == jnp.float32 and got.shape == ()


def test_dino_loss_counts_pairs_of_different_views_only():
  # One teacher view, three student views: the student's view 0 is the teacher's own
  # crop and takes no part; the loss is the mean over views 1 and 2.
  student = random_logits((3, 4, 8), 4)
  teacher = softmax(random_logits((1, 4, 8), 5)).astype(np.float32)
  loss = lambda student: dino_losses.dino_loss(student, teacher, 0.1)
  np.testing.assert_array_equal(jax.grad(loss)(student)[0], 0.0)
  expected = np.mean([np.mean([cross_entropy(teacher[0, b], student[s, b], 0.1)
                               for b in range(4)]) for s in (1, 2)])
  chex.assert_trees_all_close(loss(student), expected, **TOLERANCE)
  # A student equal to its teacher has zero KL.
  probs = softmax(student[:1]).astype(np.float32)
  same = np.concatenate([student[:1], student[:1]])
  chex.assert_trees_all_close(
      dino_losses.teacher_student_kl(same, np.concatenate([probs, probs]), 1.0), 0.0,
      atol=1e-6)
  with pytest.raises(ValueError, match="at least two views"):
    dino_losses.dino_loss(student[:1], teacher, 0.1)


def test_dino_loss_gradient_reaches_the_student_only():
  student, teacher_logits = random_logits((2, 4, 8), 5), random_logits((2, 4, 8), 6)

  def loss(student, teacher_logits):
    probs = dino_losses.teacher_probabilities(teacher_logits, jnp.zeros(8), 0.04)
    return dino_losses.dino_loss(student, probs, 0.1)

  student_grad, teacher_grad = jax.grad(loss, argnums=(0, 1))(student, teacher_logits)
  assert np.abs(student_grad).sum() > 0
  np.testing.assert_array_equal(teacher_grad, 0.0)


def test_ibot_patch_loss_equals_the_reference_with_an_unmasked_image():
  views, batch, tokens, prototypes = 2, 3, 5, 16
  student = random_logits((views, batch, tokens, prototypes), 7)
  teacher_probs = softmax(random_logits((views, batch, tokens, prototypes), 8)
                          / 0.4).astype(np.float32)
  masks = np.random.default_rng(9).random((views, batch, tokens)) < 0.5
  masks[0, 1] = False  # An image with no masked patch: contributes 0 to its view's mean.
  masks[1, 2] = True  # One with every patch masked.
  got = jax.jit(dino_losses.ibot_patch_loss, static_argnums=3)(student, teacher_probs,
                                                               masks, 0.1)
  chex.assert_trees_all_close(got, reference_ibot_loss(student, teacher_probs, masks, 0.1),
                              **TOLERANCE)
  # Nothing masked anywhere: zero, not NaN.
  assert dino_losses.ibot_patch_loss(student, teacher_probs, np.zeros_like(masks), 0.1) == 0.0


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_knopp_equals_dinov2_iterations(iterations):
  logits = random_logits((12, 7), 10, scale=1.0)
  got = jax.jit(dino_losses.sinkhorn_knopp, static_argnums=(1, 2))(logits, 0.1, iterations)
  expected = reference_sinkhorn_knopp(logits, 0.1, iterations)
  chex.assert_trees_all_close(got, expected, **TOLERANCE)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)  # Every sample a distribution.


def test_sinkhorn_knopp_balances_the_prototypes():
  """Each prototype's column sums to R / K as the iterations converge; a softmax does not."""
  logits = random_logits((12, 4), 10, scale=1.0)
  imbalance = lambda probs: np.abs(np.asarray(probs).sum(0) - 12 / 4).max()
  errors = [imbalance(dino_losses.sinkhorn_knopp(logits, 0.5, n)) for n in (1, 3, 50)]
  assert imbalance(softmax(logits / 0.5)) > errors[0] > errors[1] > errors[2]
  assert errors[2] < 1e-4


def test_sinkhorn_knopp_over_views_and_with_a_mask_of_valid_rows():
  # [Vt, B, K]: both views' rows are balanced together, as DINOv2 does.
  logits = random_logits((2, 6, 5), 11, scale=1.0)
  chex.assert_trees_all_close(
      dino_losses.sinkhorn_knopp(logits, 0.2),
      reference_sinkhorn_knopp(logits.reshape(12, 5), 0.2, 3).reshape(2, 6, 5), **TOLERANCE)
  # iBOT patch tokens [V, B, N, K]: only the masked ones are samples; R counts them.
  patches = random_logits((2, 3, 4, 5), 12, scale=1.0)
  mask = np.random.default_rng(13).random((2, 3, 4)) < 0.5
  got = dino_losses.sinkhorn_knopp(patches, 0.2, mask=mask)
  expected = np.zeros((2, 3, 4, 5))
  expected[mask] = reference_sinkhorn_knopp(patches[mask], 0.2, 3)
  chex.assert_trees_all_close(got, expected, **TOLERANCE)
  assert not np.any(got[~mask])
  # Huge logits over a small temperature: no overflow.
  big = dino_losses.sinkhorn_knopp(100.0 * logits, 0.01)
  assert np.all(np.isfinite(big)) and np.allclose(big.sum(-1), 1.0, rtol=1e-5)
  # No valid row: zeros, not NaN.
  np.testing.assert_array_equal(
      dino_losses.sinkhorn_knopp(patches, 0.2, mask=np.zeros_like(mask)), 0.0)


def test_update_center_is_an_ema_of_the_batch_mean():
  center, logits = random_logits((1, 8), 14), random_logits((2, 5, 8), 15)
  got = jax.jit(dino_losses.update_center)(center, logits, 0.9)
  expected = 0.9 * center.astype(np.float64) + 0.1 * logits.reshape(-1, 8).mean(0)
  chex.assert_trees_all_close(got, expected, **TOLERANCE)
  assert got.shape == (1, 8)
  assert dino_losses.update_center(center[0], logits, 0.9).shape == (8,)
  mask = np.array([[True, False, True, False, False], [False] * 5])
  chex.assert_trees_all_close(
      dino_losses.update_center(center, logits, 0.5, mask=mask),
      0.5 * center + 0.5 * logits[mask].astype(np.float64).mean(0), **TOLERANCE)


def test_koleo_equals_dinov2_and_is_finite_for_a_duplicated_point():
  features = random_logits((9, 6), 16)
  chex.assert_trees_all_close(jax.jit(dino_losses.koleo_loss)(features),
                              reference_koleo(features), **TOLERANCE)
  duplicated = np.concatenate([features, features[:1]])  # Row 0 twice: distance 0.
  got = dino_losses.koleo_loss(duplicated)
  chex.assert_trees_all_close(got, reference_koleo(duplicated), **TOLERANCE)
  # Finite, each copy at -log(|eps|_2 + eps) = -log((sqrt(6) + 1) 1e-8).
  assert np.isfinite(got) and got > 2 * -np.log(3.45e-8) / 10
  # Spread features cost less than clustered ones.
  clustered = features[:1] + 0.01 * features
  assert dino_losses.koleo_loss(features) < dino_losses.koleo_loss(clustered)
  with pytest.raises(ValueError, match="batch >= 2"):
    dino_losses.koleo_loss(features[:1])


def test_collapse_monitors():
  probs = softmax(random_logits((2, 6, 10), 17)).astype(np.float32)
  chex.assert_trees_all_close(dino_losses.teacher_entropy(probs),
                              np.mean([entropy(p) for p in probs.reshape(-1, 10)]),
                              **TOLERANCE)
  chex.assert_trees_all_close(dino_losses.mean_distribution_entropy(probs),
                              entropy(probs.reshape(-1, 10).astype(np.float64).mean(0)),
                              **TOLERANCE)
  # Every sample on the same prototype: both 0. Every sample on its own: log K and 0.
  same = np.zeros((12, 10), np.float32)
  same[:, 3] = 1.0
  own = np.eye(10, dtype=np.float32)
  assert dino_losses.teacher_entropy(same) == 0.0
  assert dino_losses.mean_distribution_entropy(same) == 0.0
  assert dino_losses.teacher_entropy(own) == 0.0
  chex.assert_trees_all_close(dino_losses.mean_distribution_entropy(own), np.log(10),
                              **TOLERANCE)
  # A mask keeps zero rows (Sinkhorn-Knopp's invalid ones) out of the means.
  padded = np.concatenate([probs[0], np.zeros((3, 10), np.float32)])
  valid = np.arange(9) < 6
  chex.assert_trees_all_close(dino_losses.teacher_entropy(padded, mask=valid),
                              dino_losses.teacher_entropy(probs[0]), **TOLERANCE)
  chex.assert_trees_all_close(dino_losses.mean_distribution_entropy(padded, mask=valid),
                              dino_losses.mean_distribution_entropy(probs[0]), **TOLERANCE)
