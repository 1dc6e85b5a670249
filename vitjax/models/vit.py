"""Vision Transformer (ViT) and DeiT, one module.

Parameter names follow big_vision, so its published .npz checkpoints load as
they are. Position embeddings cover the prefix tokens too (timm / DeiT / AugReg
layout), which makes the parameter counts equal the published ones.

Memory switches: `remat_policy` recomputes each block's activations in the
backward pass instead of storing them, and `scan_layers=True` runs the blocks
with `nn.scan` (one compiled block, parameters stacked along a leading `layers`
axis: big_vision's `scan=True` layout; vitjax.convert.scan_params/unscan_params
convert between the two layouts, and load_weights reads either into either).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import posemb as posemb_lib
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.layers import (DropPath, LayerScale, MAPHead, MlpBlock, SwiGLU, norm_layer,
                                  patch_stem_input)
from vitjax.models.partitioning import constrain, logical

Dtype = Any

# Size table: name -> (width, depth, mlp_dim, num_heads).
SIZES = {
    "mu": (64, 4, 256, 4),  # A toy size for CPU runs (the quickstart); not from a paper.
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def decode_variant(variant):
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  size, slash, patch = variant.partition("/")
  if size not in SIZES or (slash and not patch.isdigit()):
    raise ValueError(f"Unknown ViT variant {variant!r}: expected SIZE/PATCH with SIZE in "
                     f"{', '.join(SIZES)} and an integer PATCH, e.g. 'B/16'.")
  width, depth, mlp_dim, num_heads = SIZES[size]
  config = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    config["patch_size"] = int(patch)
  return config


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

  Options: `layer_scale_init` scales each residual branch by a learned
  per-channel vector (CaiT, DINOv2); `parallel` computes attention and MLP from
  one norm of the same input and adds both (ViT-22B); `qk_norm` normalises
  queries and keys; `use_bias=False` drops the biases of dense layers and norms.
  LLaMA-style (iLLaMA): `norm='rmsnorm'`, `mlp='swiglu'` (biases per
  `mlp_use_bias`), `causal=True`; an `attention_bias` passed in (the soft mask)
  replaces the causal mask.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  layer_scale_init: Optional[float] = None
  parallel: bool = False
  qk_norm: bool = False
  use_bias: bool = True
  norm: str = "layernorm"  # Or 'rmsnorm'. Either keeps the names LayerNorm_0 / LayerNorm_1.
  mlp: str = "gelu"  # Or 'swiglu'.
  mlp_use_bias: Optional[bool] = None  # None: as use_bias.
  causal: bool = False
  activation: str = "gelu"  # The GELU MLP's nonlinearity: 'gelu' or 'quick_gelu' (CLIP).
  rope: Optional[str] = None
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True, drop_path=None, positions=None,
               attention_bias=None):
    # `drop_path` overrides the field: under nn.scan each layer's rate comes in as an array.
    drop_path = self.drop_path if drop_path is None else drop_path
    norm = lambda name: norm_layer(self.norm, name, self.layer_norm_eps, self.dtype,
                                   self.param_dtype, use_bias=self.use_bias)
    mlp_use_bias = self.use_bias if self.mlp_use_bias is None else self.mlp_use_bias

    def residual(branch, index):
      branch = nn.Dropout(rate=self.dropout)(branch, deterministic)
      if self.layer_scale_init is not None:
        branch = LayerScale(self.layer_scale_init, self.param_dtype,
                            name=f"LayerScale_{index}")(branch)
      return DropPath(drop_path)(branch, deterministic)

    attention = lambda y: MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout=self.attention_dropout, use_bias=self.use_bias,
        qk_norm=self.qk_norm, rope=self.rope, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, name="MultiHeadDotProductAttention_0",
    )(y, deterministic=deterministic, positions=positions, bias=attention_bias,
      causal=self.causal and attention_bias is None)

    def mlp(y):
      if self.mlp == "swiglu":
        return SwiGLU(mlp_dim=self.mlp_dim, dropout=self.dropout, use_bias=mlp_use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name="MlpBlock_0")(y, deterministic)
      return MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                      gelu_approximate=self.gelu_approximate, use_bias=mlp_use_bias,
                      activation=self.activation, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="MlpBlock_0")(y, deterministic)

    if self.parallel:
      y = norm("LayerNorm_0")(x)
      x = x + residual(attention(y), 0) + residual(mlp(y), 1)
    else:
      x = x + residual(attention(norm("LayerNorm_0")(x)), 0)
      x = x + residual(mlp(norm("LayerNorm_1")(x)), 1)
    return constrain(x, "act_batch", "act_length", "act_embed")


# remat_policy -> what the backward pass keeps of a block's forward pass (the rest is
# recomputed): a jax.checkpoint_policies policy, or None for nothing but the block's input.
# 'none' (not in the table) does not rematerialise.
REMAT_POLICIES = {
    "full": None,
    **{name: getattr(jax.checkpoint_policies, name) for name in (
        "nothing_saveable", "everything_saveable", "dots_saveable",
        "dots_with_no_batch_dims_saveable", "checkpoint_dots",
        "checkpoint_dots_with_no_batch_dims")},
}


def block_module(remat_policy="none", prevent_cse=True):
  """Encoder1DBlock, wrapped in nn.remat with the named policy unless it is 'none'."""
  if remat_policy == "none":
    return Encoder1DBlock
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {remat_policy!r}; use one of: "
                     f"{', '.join(['none', *REMAT_POLICIES])}.")
  # static_argnums: `deterministic` (0 is self, 1 is x) picks Python branches inside.
  return nn.remat(Encoder1DBlock, policy=REMAT_POLICIES[remat_policy],
                  prevent_cse=prevent_cse, static_argnums=(2,))


class Encoder(nn.Module):
  """A stack of `depth` blocks and the final LayerNorm; stochastic depth rises linearly.

  Returns `(x, out)`: `out['pre_norm']` is the last block's output and, without
  scan, `out['blockNN']` each block's. With `scan_layers` the per-block outputs
  are not kept (stacking them would cost the memory scan is there to save).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  layer_scale_init: Optional[float] = None
  parallel_block: bool = False
  qk_norm: bool = False
  use_bias: bool = True
  norm: str = "layernorm"
  mlp: str = "gelu"
  mlp_use_bias: Optional[bool] = None
  causal: bool = False
  activation: str = "gelu"
  rope: Optional[str] = None
  attention_impl: Optional[str] = None
  scan_layers: bool = False  # One block under nn.scan: params 'encoderblock/...' (depth, ...).
  remat_policy: str = "none"  # 'none', or a name in REMAT_POLICIES.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True, positions=None, attention_bias=None):
    # prevent_cse keeps XLA from merging the recomputation back into the forward pass;
    # scan's loop already does that, and the guard would cost speed there.
    block = block_module(self.remat_policy, prevent_cse=not self.scan_layers)
    config = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        attention_dropout=self.attention_dropout, gelu_approximate=self.gelu_approximate,
        layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl,
        layer_scale_init=self.layer_scale_init, parallel=self.parallel_block,
        qk_norm=self.qk_norm, use_bias=self.use_bias, rope=self.rope, norm=self.norm,
        mlp=self.mlp, mlp_use_bias=self.mlp_use_bias, causal=self.causal,
        activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype)
    drop_path = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
    out = {}
    if self.scan_layers:
      # Each layer's stochastic-depth rate is scanned in alongside its parameters.
      rates = (jnp.asarray(drop_path, jnp.float32)
               if self.drop_path_rate and not deterministic else None)
      scanned = nn.scan(
          lambda module, x, rate, positions, bias: (
              module(x, deterministic, rate, positions, bias), None),
          variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(block(name="encoderblock", **config), x, rates, positions, attention_bias)
    else:
      for i, rate in enumerate(drop_path):
        x = block(drop_path=rate, name=f"encoderblock_{i}", **config)(
            x, deterministic, None, positions, attention_bias)
        out[f"block{i:02d}"] = x
    out["pre_norm"] = x
    x = norm_layer(self.norm, "encoder_norm", self.layer_norm_eps, self.dtype, self.param_dtype,
                   use_bias=self.use_bias)(x)
    return x, out


def soft_mask_weight(step, steps, schedule="linear"):
  """Weight of the bidirectional mask in iLLaMA's soft mask at training `step`: 1 -> 0.

  "Adapting LLaMA Decoder to Vision Transformer" (Wang et al. 2024), soft mask:
  M_s = a * M_bidirectional + (1 - a) * M_causal, with `a` going from 1 to 0 over
  the first `steps` ("cutoff epochs") of training, causal after. The authors'
  code (mask_scheduler.py) has two schedules: 'linear' (a falls linearly) and
  'constant' (a = 1, then 0 at the cutoff; their training scripts use it).
  """
  step = jnp.asarray(step, jnp.float32)
  if schedule == "linear":
    return jnp.clip(1.0 - step / steps, 0.0, 1.0)
  if schedule == "constant":
    return jnp.where(step < steps, 1.0, 0.0)
  raise ValueError(f"Unknown soft_mask_schedule {schedule!r}; use 'linear' or 'constant'.")


def soft_mask_bias(length, weight):
  """(1, 1, length, length) additive attention bias of iLLaMA's soft mask.

  The paper multiplies the attention weights by M_s (1 on and below the
  diagonal, `weight` above); here log(M_s) is added to the logits instead, so
  that the mask runs through `vitjax.ops.dot_product_attention` (fused kernels
  take an additive bias). That is the same mask with each row renormalised: at
  weight 1 it is bidirectional attention and at 0 exactly causal attention
  (softmax(A + M_causal), the paper's and LLaMA's definition), where the
  multiplicative form would leave the causal rows summing to less than 1.
  """
  causal = jnp.tril(jnp.ones((length, length), bool))
  # A finite floor for log(0): -inf logits make NaN gradients in some kernels.
  log_weight = jnp.maximum(jnp.log(weight), -1e9)
  return jnp.where(causal, 0.0, log_weight)[None, None]


class VisionTransformer(nn.Module):
  """ViT (Dosovitskiy et al. 2021) with DeiT's distillation token as an option.

  `__call__(images, train=False, step=None)` takes NHWC images (checked by
  layers.patch_stem_input) and returns `(logits, out)`; `step` (the training step)
  matters only to iLLaMA's soft mask.
  `out` holds `stem` (patch embeddings), `encoded` (all final tokens, normed),
  `tokens` (the final patch tokens), `pre_logits`, `logits`, and for distilled
  models `logits_cls` and `logits_dist` (logits is their average). `encoder`
  holds `pre_norm` and, unless `scan_layers`, each block's output `blockNN`.
  """
  num_classes: int = 1000  # 0: no head, logits are the pre-logits.
  image_size: int = 224  # Resolution the position embeddings are made for.
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool_type: str = "token"  # 'token' (class token), 'gap', 'map' or 'none'.
  posemb: str = "learn"  # 'learn' or 'sincos2d'.
  # How learned position embeddings are resized for another input size: 'bilinear'
  # (big_vision), 'bicubic' (antialiased: timm, DINOv2 with registers) or
  # 'bicubic_no_antialias' (torch's default bicubic: original DINOv2, naver's rope-vit).
  posemb_resize: str = "bilinear"
  distilled: bool = False  # DeiT: a distillation token with its own head.
  representation_size: Optional[int] = None  # Optional pre-logits Dense + tanh.
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  in_channels: int = 3
  # Images that are not a whole number of patches: an error (False), or zero-padded at the
  # bottom and right to the next multiple of the patch (True), as timm's dynamic_img_pad.
  dynamic_img_pad: bool = False
  attention_impl: Optional[str] = None  # See vitjax.ops.dot_product_attention.
  # Memory: recompute block activations in the backward pass ('none', 'full' or a
  # jax.checkpoint_policies name, see REMAT_POLICIES), and/or run the blocks under
  # nn.scan, their params stacked as big_vision's scan=True 'Transformer/encoderblock'.
  remat_policy: str = "none"
  scan_layers: bool = False
  # "Vision Transformers Need Registers": extra learned tokens, without position
  # embedding, that the model may use as scratch space; dropped before pooling.
  num_registers: int = 0
  # Block options (see Encoder1DBlock): LayerScale (CaiT, DINOv2), and ViT-22B's
  # parallel attention + MLP, QK-LayerNorm and bias-free dense layers and norms.
  layer_scale_init: Optional[float] = None
  parallel_block: bool = False
  qk_norm: bool = False
  use_bias: bool = True
  # 2-D rotary embeddings of queries and keys in every block ("Rotary Position
  # Embedding for Vision Transformer"): 'axial' (fixed frequencies) or 'mixed'
  # (learned per head and layer). Combine with posemb='none' for RoPE alone.
  rope: Optional[str] = None
  # iLLaMA ("Adapting LLaMA Decoder to Vision Transformer", Wang et al. 2024): LLaMA's
  # RMSNorm and SwiGLU MLP (mlp_dim is the SwiGLU's hidden width; mlp_use_bias=None
  # follows use_bias), causal self-attention with the class token placed after the
  # image tokens (class_token_position='last', so it attends to all of them), 1-D
  # RoPE over the token index (rope='1d'), and the soft mask: while training, the
  # attention moves from bidirectional to causal over the first `soft_mask_steps`
  # steps (see soft_mask_weight). Evaluation is always causal.
  norm: str = "layernorm"  # Or 'rmsnorm'.
  mlp: str = "gelu"  # Or 'swiglu'.
  mlp_use_bias: Optional[bool] = None
  causal: bool = False
  class_token_position: str = "first"  # Or 'last'.
  soft_mask_steps: int = 0  # 0: no soft mask, causal from the start.
  soft_mask_schedule: str = "linear"  # Or 'constant'; see soft_mask_weight.
  # OpenAI CLIP's image tower: the MLP nonlinearity ('gelu' or 'quick_gelu') and a
  # LayerNorm over the embedded tokens before the first block (CLIP's ln_pre).
  activation: str = "gelu"
  embedding_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_prefix_tokens(self):
    return int(self.pool_type == "token") + int(self.distilled)

  @property
  def uses_training_step(self):
    """Whether the trainer should pass the training step (the soft-mask schedule needs it)."""
    return bool(self.causal and self.soft_mask_steps)

  def _check(self):
    if self.pool_type not in ("token", "gap", "map", "none"):
      raise ValueError(f"Unknown pool_type {self.pool_type!r}; use 'token', 'gap', 'map' or 'none'.")
    if self.distilled and self.pool_type != "token":
      raise ValueError("A distilled (DeiT) model needs pool_type='token'.")
    if self.posemb not in ("learn", "sincos2d", "none"):
      raise ValueError(f"Unknown posemb {self.posemb!r}; use 'learn', 'sincos2d' or 'none'.")
    if self.rope not in (None, "axial", "mixed", "1d"):
      raise ValueError(f"Unknown rope {self.rope!r}; use 'axial', 'mixed', '1d' or None.")
    if self.norm not in ("layernorm", "rmsnorm"):
      raise ValueError(f"Unknown norm {self.norm!r}; use 'layernorm' or 'rmsnorm'.")
    if self.mlp not in ("gelu", "swiglu"):
      raise ValueError(f"Unknown mlp {self.mlp!r}; use 'gelu' or 'swiglu'.")
    if self.class_token_position not in ("first", "last"):
      raise ValueError(f"Unknown class_token_position {self.class_token_position!r}; "
                       "use 'first' or 'last'.")
    if self.class_token_position == "last" and (self.distilled or self.num_registers):
      raise ValueError("class_token_position='last' (iLLaMA) supports neither a distillation "
                       "token nor registers; set distilled=False and num_registers=0.")
    if self.soft_mask_steps and not self.causal:
      raise ValueError(f"soft_mask_steps={self.soft_mask_steps} moves the attention from "
                       "bidirectional to causal; it needs causal=True.")
    if self.soft_mask_schedule not in ("linear", "constant"):
      raise ValueError(f"Unknown soft_mask_schedule {self.soft_mask_schedule!r}; use 'linear' "
                       "or 'constant'.")
    block_module(self.remat_policy)  # Raises for an unknown policy before any work.

  @nn.compact
  def __call__(self, images, train=False, step=None):
    self._check()
    deterministic = not train
    out = {}
    images = patch_stem_input(self, images, "embedding")
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
                bias_init=logical(nn.initializers.zeros, "embed"),
                name="embedding")(images.astype(self.dtype))
    batch, grid_h, grid_w, width = x.shape
    x = out["stem"] = x.reshape(batch, grid_h * grid_w, width)

    prefix = []
    if self.pool_type == "token":
      prefix.append(self.param("cls", logical(nn.initializers.zeros, None, None, "embed"),
                               (1, 1, width), self.param_dtype))
    if self.distilled:
      prefix.append(self.param("dist", logical(nn.initializers.zeros, None, None, "embed"),
                               (1, 1, width), self.param_dtype))
    if prefix:
      prefix = jnp.concatenate(prefix, axis=1).astype(self.dtype)
      x = jnp.concatenate([jnp.tile(prefix, [batch, 1, 1]), x], axis=1)

    x = x + self._position_embedding(grid_h, grid_w, width).astype(self.dtype)
    if self.num_registers:
      registers = self.param("reg", logical(nn.initializers.normal(stddev=0.02), None, None,
                                            "embed"),
                             (1, self.num_registers, width), self.param_dtype)
      registers = jnp.tile(registers.astype(self.dtype), [batch, 1, 1])
      prefix_length = self.num_prefix_tokens
      x = jnp.concatenate([x[:, :prefix_length], registers, x[:, prefix_length:]], axis=1)
    positions = None
    if self.rope == "1d":
      positions = posemb_lib.sequence_positions(x.shape[1])
    elif self.rope:
      positions = posemb_lib.patch_positions(grid_h, grid_w, self.num_prefix_tokens,
                                             self.num_registers)
    class_last = self.class_token_position == "last" and self.num_prefix_tokens
    if class_last:  # The class token moves behind the patches, its position embedding with it.
      x = jnp.roll(x, -self.num_prefix_tokens, axis=1)
      if self.rope and self.rope != "1d":
        positions = tuple(jnp.roll(p, -self.num_prefix_tokens, axis=0) for p in positions)
    if self.embedding_norm:
      x = norm_layer(self.norm, "embedding_norm", self.layer_norm_eps, self.dtype,
                     self.param_dtype, use_bias=self.use_bias)(x)
    x = constrain(x, "act_batch", "act_length", "act_embed")
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    attention_bias = None
    if train and step is not None and self.uses_training_step:
      weight = soft_mask_weight(step, self.soft_mask_steps, self.soft_mask_schedule)
      attention_bias = soft_mask_bias(x.shape[1], weight).astype(self.dtype)
      out["soft_mask_weight"] = weight

    x, encoder_out = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, attention_dropout=self.attention_dropout,
        drop_path_rate=self.drop_path_rate, gelu_approximate=self.gelu_approximate,
        layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl,
        scan_layers=self.scan_layers, remat_policy=self.remat_policy,
        layer_scale_init=self.layer_scale_init, parallel_block=self.parallel_block,
        qk_norm=self.qk_norm, use_bias=self.use_bias, rope=self.rope, norm=self.norm,
        mlp=self.mlp, mlp_use_bias=self.mlp_use_bias, causal=self.causal,
        activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype,
        name="Transformer",
    )(x, deterministic, positions, attention_bias)
    out["encoder"] = encoder_out
    out["encoded"] = x
    first_patch = self.num_prefix_tokens + self.num_registers
    out["registers"] = x[:, self.num_prefix_tokens:first_patch]
    out["tokens"] = x[:, :-self.num_prefix_tokens] if class_last else x[:, first_patch:]

    if self.pool_type == "token":
      x = x[:, -1] if class_last else x[:, 0]
    elif self.pool_type == "gap":
      x = jnp.mean(out["tokens"], axis=1)  # Patch tokens only, not registers.
    elif self.pool_type == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  gelu_approximate=self.gelu_approximate, activation=self.activation,
                  layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="MAPHead_0")(x)
    out["head_input"] = x

    if self.representation_size:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="pre_logits",
                           kernel_init=logical(nn.initializers.lecun_normal(), "embed", "mlp"),
                           bias_init=logical(nn.initializers.zeros, "mlp"))(x))
    out["pre_logits"] = x

    if not self.num_classes:
      out["logits"] = x
      return x, out
    logits = self._head("head")(x)
    if self.distilled:
      out["logits_cls"] = logits
      out["logits_dist"] = self._head("head_dist")(out["encoded"][:, 1])
      logits = (out["logits_cls"] + out["logits_dist"]) / 2
    out["logits"] = logits
    return logits, out

  def _position_embedding(self, grid_h, grid_w, width):
    """(1, prefix + grid_h * grid_w, width), resized when the input is not `image_size`."""
    num_prefix = self.num_prefix_tokens
    if self.posemb == "none":  # Position only through RoPE, or none at all.
      return jnp.zeros((1, 1, width), self.dtype)
    if self.posemb == "sincos2d":
      grid = posemb_lib.sincos_2d(grid_h, grid_w, width)
      return jnp.pad(grid, ((0, 0), (num_prefix, 0), (0, 0)))
    side = self.image_size // self.patch_size
    posemb = self.param("pos_embedding",
                        logical(nn.initializers.normal(stddev=0.02), None, None, "embed"),
                        (1, num_prefix + side * side, width), self.param_dtype)
    return posemb_lib.resize_posemb(posemb, (grid_h, grid_w), num_prefix, self.posemb_resize)

  def _head(self, name):
    kernel_init = (nn.initializers.zeros if self.head_zeroinit
                   else nn.initializers.normal(stddev=0.02))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical(kernel_init, "embed", "classes"),
                    bias_init=logical(nn.initializers.zeros, "classes"), name=name)
