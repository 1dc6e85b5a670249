"""Multi-head attention module; the math lives in `vitjax.ops.dot_product_attention`."""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitjax import ops
from vitjax.models import posemb
from vitjax.models.partitioning import constrain, logical

Dtype = Any


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with big_vision/Flax parameter layout.

  `query`, `key`, `value` kernels are (width, heads, head_dim) and `out` is
  (heads, head_dim, width), so published big_vision checkpoints load as they are.
  """
  num_heads: int
  qkv_features: Optional[int] = None  # Defaults to the input width.
  out_features: Optional[int] = None  # Defaults to the input width.
  dropout: float = 0.0  # On the attention weights; only the 'xla' implementation has them.
  use_bias: bool = True
  out_use_bias: Optional[bool] = None  # The output projection's bias; None: `use_bias`.
  qk_norm: bool = False  # ViT-22B: LayerNorm over head_dim on queries and keys.
  rope: Optional[str] = None  # Rotary embeddings of q and k: 'axial', 'mixed' (2-D) or '1d'.
  rope_theta: float = 100.0
  causal: bool = False  # Each query attends to itself and earlier tokens only.
  attention_impl: Optional[str] = None
  # Token merging (vitjax.models.token_merging): `proportional` adds log(token size) of
  # each key to the logits (ToMe's proportional attention) when the token state has
  # `token_sizes`; `report` names what the call returns for the block's token reducer:
  # 'keys' (mean over heads, (B, T, head_dim)), 'class_attention' (the first token's
  # attention over the keys, mean over heads, (B, T)), 'received_attention' (the
  # attention each key receives, mean over queries and heads). With a report the call returns
  # `(output, {}, report)`.
  proportional: bool = False
  report: Sequence[str] = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, bias=None, mask=None, causal=None,
               deterministic=True, positions=None, segment_ids=None, token_state=None):
    """Attention of `inputs_q` over `inputs_kv` (default: self-attention).

    `positions`: ((tokens, 2) x/y positions, (tokens,) rotated) when `rope` is set.
    `causal` (default: the field) applies unless an additive `bias` is given: a
    bias replaces the causal mask (iLLaMA's soft mask carries its own). As a
    block's token mixer, the attention reads `positions`, `attention_bias` and
    `segment_ids` from the token state (see vitjax.models.parts).
    """
    if token_state:
      positions = token_state.get("positions", positions)
      bias = token_state.get("attention_bias", bias)
      segment_ids = token_state.get("segment_ids", segment_ids)
      if self.proportional and "token_sizes" in token_state:
        size_bias = jnp.log(token_state["token_sizes"].astype(jnp.float32))[:, None, None, :]
        bias = size_bias if bias is None else bias + size_bias
    causal = (self.causal if causal is None else causal) and bias is None
    if inputs_kv is None:
      inputs_kv = inputs_q
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"Attention width {qkv_features} is not divisible by "
                       f"num_heads={self.num_heads}.")
    head_dim = qkv_features // self.num_heads
    projection = lambda name, x: constrain(HeadProjection(
        self.num_heads, head_dim, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name,
    )(x), "act_batch", "act_length", "act_heads", "act_kv")
    q = projection("query", inputs_q)
    k = projection("key", inputs_kv)
    v = projection("value", inputs_kv)
    if self.qk_norm:
      # Keeps attention logits from growing without bound in large models (ViT-22B).
      head_norm = lambda name: nn.LayerNorm(
          epsilon=1e-6, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
          scale_init=logical(nn.initializers.ones, "kv"),
          bias_init=logical(nn.initializers.zeros, "kv"), name=name)
      q, k = head_norm("query_norm")(q), head_norm("key_norm")(k)
    if self.rope:
      q, k = self._rotate(q, k, positions, head_dim)
    if self.dropout > 0.0 and not deterministic:
      # Dropout on the attention weights needs them materialised: the unfused path.
      if segment_ids is not None:  # The fused path takes segment ids; this one a mask.
        same = ops.segment_mask(segment_ids, segment_ids)
        mask = same if mask is None else mask & same
      weights = ops.attention_weights(q, k, bias=bias, mask=mask, causal=causal)
      x = ops.attention_output(nn.Dropout(rate=self.dropout)(weights, deterministic=False), v)
    else:
      x = ops.dot_product_attention(q, k, v, bias=bias, mask=mask, causal=causal,
                                    segment_ids=segment_ids,
                                    implementation=self.attention_impl)
    out_use_bias = self.use_bias if self.out_use_bias is None else self.out_use_bias
    out = OutProjection(self.out_features or inputs_q.shape[-1], use_bias=out_use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="out")(x)
    if not self.report:
      return out
    return out, {}, self._report(q, k, bias)

  def _report(self, q, k, bias):
    """What `report` asks for, computed from the call's queries, keys and bias."""
    report = {}
    for name in self.report:
      if name == "keys":
        report["keys"] = jnp.mean(k.astype(jnp.float32), axis=2)
      elif name == "class_attention":  # One query row: cheap beside a fused kernel.
        weights = ops.attention_weights(q[:, :1], k, bias=None if bias is None
                                        else _first_query_row(bias))
        report["class_attention"] = jnp.mean(weights[:, :, 0], axis=1)
      elif name == "received_attention":
        weights = ops.attention_weights(q, k, bias=bias)
        report["received_attention"] = jnp.mean(weights, axis=(1, 2))
      else:
        raise ValueError(f"Unknown attention report {name!r}; use 'keys', 'class_attention' "
                         "or 'received_attention'.")
    return report

  def _rotate(self, q, k, positions, head_dim):
    if positions is None:
      raise ValueError("rope is set but no token positions were passed to the attention.")
    xy, rotated = positions
    if self.rope == "axial":
      frequencies = jnp.asarray(posemb.rope_axial_frequencies(head_dim, self.rope_theta))
    elif self.rope == "1d":  # LLaMA's, over the token index (iLLaMA); its own theta, 10000.
      frequencies = jnp.asarray(posemb.rope_1d_frequencies(head_dim))
    elif self.rope == "mixed":  # Learned per head and per layer.
      frequencies = self.param(
          "rope_frequencies", logical(lambda rng, *_: posemb.rope_mixed_init(
              rng, self.num_heads, head_dim), "heads", None, None),
          (self.num_heads, head_dim // 2, 2), jnp.float32)
    else:
      raise ValueError(f"Unknown rope {self.rope!r}; use 'axial', 'mixed' or '1d'.")
    angles = posemb.rope_angles(xy, frequencies)
    return posemb.apply_rope(q, angles, rotated), posemb.apply_rope(k, angles, rotated)


def _first_query_row(bias):
  """The bias of the first query: `bias` (broadcastable to (B, H, Q, K)) at query 0."""
  bias = jnp.asarray(bias)
  return bias[..., :1, :] if bias.ndim >= 2 else bias


class HeadProjection(nn.Module):
  """(..., width) -> (..., heads, head_dim); kernel (width, heads, head_dim), as nn.DenseGeneral.

  Written out rather than nn.DenseGeneral, which initialises a flattened kernel
  and so cannot carry per-axis logical names for sharding.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    kernel = self.param("kernel", logical(init, "embed", "heads", "kv"),
                        (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype)
    bias = (self.param("bias", logical(nn.initializers.zeros, "heads", "kv"),
                       (self.num_heads, self.head_dim), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return ops.dense(x, kernel, bias)


class OutProjection(nn.Module):
  """(..., heads, head_dim) -> (..., features); kernel (heads, head_dim, features)."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    kernel = self.param("kernel", logical(init, "heads", "kv", "embed"),
                        x.shape[-2:] + (self.features,), self.param_dtype)
    bias = (self.param("bias", logical(nn.initializers.zeros, "embed"), (self.features,),
                       self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return ops.dense(x, kernel, bias, contract=2)
