"""Self-distillation losses of DINO, iBOT and DINOv2, as pure functions of arrays.

    probs = teacher_probabilities(teacher_logits, center, temperature=0.04)  # or:
    probs = sinkhorn_knopp(teacher_logits, temperature=0.07)                  # DINOv2
    loss = dino_loss(student_logits, probs, student_temperature=0.1)
    center = update_center(center, teacher_logits, momentum=0.9)

From the papers, with the reference code where the paper leaves a detail open:
DINO (Caron et al. 2021, facebookresearch/dino), iBOT (Zhou et al. 2022,
bytedance/ibot) and DINOv2 (Oquab et al. 2023, facebookresearch/dinov2: KoLeo,
Sinkhorn-Knopp centring). Every function is jittable, computes in float32
whatever the input dtype (bfloat16 logits of K = 65536 prototypes lose the
softmax's tail otherwise), and returns scalars or probabilities; the state (the
centre) is passed in and returned, never kept. The teacher side
(`teacher_probabilities`, `sinkhorn_knopp`) stops gradients, as the papers'
`detach()` / `no_grad` do. Under `jit` on a sharded batch the batch means and
sums are over the global batch, which takes the place of the reference code's
`all_reduce`.

Shapes: V views, B images, N patch tokens, K prototypes (the head's outputs), D
feature width. The first `Vt` student views are the global crops, in the
teacher's order; the others are local crops, seen by the student only.

Checked by `tests/test_dino_losses.py` against float64 NumPy implementations
written independently from the papers (explicit loops over view pairs and
tokens, the reference code's Sinkhorn-Knopp iterations in the linear domain), to
1e-5. lightly's `DINOLoss` / `IBOTPatchLoss` / `KoLeoLoss` would be the natural
oracle, but lightly 1.6 requires torchvision and pytorch_lightning (which pull a
multi-GB CUDA PyTorch), so it is not a test dependency; its three loss files,
loaded once by hand on CPU PyTorch, agreed with these functions to 2e-6.
"""

import jax
import jax.numpy as jnp


def teacher_probabilities(teacher_logits, center, temperature):
  """DINO's centred, sharpened teacher distribution: softmax((t - c) / T_t).

  Args:
    teacher_logits: [..., K] (e.g. [Vt, B, K] or [V, B, N, K]).
    center: [K] or any shape that broadcasts against the logits ([1, K]).
    temperature: T_t (DINO: 0.04, warmed up from 0.04 to 0.07 in some runs).

  Returns:
    [..., K] float32 probabilities over the last axis, without gradient.
  """
  logits = jnp.asarray(teacher_logits, jnp.float32)
  centered = (logits - jnp.asarray(center, jnp.float32)) / temperature
  return jax.lax.stop_gradient(jax.nn.softmax(centered, axis=-1))


def sinkhorn_knopp(teacher_logits, temperature, iterations=3, mask=None):
  """DINOv2's Sinkhorn-Knopp centring of the teacher (SwAV's equipartition).

  Every row of the leading axes is one sample, and all of them are balanced
  together, as DINOv2 does over the class tokens of both global views ([Vt, B, K])
  or over the masked patch tokens of a batch ([V, B, N, K] with `mask`). With
  R samples (rows) and Q = exp(t / T) [R, K], normalised to sum to 1:

      repeat `iterations` times:
        Q <- Q / (sum over samples) / K     each prototype holds 1 / K of the mass
        Q <- Q / (sum over prototypes) / R  each sample holds 1 / R
      return R * Q                          each row sums to 1

  so every row is a distribution and each prototype's column sums to about R / K
  (exactly after the prototype step; the last step is per sample). Computed in
  the log domain, which is the same arithmetic but cannot overflow exp(t / T).

  Args:
    teacher_logits: [..., K].
    temperature: T_t.
    iterations: Sinkhorn-Knopp iterations (DINOv2: 3).
    mask: optional bool [...] (the logits' shape without K): the rows that are
      samples, e.g. iBOT's masked patch tokens. The others take no part (R counts
      the valid rows only) and get all-zero rows.

  Returns:
    [..., K] float32 probabilities, without gradient.
  """
  logits = jnp.asarray(teacher_logits, jnp.float32)
  num_prototypes = logits.shape[-1]
  rows = logits.reshape(-1, num_prototypes) / temperature
  if mask is None:
    valid = jnp.ones(rows.shape[:1], jnp.float32)
  else:
    valid = jnp.broadcast_to(mask, logits.shape[:-1]).reshape(-1).astype(jnp.float32)
  num_samples = jnp.sum(valid)
  weights = valid[:, None]  # Sums over samples count the valid rows only.
  log_q = rows - jax.nn.logsumexp(rows, b=jnp.broadcast_to(weights, rows.shape))
  for _ in range(iterations):
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, b=weights, keepdims=True)
    log_q = log_q - jnp.log(num_prototypes)
    log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
    log_q = log_q - jnp.log(num_samples)
  probs = jnp.exp(log_q + jnp.log(num_samples))
  probs = jnp.where(valid[:, None] > 0, probs, 0.0)  # Also where no row is valid (NaN).
  return jax.lax.stop_gradient(probs.reshape(logits.shape))


