"""The attention op: reference semantics that every implementation must match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import ops


def _numpy_attention(q, k, v, bias=None, mask=None, causal=False):
  """An independent NumPy softmax attention, (b, l, h, d) layout."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= np.broadcast_to(mask, logits.shape)
  if causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool), k=logits.shape[-1] - logits.shape[-2])
  logits = np.where(allowed, logits, -np.inf)
  peak = np.max(logits, -1, keepdims=True)
  peak = np.where(np.isfinite(peak), peak, 0)
  weights = np.exp(logits - peak)
  weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (7, 7), (5, 9)])
@pytest.mark.parametrize("variant", ["plain", "bias", "mask", "causal"])
def test_xla_matches_numpy(q_len, k_len, variant):
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(keys[0], (2, q_len, 3, 16))
  k = jax.random.normal(keys[1], (2, k_len, 3, 16))
  v = jax.random.normal(keys[2], (2, k_len, 3, 16))
  kwargs = {}
  if variant == "bias":
    kwargs["bias"] = jax.random.normal(keys[3], (1, 3, q_len, k_len))
  if variant == "mask":
    kwargs["mask"] = jax.random.bernoulli(keys[4], 0.7, (2, 1, 1, k_len)).at[..., 0].set(True)
  if variant == "causal":
    kwargs["causal"] = True
  got = ops.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, **kwargs), atol=1e-5)


def test_fully_masked_rows_give_zeros_not_nans():
  q = k = v = jnp.ones((1, 4, 1, 8))
  mask = jnp.zeros((1, 1, 4, 4), bool)
  out = ops.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_array_equal(out, jnp.zeros_like(out))


def test_unknown_and_unavailable_implementations_are_errors():
  q = jnp.ones((1, 4, 1, 8))
  with pytest.raises(ValueError, match="Unknown attention implementation"):
    ops.dot_product_attention(q, q, q, implementation="flash")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      ops.dot_product_attention(q, q, q, implementation="cudnn")


def test_xla_gradients_match_numpy():
  # The values' einsum runs head-major (for XLA:CPU's sake); the gradients must not notice.
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q, k, v, cotangent = (jax.random.normal(key, (2, 6, 3, 8)) for key in keys)
  grads = jax.vjp(lambda *qkv: ops.dot_product_attention(*qkv, implementation="xla"),
                  q, k, v)[1](cotangent)
  q64, k64, v64, g64 = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
  weights = np.exp(np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(8))
  weights /= weights.sum(-1, keepdims=True)
  dweights = np.einsum("bqhd,bkhd->bhqk", g64, v64)
  dlogits = weights * (dweights - (dweights * weights).sum(-1, keepdims=True)) / np.sqrt(8)
  expected = (np.einsum("bhqk,bkhd->bqhd", dlogits, k64),
              np.einsum("bhqk,bqhd->bkhd", dlogits, q64),
              np.einsum("bhqk,bqhd->bkhd", weights, g64))
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "gpu", "metal"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_picks_xla_where_nothing_was_measured(monkeypatch, platform, dtype):
  """'auto' runs only what BENCHMARKS.md measured on the platform: nothing yet on TPUs
  and GPUs (nor on platforms vitjax has never seen), so 'xla' there."""
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  q, k, v = (jax.random.normal(key, (2, 9, 2, 64), dtype) for key in keys)
  assert ops.default_implementation(q) == "xla"

  def fail(*args, **kwargs):
    raise AssertionError("'auto' called the Pallas kernels")
  monkeypatch.setattr(ops.attention.flash_attention, "flash_attention", fail)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fail)  # The cuDNN path.
  for implementation in (None, "auto"):
    got = ops.dot_product_attention(q, k, v, causal=True, implementation=implementation)
    want = ops.dot_product_attention(q, k, v, causal=True, implementation="xla")
    np.testing.assert_array_equal(got, want)


def test_auto_choices_cite_a_measured_row():
  """Every entry of the table names an implementation and the BENCHMARKS.md table behind it."""
  for platform, choices in ops.AUTO_CHOICES.items():
    assert choices, platform
    for implementation, dtypes, max_head_dim, source in choices:
      assert implementation in ops.IMPLEMENTATIONS
      assert dtypes and max_head_dim > 0
      assert source.startswith("BENCHMARKS.md"), (platform, implementation)
  assert "tpu" not in ops.AUTO_CHOICES and "gpu" not in ops.AUTO_CHOICES  # Never measured.
  q = jnp.zeros((1, 4, 1, 64))
  assert ops.default_implementation(q, backend="cpu") == "xla"
