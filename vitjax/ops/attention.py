"""`dot_product_attention`: the one attention op every vitjax model calls.

Layout is (batch, length, heads, head_dim), as in `jax.nn.dot_product_attention`.
"""

import math

import jax
import jax.numpy as jnp

from vitjax.ops import flash_attention

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


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


def post_softmax(weights):
  """The attention weights as `attention_output` multiplies them: here, unchanged.

  A hook for post-training quantization: while a quantized model runs, vitjax.quantize
  replaces it with a quantizer made for softmax outputs (log2 levels in [0, 1]).
  """
  return weights


def attention_output(weights, v):
  """Weights (batch, heads, q_len, k_len) applied to values (batch, k_len, heads, head_dim)."""
  # Values head-major, as the weights are: the same products, but XLA:CPU ran the backward
  # of "bhqk,bkhd->bqhd" slower (ViT-S/16 attention; the figure is in BENCHMARKS.md).
  out = jnp.einsum("bhqk,bhkd->bhqd", post_softmax(weights.astype(v.dtype)),
                   jnp.swapaxes(v, 1, 2))
  return jnp.swapaxes(out, 1, 2)


def _reference_attention(q, k, v, *, bias, mask, causal, scale):
  """Plain attention through materialised weights: the ground truth of the tests."""
  return attention_output(
      attention_weights(q, k, bias=bias, mask=mask, causal=causal, scale=scale), v)


def segment_mask(q_segment_ids, kv_segment_ids):
  """(batch, 1, q_len, k_len) boolean: a query sees the keys of its own segment."""
  return (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])


# What `implementation=None` / 'auto' may pick on each platform: only implementations
# that a table of BENCHMARKS.md ("Attention op") measured there, each with the
# conditions it was measured under: (implementation, dtypes of q, largest head_dim,
# the table). The first entry whose conditions hold wins; anything else, and any
# platform without an entry (TPU, GPU: never measured yet), gets 'xla'. A new entry
# needs a new row in BENCHMARKS.md, measured with `python -m vitjax.tools.bench_attention`.
AUTO_CHOICES = {
    "cpu": (("xla", ("float32",), 64,
             "BENCHMARKS.md, Attention op, CPU smoke test (2-core VM, 2026-11-21): 'xla' "
             "ahead of 'pallas' (interpreted) at 2x197x12x64 and 1x577x12x64"),),
}


def default_implementation(q, backend=None):
  """What `implementation=None` / 'auto' picks for these inputs on this platform.

  An entry of `AUTO_CHOICES` whose platform, dtype and head_dim match, else 'xla'.
  Today that is 'xla' everywhere: no GPU or TPU figure has been measured, so the
  Pallas kernels and cuDNN are opt-in, `implementation='pallas'` or `'cudnn'`
  (`attention_impl=` on the models).
  """
  backend = backend or jax.default_backend()
  for implementation, dtypes, max_head_dim, _ in AUTO_CHOICES.get(backend, ()):
    if jnp.dtype(q.dtype).name in dtypes and q.shape[-1] <= max_head_dim:
      return implementation
  return "xla"


def dot_product_attention(q, k, v, *, bias=None, mask=None, segment_ids=None, causal=False,
                          scale=None, implementation=None):
  """Multi-head scaled dot-product attention.

  Args:
    q: queries, (batch, q_len, heads, head_dim).
    k: keys, (batch, k_len, heads, head_dim).
    v: values, (batch, k_len, heads, head_dim).
    bias: additive, broadcastable to (batch, heads, q_len, k_len).
    mask: boolean, broadcastable to (batch, heads, q_len, k_len); True where
      attention is allowed.
    segment_ids: (batch, length) ints, or a (q_segment_ids, kv_segment_ids)
      pair; a query attends only to keys of the same segment (packed sequences).
    causal: query i attends to keys j <= i + (k_len - q_len) only.
    scale: multiplies q k^T; defaults to 1/sqrt(head_dim).
    implementation: 'xla' (reference), 'cudnn' (NVIDIA GPUs), 'pallas'
      (vitjax's flash-attention kernels; interpreted on the CPU), or None/'auto':
      only what BENCHMARKS.md measured on this platform, else 'xla' (today 'xla'
      everywhere; see `default_implementation`). A named implementation the
      platform cannot run is an error, never a silent fallback.

  Returns:
    (batch, q_len, heads, head_dim), in the dtype of `v`.
  """
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if implementation in (None, "auto"):
    implementation = default_implementation(q)
  if implementation == "pallas":
    return flash_attention.flash_attention(q, k, v, bias=bias, mask=mask,
                                           segment_ids=segment_ids, causal=causal, scale=scale)
  if segment_ids is not None:
    q_ids, kv_ids = (segment_ids if isinstance(segment_ids, (tuple, list))
                     else (segment_ids, segment_ids))
    same = segment_mask(q_ids, kv_ids)
    mask = same if mask is None else jnp.logical_and(mask, same)
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