def dino_loss(student_logits, teacher_probs, student_temperature):
  """DINO's cross-view cross-entropy, averaged over the (teacher, student) view pairs.

      L = 1 / |P| * sum_{(t, s) in P} mean_b  -sum_k p_t[b, k] log softmax(s_s[b] / T_s)_k

  with P every pair of teacher view t < Vt and student view s < Vs with s != t
  (a global crop is not matched with itself; with Vs = Vt = 2 that is 2 pairs,
  with 2 global and 8 local crops 18).

  Args:
    student_logits: [Vs, B, K], the global crops first, in the teacher's order.
    teacher_probs: [Vt, B, K] (`teacher_probabilities` or `sinkhorn_knopp`).
    student_temperature: T_s (DINO: 0.1).

  Returns:
    The scalar loss, float32.
  """
  cross = _pair_cross_entropies(student_logits, teacher_probs, student_temperature)
  return jnp.sum(cross * _pair_mask(cross.shape)) / _num_pairs(cross.shape)


def ibot_patch_loss(student_patch_logits, teacher_patch_probs, masks, student_temperature):
  """iBOT's masked image modelling loss on the patch tokens of each global view.

      L = mean_v mean_b  sum_i m[v, b, i] * CE(p_t[v, b, i], s[v, b, i]) / max(sum_i m[v, b, i], 1)
      CE(p, s) = -sum_k p_k log softmax(s / T_s)_k

  The student sees view v with the masked patches replaced by the mask token; the
  teacher sees it whole. Only same-view pairs count, as in iBOT's code; an image
  with no masked patch adds 0 to its view's mean (DINOv2 likewise divides by all
  images).

  Args:
    student_patch_logits: [V, B, N, K].
    teacher_patch_probs: [V, B, N, K].
    masks: bool [V, B, N], True where the student's patch was masked.
    student_temperature: T_s.

  Returns:
    The scalar loss, float32.
  """
  log_probs = jax.nn.log_softmax(
      jnp.asarray(student_patch_logits, jnp.float32) / student_temperature, axis=-1)
  cross = -jnp.sum(jnp.asarray(teacher_patch_probs, jnp.float32) * log_probs, axis=-1)
  masks = jnp.asarray(masks, jnp.float32)
  per_image = jnp.sum(cross * masks, axis=-1) / jnp.maximum(jnp.sum(masks, axis=-1), 1.0)
  return jnp.mean(per_image)  # Over images, then views: every view has B images.


def update_center(center, teacher_logits, momentum, mask=None):
  """DINO's centre: an EMA of the teacher's batch-mean logits.

      c <- m * c + (1 - m) * mean_rows(t)

  Args:
    center: [K] or [1, K]; the result has the same shape (and float32 dtype).
    teacher_logits: [..., K]; the mean is over every leading axis (DINO: both
      global views and the batch).
    momentum: m (DINO: 0.9).
    mask: optional bool [...]: average the valid rows only (as DINOv2's iBOT
      centre, over the masked patch tokens).

  Returns:
    The new centre, without gradient.
  """
  center = jnp.asarray(center, jnp.float32)
  logits = jnp.asarray(teacher_logits, jnp.float32)
  batch_mean = _row_mean(logits, mask)
  new = center * momentum + batch_mean.reshape(center.shape) * (1.0 - momentum)
  return jax.lax.stop_gradient(new)


def koleo_loss(features, eps=1e-8):
  """DINOv2's KoLeo regulariser (Sablayrolles et al. 2019): spread the batch's features.

      x_i <- x_i / max(|x_i|, eps)
      n(i) = argmax_{j != i} <x_i, x_j>            (the nearest neighbour on the sphere)
      L = -1 / B * sum_i log(|x_i - x_n(i) + eps| + eps)

  The `+ eps` inside the norm is PyTorch's `PairwiseDistance(eps)`, which
  DINOv2 uses, so a duplicated feature gives a large but finite loss. (DINOv2
  fills the diagonal of the dot products with -1, which can tie with an
  antipodal point; -inf here excludes the point itself always.) DINOv2 applies
  it to the class token of each global view separately and sums.

  Args:
    features: [B, D], B >= 2 (typically the student's class tokens before the head).
    eps: as DINOv2 (1e-8).

  Returns:
    The scalar loss, float32.
  """
  x = jnp.asarray(features, jnp.float32)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"koleo_loss needs features [batch >= 2, dim], got shape {x.shape}.")
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  dots = x @ x.T
  dots = jnp.where(jnp.eye(len(x), dtype=bool), -jnp.inf, dots)  # Never its own neighbour.
  neighbours = x[jnp.argmax(dots, axis=1)]
  distances = jnp.linalg.norm(x - neighbours + eps, axis=-1)
  return -jnp.mean(jnp.log(distances + eps))


