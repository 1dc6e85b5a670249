"""`dot_product_attention`: the one attention op every vitjax model calls.

Layout is (batch, length, heads, head_dim), as in `jax.nn.dot_product_attention`.
"""

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def attention_weights(q, k, *, bias=None, mask=None, causal=False, scale=None):
  """softmax(q k^T * scale + bias) in fp32, (batch, heads, q_len, k_len).

  Masked entries get weight 0; a query row with no allowed key attends to nothing
  (all-zero weights) rather than uniformly to everything.
  """
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if causal:
    q_len, k_len = logits.shape[-2:]
    # Queries are aligned to the end of the keys, so q_len < k_len decodes the last positions.
    allowed = jnp.tril(jnp.ones((q_len, k_len), bool), k=k_len - q_len)
    mask = allowed if mask is None else jnp.logical_and(mask, allowed)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
  return weights


def _reference_attention(q, k, v, *, bias, mask, causal, scale):
  """Plain attention through materialised weights: the ground truth of the tests."""
  weights = attention_weights(q, k, bias=bias, mask=mask, causal=causal, scale=scale)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def dot_product_attention(q, k, v, *, bias=None, mask=None, causal=False,
                          scale=None, implementation=None):
  """Multi-head scaled dot-product attention.

  Args:
    q: queries, (batch, q_len, heads, head_dim).
    k: keys, (batch, k_len, heads, head_dim).
    v: values, (batch, k_len, heads, head_dim).
    bias: additive, broadcastable to (batch, heads, q_len, k_len).
    mask: boolean, broadcastable to (batch, heads, q_len, k_len); True where
      attention is allowed.
    causal: query i attends to keys up to i only.
    scale: multiplies q k^T; defaults to 1/sqrt(head_dim).
    implementation: 'xla' (reference), 'cudnn' (NVIDIA GPUs), or None/'auto'
      (the fastest available one).

  Returns:
    (batch, q_len, heads, head_dim), in the dtype of `v`.
  """
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if implementation in (None, "auto"):
    implementation = "xla"
  if implementation == "xla":
    return _reference_attention(q, k, v, bias=bias, mask=mask, causal=causal, scale=scale)
  if implementation == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(
          f"attention implementation 'cudnn' needs an NVIDIA GPU; this process runs on "
          f"'{jax.default_backend()}'. Use implementation='xla' or None (auto).")
    if mask is not None:
      mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=causal, scale=scale,
        implementation="cudnn")
  raise ValueError(
      f"Unknown attention implementation {implementation!r}; choose one of "
      f"{', '.join(repr(i) for i in IMPLEMENTATIONS)} or None for automatic.")
