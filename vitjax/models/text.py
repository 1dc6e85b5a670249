"""Text tower: a transformer encoder over token ids, for two-tower (CLIP / SigLIP / LiT) models.

The blocks are the ViT's parts (`vitjax.models.parts.Block` of attention and an
MLP), so attention goes through `vitjax.ops.dot_product_attention`. Parameter names
follow big_vision's text transformer: `Embed_0/embedding`, `pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `head`.

Pooling (`pool_type`):
  'last'   the last position (SigLIP; big_vision's default), texts padded to full length;
  'eos'    the end-of-text token (OpenAI CLIP): the first position holding
           `eos_token_id`, or, with `eos_token_id=None`, the largest id in the row
           (CLIP's tokenizer gives end-of-text the largest id);
  'first'  the first position; 'gap' the mean over positions; 'map' attention pooling.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import parts
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.layers import MAPHead, MlpBlock, layer_norm
from vitjax.models.partitioning import logical

Dtype = Any
POOL_TYPES = ("last", "eos", "first", "gap", "map")


class TextTransformer(nn.Module):
  """`__call__(tokens, train=False)` on int tokens [B, L] returns `(logits, out)`.

  `out` holds `embedded` (token + position embeddings), `encoded` (the final,
  normed tokens), `encoder` (per-block outputs), `pre_logits` (the pooled
  token) and `logits` (its projection by `head`, or the pre-logits when
  `num_classes` is 0).
  """
  num_classes: int = 0  # Projection size of `head`; 0: no head.
  vocab_size: int = 259  # vitjax.text.ByteTokenizer's.
  max_length: int = 16  # Positions the position embedding has; inputs may be shorter.
  width: int = 512
  depth: int = 12
  mlp_dim: int = 2048
  num_heads: int = 8
  pool_type: str = "last"
  eos_token_id: Optional[int] = None  # For pool_type='eos'; None: the row's largest id.
  causal: bool = False  # CLIP's text encoder attends only to earlier tokens.
  activation: str = "gelu"  # Or 'quick_gelu' (OpenAI CLIP).
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  dropout: float = 0.0
  attention_impl: Optional[str] = None
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, train=False):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown text pool_type {self.pool_type!r}; use one of: "
                       f"{', '.join(POOL_TYPES)}.")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"The text tower takes integer token ids [batch, length]; got "
                       f"{tokens.dtype} {tokens.shape}. Tokenize first (vitjax.text).")
    length = tokens.shape[1]
    if length > self.max_length:
      raise ValueError(f"Texts of {length} tokens, but the text tower has max_length="
                       f"{self.max_length} positions; tokenize with max_length="
                       f"{self.max_length}.")
    out = {}
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="Embed_0",
                     embedding_init=logical(nn.initializers.normal(stddev=0.02),
                                            None, "embed"))
    posemb = self.param("pos_embedding",
                        logical(nn.initializers.normal(stddev=0.01), None, None, "embed"),
                        (1, self.max_length, self.width), self.param_dtype)
    x = out["embedded"] = embed(tokens) + posemb[:, :length].astype(self.dtype)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    norm = functools.partial(layer_norm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    block = functools.partial(
        parts.Block, norm=norm, dropout=self.dropout, param_dtype=self.param_dtype,
        token_mixer=functools.partial(
            MultiHeadDotProductAttention, num_heads=self.num_heads, causal=self.causal,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
            name="MultiHeadDotProductAttention_0"),
        channel_mixer=functools.partial(
            MlpBlock, mlp_dim=self.mlp_dim, dropout=self.dropout,
            gelu_approximate=self.gelu_approximate, activation=self.activation,
            dtype=self.dtype, param_dtype=self.param_dtype, name="MlpBlock_0"))
    x, _, out["encoder"] = parts.Encoder(
        block=block, depth=self.depth, norm=norm, remat_policy=self.remat_policy,
        name="Transformer")(x, deterministic=not train)
    out["encoded"] = x

    if self.pool_type == "last":
      x = x[:, -1]
    elif self.pool_type == "first":
      x = x[:, 0]
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type == "eos":
      if self.eos_token_id is None:
        position = jnp.argmax(tokens, axis=-1)
      else:  # argmax of a boolean: the first match (rows without one pool position 0).
        position = jnp.argmax(tokens == self.eos_token_id, axis=-1)
      x = jnp.take_along_axis(x, position[:, None, None], axis=1)[:, 0]
    else:
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  gelu_approximate=self.gelu_approximate, activation=self.activation,
                  layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="MAPHead_0")(x)
    out["pre_logits"] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=logical(nn.initializers.lecun_normal(), "embed", "classes"),
                   bias_init=logical(nn.initializers.zeros, "classes"), name="head")(x)
    out["logits"] = x
    return x, out