def teacher_entropy(teacher_probs, mask=None):
  """Mean entropy of the per-sample teacher distributions, -sum_k p_k log p_k.

  Near 0: sharpening dominates (every sample one-hot); near log K: centring
  dominates (every sample uniform). Either extreme is a collapse.

  Args:
    teacher_probs: [..., K].
    mask: optional bool [...]: average over the valid rows only.

  Returns:
    A float32 scalar, in nats.
  """
  probs = jnp.asarray(teacher_probs, jnp.float32)
  return _masked_mean(_entropy(probs), mask)


def mean_distribution_entropy(teacher_probs, mask=None):
  """Entropy of the batch-mean teacher distribution, H(mean_rows p).

  Low when every sample picks the same few prototypes (collapse to one
  dimension); near log K when the batch uses all of them.

  Args:
    teacher_probs: [..., K].
    mask: optional bool [...]: average over the valid rows only.

  Returns:
    A float32 scalar, in nats.
  """
  probs = jnp.asarray(teacher_probs, jnp.float32)
  return _entropy(_row_mean(probs, mask))


def teacher_student_kl(student_logits, teacher_probs, student_temperature):
  """Mean KL(p_t || softmax(s / T_s)) over `dino_loss`'s view pairs.

  `dino_loss` minus the teacher's entropy on the same pairs: 0 when the student
  matches the teacher, whatever the teacher's sharpness.

  Args:
    student_logits: [Vs, B, K].
    teacher_probs: [Vt, B, K].
    student_temperature: T_s.

  Returns:
    A float32 scalar, in nats.
  """
  cross = _pair_cross_entropies(student_logits, teacher_probs, student_temperature)
  entropies = jnp.mean(_entropy(jnp.asarray(teacher_probs, jnp.float32)), axis=1)  # [Vt]
  kl = cross - entropies[:, None]
  return jnp.sum(kl * _pair_mask(kl.shape)) / _num_pairs(kl.shape)


def _pair_cross_entropies(student_logits, teacher_probs, student_temperature):
  """[Vt, Vs]: mean over the batch of -sum_k p_t log softmax(s_s / T_s)."""
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_probs = jnp.asarray(teacher_probs, jnp.float32)
  if (student_logits.ndim != 3 or teacher_probs.ndim != 3
      or student_logits.shape[1:] != teacher_probs.shape[1:]):
    raise ValueError(f"Expected student logits [Vs, B, K] and teacher probabilities "
                     f"[Vt, B, K] of the same B and K; got {student_logits.shape} and "
                     f"{teacher_probs.shape}.")
  log_probs = jax.nn.log_softmax(student_logits / student_temperature, axis=-1)
  return -jnp.einsum("tbk,sbk->ts", teacher_probs, log_probs) / student_logits.shape[1]


def _pair_mask(shape):
  """[Vt, Vs]: 1 where t != s."""
  return 1.0 - jnp.eye(*shape, dtype=jnp.float32)


def _num_pairs(shape):
  teacher_views, student_views = shape
  pairs = teacher_views * student_views - min(teacher_views, student_views)
  if not pairs:
    raise ValueError(f"{teacher_views} teacher and {student_views} student views leave no "
                     f"pair of different views: DINO needs at least two views.")
  return pairs


def _row_mean(x, mask=None):
  """[K]: the mean of the rows of x [..., K], over the `mask` [...] rows only if given."""
  rows = x.reshape(-1, x.shape[-1])
  if mask is None:
    return jnp.mean(rows, axis=0)
  valid = jnp.broadcast_to(mask, x.shape[:-1]).reshape(-1, 1).astype(jnp.float32)
  return jnp.sum(rows * valid, axis=0) / jnp.maximum(jnp.sum(valid), 1.0)


def _entropy(probs):
  """-sum_k p_k log p_k over the last axis, with 0 log 0 = 0."""
  return -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)


def _masked_mean(values, mask):
  if mask is None:
    return jnp.mean(values)
  valid = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
  return jnp.sum(values * valid) / jnp.maximum(jnp.sum(valid), 1.0)
