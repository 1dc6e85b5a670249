"""I-JEPA (Assran et al. 2023): from one context block, predict the representations of others.

"Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture". A context encoder (a ViT) sees the patches of one large block of
the image; a narrow ViT, the predictor, is given its tokens and, for each target
block, a mask token at each target position, and predicts what a target encoder
(an exponential moving average of the context encoder, seeing the whole image)
makes of those patches. The loss is the squared distance in representation space.

`IJEPA` is a `VisionTransformer` with a predictor: the encoder's parameters keep
the ViT's names at the top level, the predictor's are under 'predictor/', so
`encoder_params(params)` is a ViT's parameters and `vitjax.load_weights(vit_model,
ijepa_checkpoint)` gives a ViT the encoder for fine-tuning.

    model = vitjax.create_model('ijepa', variant='mu/4', image_size=16, patch_size=2)
    params = vitjax.init_params(model)                  # The predictor's too.
    predictions, out = model.apply({'params': params}, images, train=True,
                                   context_index=context_index,   # (B, Kc) patches
                                   target_index=target_index)     # (B, M, Kt)
    _, full = model.apply({'params': encoder_params(ema_params)}, images)
    targets = target_features(full['tokens'], target_index)      # (B, M, Kt, width)
    loss = jnp.mean((predictions - targets) ** 2)   # vitjax.train's task='ijepa'

Without indices the call is the encoder on the whole image, like a ViT's:
`(pre_logits, out)` with `out['tokens']` and `out['pre_logits']` (their mean), what
the linear-probe and k-NN evaluators read. Patch indices are row-major positions
on the patch grid, as `VisionTransformer(..., keep=...)` takes them.

Position embeddings are fixed 2-D sin-cos ones (posemb='sincos2d', vitjax's layout,
see `vitjax.models.posemb.sincos_2d`), in the encoder and, at its own width, in
the predictor. The published encoders (Hugging Face `IJepaModel`, e.g.
facebook/ijepa_vith14_1k) store I-JEPA's sin-cos embeddings as a parameter: they
load into a model built with posemb='learn' (the ViT names vit_huge_patch14_gap_224,
vit_huge_patch16_gap_448 and vit_giant_patch16_gap_224 are those encoders).
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import parts
from vitjax.models import posemb as posemb_lib
from vitjax.models import token_merging as token_merging_lib
from vitjax.models import vit
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.layers import MlpBlock
from vitjax.models.partitioning import logical

PREDICTOR = "predictor"  # The top-level name of the predictor's parameters.
PAPER = ("Self-Supervised Learning from Images with a Joint-Embedding Predictive "
         "Architecture (Assran et al., 2023)")


def target_features(tokens, target_index, epsilon=1e-5):
  """I-JEPA's targets: (B, N, width) encoded patch tokens -> (B, M, Kt, width), float32.

  Each token layer-normed over its features without a learned scale or bias (as
  I-JEPA normalises the target encoder's output, torch's F.layer_norm with its
  default epsilon), then the tokens of each target block gathered: `target_index`
  (B, M, Kt) holds M blocks of Kt row-major patch indices per example.
  """
  tokens = tokens.astype(jnp.float32)
  mean = jnp.mean(tokens, axis=-1, keepdims=True)
  variance = jnp.var(tokens, axis=-1, keepdims=True)
  normed = (tokens - mean) * jax.lax.rsqrt(variance + epsilon)
  batch, num_blocks, block_size = target_index.shape
  flat = target_index.reshape(batch, num_blocks * block_size, 1).astype(jnp.int32)
  gathered = jnp.take_along_axis(normed, flat, axis=1)
  return gathered.reshape(batch, num_blocks, block_size, tokens.shape[-1])


def encoder_params(params):
  """An IJEPA's parameters without the predictor: the context encoder, a ViT's parameters.

  The target encoder is these (their moving average), and a `VisionTransformer`
  with the encoder's options (pool_type='gap', num_classes=0, posemb='sincos2d')
  takes them as they are. Accepts {'params': ...} too.
  """
  params = params.get("params", params) if set(params) == {"params"} else params
  return {name: value for name, value in params.items() if name != PREDICTOR}


class Predictor(nn.Module):
  """I-JEPA's predictor: the context tokens and the targets' positions -> the targets' tokens.

  `__call__(context, context_index, target_index, grid, deterministic=True)`:
  `context` (B, Kc, width) are the encoded context tokens at the patches
  `context_index` (B, Kc); for each of the M target blocks of `target_index` (B, M,
  Kt), the sequence [context tokens projected to `predictor_width` + their position
  embeddings] ++ [`mask_token` + the position embedding of each target patch] runs
  through the blocks (all B * M sequences at once), and the target positions' outputs,
  normed and projected back to `width`, are the predictions: (B, M, Kt, width),
  float32. Position embeddings: fixed 2-D sin-cos of `predictor_width` on the patch
  `grid` (grid_h, grid_w), not parameters.
  Parameters: `embed` (width -> predictor_width), `mask_token`, `Transformer`
  (`encoderblock_{i}`, `encoder_norm`), `projection` (predictor_width -> width).
  """
  width: int  # The encoder's: the context tokens' and the predictions' width.
  predictor_width: int
  depth: int
  block: parts.Factory  # The block, built for predictor_width (see IJEPA.predictor_block).
  norm: parts.Factory  # The final norm.
  remat_policy: str = "none"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, context, context_index, target_index, grid, deterministic=True):
    batch, num_context = context_index.shape
    _, num_blocks, block_size = target_index.shape
    # The fixed position embeddings of every patch, (N, predictor_width); gathered below.
    posemb = posemb_lib.sincos_2d(*grid, self.predictor_width, dtype=self.dtype)[0]
    x = nn.Dense(self.predictor_width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
                 bias_init=logical(nn.initializers.zeros, "mlp"), name="embed")(context)
    x = x + jnp.take(posemb, context_index.astype(jnp.int32), axis=0)
    # One sequence per (example, target block): example b's context, then block m's
    # mask tokens, at b * M + m.
    x = jnp.repeat(x, num_blocks, axis=0)
    targets = target_index.reshape(batch * num_blocks, block_size).astype(jnp.int32)
    mask_token = self.param("mask_token", logical(nn.initializers.normal(stddev=0.02),
                                                  None, None, "embed"),
                            (1, 1, self.predictor_width), self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([x, mask_token + jnp.take(posemb, targets, axis=0)], axis=1)
    x, _, _ = parts.Encoder(block=self.block, depth=self.depth, norm=self.norm,
                            remat_policy=self.remat_policy, name="Transformer")(
                                x, deterministic=deterministic)
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
                 bias_init=logical(nn.initializers.zeros, "embed"), name="projection")(
                     x[:, num_context:])
    return x.reshape(batch, num_blocks, block_size, self.width).astype(jnp.float32)


class IJEPA(vit.VisionTransformer):
  """I-JEPA: a ViT context encoder (the parent class's parameters) and a narrow predictor.

  `__call__(images, train=False, context_index=None, target_index=None)`:
    - without indices: the encoder on the whole image, `(pre_logits, out)` as a ViT
      with these options returns (`out['tokens']` the normed patch tokens,
      `out['pre_logits']` their mean). Initialising (`model.init(rng, images)`) also
      creates the predictor's parameters.
    - with `context_index` (B, Kc) and `target_index` (B, M, Kt), row-major patch
      indices: the encoder sees the context patches alone (the ViT's `keep=`), the
      predictor predicts each target block; returns `(predictions, out)`,
      predictions (B, M, Kt, width) float32, `out['context']` the encoded context
      tokens (B, Kc, width), `out['predictions']`, and the encoder's entries (of the
      context: `tokens`, `pre_logits`, `encoder`).
  The targets are the task's: `target_features` of the target encoder's tokens.

  The predictor's blocks are the encoder's kind (its `norm`, `layer_norm_eps`,
  `use_bias`, `qk_norm`, GELU MLP, `dropout`, `attention_dropout`, `remat_policy`),
  `predictor_width` wide; no stochastic depth, never scanned (its parameters keep
  one layout whatever `scan_layers` is, so checkpoints load either way).
  """
  num_classes: int = 0
  pool_type: str = "gap"
  posemb: str = "sincos2d"
  # Hugging Face's IJepaModel resizes its stored position embeddings with torch's
  # bicubic, not antialiased: a model built with posemb='learn' does the same.
  posemb_resize: str = "bicubic_no_antialias"
  # The paper's predictor is 384 wide with as many heads as the encoder, and 12 deep
  # (16 for ViT-g/16). None: min(384, width // 2), the encoder's num_heads, min(12, depth),
  # 4 x predictor_width.
  predictor_width: Optional[int] = None
  predictor_depth: Optional[int] = None
  predictor_num_heads: Optional[int] = None
  predictor_mlp_dim: Optional[int] = None

  @property
  def predictor_options(self):
    """(width, depth, num_heads, mlp_dim) of the predictor, the defaults filled in."""
    width = self.predictor_width or min(384, self.width // 2)
    return (width, self.predictor_depth or min(12, self.depth),
            self.predictor_num_heads or self.num_heads, self.predictor_mlp_dim or 4 * width)

  def predictor_block(self):
    """The predictor's block factory: attention and a GELU MLP of the predictor's sizes."""
    width, _, num_heads, mlp_dim = self.predictor_options
    if width % num_heads or width % 4:
      raise ValueError(f"predictor_width={width} must divide into predictor_num_heads="
                       f"{num_heads} heads, and by 4 (its 2-D sin-cos position embeddings).")
    attention = functools.partial(
        MultiHeadDotProductAttention, num_heads=num_heads, dropout=self.attention_dropout,
        use_bias=self.use_bias, qk_norm=self.qk_norm, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, name="MultiHeadDotProductAttention_0")
    mlp = functools.partial(
        MlpBlock, mlp_dim=mlp_dim, dropout=self.dropout, gelu_approximate=self.gelu_approximate,
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        name="MlpBlock_0")
    return functools.partial(parts.Block, token_mixer=attention, channel_mixer=mlp,
                             norm=self.norm_factory(), dropout=self.dropout,
                             param_dtype=self.param_dtype)

  @nn.compact
  def __call__(self, images, train=False, context_index=None, target_index=None):
    if (context_index is None) != (target_index is None):
      raise ValueError("Give both context_index (B, Kc) and target_index (B, M, Kt), or "
                       "neither (the encoder on the whole image).")
    if context_index is None:
      features, out = super().__call__(images, train=train)
      if self.is_initializing():  # Create the predictor's parameters too.
        num_patches = out["tokens"].shape[1]
        index = jnp.broadcast_to(jnp.arange(num_patches), out["tokens"].shape[:2])
        self._predictor()(out["tokens"], index, index[:, None, :1], self._grid(images))
      return features, out
    if context_index.ndim != 2 or target_index.ndim != 3:
      raise ValueError(f"context_index must be (batch, Kc) and target_index (batch, blocks, "
                       f"Kt); got shapes {context_index.shape} and {target_index.shape}.")
    if context_index.shape[0] != target_index.shape[0]:
      raise ValueError(f"context_index {context_index.shape} and target_index "
                       f"{target_index.shape} have different batch sizes.")
    if token_merging_lib.parse(self.token_merging, self.depth):
      raise ValueError("I-JEPA's context encoder runs without token merging; set "
                       "token_merging=None.")
    _, out = super().__call__(images, train=train, keep=context_index)
    out["context"] = out["tokens"]
    predictions = self._predictor()(out["tokens"], context_index, target_index,
                                    self._grid(images), deterministic=not train)
    out["predictions"] = predictions
    return predictions, out

  def _grid(self, images):
    """(rows, columns) of patches the encoder cuts `images` into."""
    patch = self.patch_size
    return (-(-images.shape[1] // patch), -(-images.shape[2] // patch))

  def _predictor(self):
    width, depth, _, _ = self.predictor_options
    return Predictor(width=self.width, predictor_width=width, depth=depth,
                     block=self.predictor_block(), norm=self.norm_factory(),
                     remat_policy=self.remat_policy, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=PREDICTOR)


def register_models(register, **kwargs):
  """The paper's models: ViT-H/14 and ViT-H/16 (448 px) on ImageNet, ViT-g/16, predictor 384 wide.

  Predictor depths as in the paper's configs (facebookresearch/ijepa): 12, and 16 for ViT-g.
  """
  for size_name, size, patch, resolution, predictor_depth in (
      ("huge", "H", 14, 224, 12), ("huge", "H", 16, 448, 12), ("giant", "g", 16, 224, 16)):
    register(f"ijepa_vit_{size_name}_patch{patch}_{resolution}", IJEPA, paper=PAPER, **kwargs,
             image_size=resolution, predictor_width=384, predictor_depth=predictor_depth,
             **vit.decode_variant(f"{size}/{patch}"))
