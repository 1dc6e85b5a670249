"""Vision Transformer (ViT) and DeiT, composed from `vitjax.models.parts`.

Parameter names follow big_vision, so its published .npz checkpoints load as
they are. Position embeddings cover the prefix tokens too (timm / DeiT / AugReg
layout), which makes the parameter counts equal the published ones.

The options below build the default parts: the stem (`parts.PatchStem`), the
block (`parts.Block` of attention and an MLP), the encoder and the head. A
family that needs another part passes it instead of adding an option here:
`token_mixer`, `channel_mixer` (factories of modules), `block` (the block
module, given the mixers and residual options) and `layers` (a per-layer
pattern, see `parts.every` / `parts.last`).

Memory switches: `remat_policy` recomputes each block's activations in the
backward pass instead of storing them, and `scan_layers=True` runs the blocks
with `nn.scan` (one compiled block, parameters stacked along a leading `layers`
axis: big_vision's `scan=True` layout; vitjax.convert.scan_params/unscan_params
convert between the two layouts, and load_weights reads either into either).
"""

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import flexi
from vitjax.models import parts
from vitjax.models import token_merging as token_merging_lib
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.layers import MAPHead, MlpBlock, SwiGLU, norm_layer, patch_stem_input
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


REMAT_POLICIES = parts.REMAT_POLICIES
# String options -> the part they stand for: the CLI and configs name parts by string.
NORMS = ("layernorm", "rmsnorm")
CHANNEL_MIXERS = {"gelu": MlpBlock, "swiglu": SwiGLU}


def vit_block(**options):
  """The block `VisionTransformer(**options)` builds (its first layer's), alone.

  For tests and notebooks: `vit_block(mlp_dim=..., num_heads=...).apply(...)`
  returns `(x, token_state)`.
  """
  default, _ = VisionTransformer(**options).layer_pattern()
  return default()


class VisionTransformer(nn.Module):
  """ViT (Dosovitskiy et al. 2021) with DeiT's distillation token as an option.

  `__call__(images, train=False, step=None)` takes NHWC images (checked by
  layers.patch_stem_input) and returns `(logits, out)`; `step` (the training step)
  matters only to iLLaMA's soft mask, and a model with one needs it when training.
  `out` holds `stem` (patch embeddings), `encoded` (all final tokens, normed),
  `tokens` (the final patch tokens), `registers`, `pre_logits`, `logits`, and for
  distilled models `logits_cls` and `logits_dist` (logits is their average).
  `encoder` holds `pre_norm` and, unless `scan_layers`, each block's output
  `blockNN`; `aux_loss` the blocks' auxiliary losses, if any reported one, and
  `aux_metrics` the means of the metrics they reported (an MoE's dropped tokens).
  """
  num_classes: int = 1000  # 0: no head, logits are the pre-logits.
  image_size: int = 224  # Resolution the position embeddings are made for.
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool_type: str = "token"  # 'token' (class token), 'gap', 'map' or 'none'.
  posemb: str = "learn"  # 'learn', 'sincos2d' or 'none'.
  # How learned position embeddings are resized for another input size: 'bilinear'
  # (big_vision), 'bicubic' (antialiased: timm, DINOv2 with registers) or
  # 'bicubic_no_antialias' (torch's default bicubic: original DINOv2, naver's rope-vit).
  posemb_resize: str = "bilinear"
  # False: position embeddings for the patches only, none for the class and distillation
  # tokens (timm's no_embed_class, DeiT III).
  class_posemb: bool = True
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
  # Block options (see parts.Block): LayerScale (CaiT, DINOv2), and ViT-22B's
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
  mlp: str = "gelu"  # The channel mixer: 'gelu' (MlpBlock) or 'swiglu'.
  mlp_use_bias: Optional[bool] = None
  causal: bool = False
  class_token_position: str = "first"  # Or 'last'.
  soft_mask_steps: int = 0  # 0: no soft mask, causal from the start.
  soft_mask_schedule: str = "linear"  # Or 'constant'; see soft_mask_weight.
  # FlexiViT (Beyer et al. 2023; vitjax.models.flexi). The kernel is stored at
  # `patch_size`; `__call__(..., patch_size=p)` runs at any p with it PI-resized.
  # `patch_sizes`: the training set; vitjax.train draws one per step, uniformly, and
  # trains a clone with `train_patch_size` set to it (one compiled step per size).
  # `train_patch_size`: the patch size of train=True calls given no `patch_size`
  # (None: `patch_size`); evaluation calls keep `patch_size`.
  # `patch_resize`: how the kernel is resized: 'bilinear' or 'bicubic' (antialiased
  # when shrinking, timm's resample_patch_embed; 'bicubic' is timm's default) or
  # 'bilinear_no_antialias' (big_vision's resample_patchemb: tf.image.resize).
  patch_sizes: Optional[Sequence[int]] = None
  train_patch_size: Optional[int] = None
  patch_resize: str = "bilinear"
  # OpenAI CLIP's image tower: the MLP nonlinearity ('gelu' or 'quick_gelu') and a
  # LayerNorm over the embedded tokens before the first block (CLIP's ln_pre).
  activation: str = "gelu"
  embedding_norm: bool = False
  # Parts that replace the default ones built from the options above (see parts.py).
  token_mixer: Optional[Callable[..., nn.Module]] = None  # Default: multi-head attention.
  channel_mixer: Optional[Callable[..., nn.Module]] = None  # Default: per `mlp`.
  block: Optional[Callable[..., nn.Module]] = None  # Default: parts.Block.
  layers: Optional[Sequence[Any]] = None  # Per-layer pattern; see `layer_pattern`.
  # Token merging and pruning (vitjax.models.token_merging): ToMe, EViT or top-k in the
  # blocks, e.g. dict(r=8) or dict(method='evit', keep_rate=0.7); None or r=0: off.
  token_merging: Optional[Any] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.patch_sizes is not None:  # A tuple: jit takes the model as a static argument.
      object.__setattr__(self, "patch_sizes", tuple(self.patch_sizes))
    if self.layers is not None:  # Hashable: jit takes the model as a static argument.
      object.__setattr__(self, "layers", tuple(
          flax.core.FrozenDict(entry) if isinstance(entry, Mapping) else entry
          for entry in self.layers))
    object.__setattr__(self, "token_merging", token_merging_lib.freeze(self.token_merging))
    super().__post_init__()

  @property
  def num_prefix_tokens(self):
    return int(self.pool_type == "token") + int(self.distilled)

  @property
  def uses_training_step(self):
    """Whether the trainer should pass the training step (the soft-mask schedule needs it)."""
    return bool(self.causal and self.soft_mask_steps)

  def _check(self):
    choices = {"pool_type": parts.POOL_TYPES, "posemb": ("learn", "sincos2d", "none"),
               "rope": (None, "axial", "mixed", "1d"), "norm": NORMS,
               "mlp": tuple(CHANNEL_MIXERS), "class_token_position": ("first", "last"),
               "soft_mask_schedule": ("linear", "constant"),
               "patch_resize": tuple(flexi.PATCH_RESIZE_METHODS)}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"Unknown {name} {getattr(self, name)!r}; use one of: "
                         f"{', '.join(map(repr, allowed))}.")
    if self.distilled and self.pool_type != "token":
      raise ValueError("A distilled (DeiT) model needs pool_type='token'.")
    if self.class_token_position == "last" and self.pool_type != "token":
      raise ValueError(f"class_token_position='last' moves the class token, but "
                       f"pool_type={self.pool_type!r} has none: use pool_type='token' or "
                       "class_token_position='first'.")
    if self.class_token_position == "last" and (self.distilled or self.num_registers):
      raise ValueError("class_token_position='last' (iLLaMA) supports neither a distillation "
                       "token nor registers; set distilled=False and num_registers=0.")
    if self.soft_mask_steps and not self.causal:
      raise ValueError(f"soft_mask_steps={self.soft_mask_steps} moves the attention from "
                       "bidirectional to causal; it needs causal=True.")
    parts.rematted(parts.Block, self.remat_policy)  # Raises for an unknown policy.
    for size in (*(self.patch_sizes or ()), self.train_patch_size):
      if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"patch_sizes={self.patch_sizes!r}, train_patch_size="
                         f"{self.train_patch_size!r}: patch sizes must be positive ints.")
    if self.patch_sizes is not None and not self.patch_sizes:
      raise ValueError("patch_sizes=(): give the patch sizes to train at, or None.")

  def norm_factory(self):
    """The norm of the blocks, the stem and the encoder's end, per `norm` and `use_bias`."""
    return functools.partial(norm_layer, self.norm, epsilon=self.layer_norm_eps,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             use_bias=self.use_bias)

  def builtin_mixers(self):
    """The token and channel mixers the options build: attention, and the `mlp` MLP."""
    attention = functools.partial(
        MultiHeadDotProductAttention, num_heads=self.num_heads, dropout=self.attention_dropout,
        use_bias=self.use_bias, qk_norm=self.qk_norm, rope=self.rope, causal=self.causal,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_0")
    options = dict(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="MlpBlock_0",
                   use_bias=self.use_bias if self.mlp_use_bias is None else self.mlp_use_bias)
    if self.mlp == "gelu":
      options.update(gelu_approximate=self.gelu_approximate, activation=self.activation)
    return dict(token_mixer=attention,
                channel_mixer=functools.partial(CHANNEL_MIXERS[self.mlp], **options))

  def block_options(self):
    """The keyword arguments of the default block: its mixers, norm and residual options."""
    builtin = self.builtin_mixers()
    return dict(token_mixer=self.token_mixer or builtin["token_mixer"],
                channel_mixer=self.channel_mixer or builtin["channel_mixer"],
                norm=self.norm_factory(), parallel=self.parallel_block,
                layer_scale_init=self.layer_scale_init, dropout=self.dropout,
                param_dtype=self.param_dtype)

  def layer_pattern(self):
    """(default block factory, per-layer factories or None) from `block` and `layers`.

    Each entry of `layers` is None (the default block), a dict of the default
    block's options to change, or a block factory. In a dict, `token_mixer=None` /
    `channel_mixer=None` mean the parts the options build (attention, the `mlp`
    MLP), whatever the `token_mixer` / `channel_mixer` fields say: e.g. attention
    in the last block of a pooling model, `layers=parts.last(1, dict(token_mixer=None),
    depth)`.
    """
    block_module = self.block or parts.Block
    options = self.block_options()
    default = functools.partial(block_module, **options)
    if self.layers is None:
      return default, None
    builtin = self.builtin_mixers()
    made = []  # One factory per distinct entry: scan finds repeating units by identity.

    def factory(entry):
      if entry is None:
        return default
      for seen, made_factory in made:  # By equality: flax turns dicts into FrozenDicts.
        if seen is entry or seen == entry:
          return made_factory
      if isinstance(entry, Mapping):
        changes = {k: builtin[k] if v is None and k in builtin else v for k, v in entry.items()}
        made.append((entry, functools.partial(block_module, **{**options, **changes})))
      else:
        made.append((entry, entry))
      return made[-1][1]
    return default, tuple(factory(entry) for entry in self.layers)

  @nn.compact
  def __call__(self, images, train=False, step=None, patch_size=None, mask=None, keep=None):
    """(logits, out) of NHWC `images`.

    `mask` (B, N) bool: the masked patches' embeddings are replaced by a learned
    `mask_token` (iBOT, BEiT); `keep` (B, K) int: only these patches (row-major
    indices) are encoded, after the prefix tokens (I-JEPA's context). See
    `parts.PatchStem`.

    `patch_size` (FlexiViT): cut the images into patches of this size instead of the
    model's, with the patch embedding PI-resized to it and the learned position
    embeddings resized to the grid (vitjax.models.flexi); the weights stay as they are.
    Training calls without it use `train_patch_size` (set per step by vitjax.train
    from `patch_sizes`).
    """
    self._check()
    if patch_size is None and train:
      patch_size = self.train_patch_size
    if patch_size is not None and (not isinstance(patch_size, int) or patch_size < 1):
      raise ValueError(f"patch_size must be a positive int (the side of a patch in "
                       f"pixels), not {patch_size!r}.")
    if train and self.uses_training_step and step is None:
      raise ValueError(f"This model's soft mask (soft_mask_steps={self.soft_mask_steps}) "
                       "follows the training step: call it with train=True, step=STEP "
                       "(vitjax.train does), or set soft_mask_steps=0.")
    deterministic = not train
    images = patch_stem_input(self, images, "embedding", patch_size=patch_size)
    stem = parts.share(self, parts.PatchStem(
        patch_size=self.patch_size, width=self.width, image_size=self.image_size,
        class_token=self.pool_type == "token", distillation_token=self.distilled,
        num_registers=self.num_registers, posemb=self.posemb, posemb_resize=self.posemb_resize,
        patch_resize=self.patch_resize,
        class_posemb=self.class_posemb, class_token_position=self.class_token_position,
        embedding_norm=self.norm_factory() if self.embedding_norm else None, rope=self.rope,
        dtype=self.dtype, param_dtype=self.param_dtype))
    x, token_state, out = stem(images, patch_size, mask=mask, keep=keep)
    del out["grid"]
    x = constrain(x, "act_batch", "act_length", "act_embed")
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    if train and self.uses_training_step:
      weight = soft_mask_weight(step, self.soft_mask_steps, self.soft_mask_schedule)
      token_state["attention_bias"] = soft_mask_bias(x.shape[1], weight).astype(self.dtype)
      out["soft_mask_weight"] = weight

    block, layers = self.layer_pattern()
    merging = token_merging_lib.parse(self.token_merging, self.depth)
    if merging:
      token_merging_lib.check_model(self, merging)
      layers = token_merging_lib.apply(merging, parts.layer_factories(block, layers, self.depth),
                                       self.num_prefix_tokens + self.num_registers,
                                       class_token=self.pool_type == "token")
    x, token_state, out["encoder"] = parts.Encoder(
        block=block, depth=self.depth, layers=layers, norm=self.norm_factory(),
        drop_path_rate=self.drop_path_rate, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, name="Transformer")(x, token_state, deterministic)
    if parts.AUX_LOSS in token_state:
      out[parts.AUX_LOSS] = token_state[parts.AUX_LOSS]
    if parts.AUX_METRICS in token_state:
      out[parts.AUX_METRICS] = parts.aux_metrics_means(token_state)
    out["encoded"] = x
    class_last = self.class_token_position == "last" and self.num_prefix_tokens
    first_patch = self.num_prefix_tokens + self.num_registers
    out["registers"] = x[:, self.num_prefix_tokens:first_patch]
    out["tokens"] = x[:, :-self.num_prefix_tokens] if class_last else x[:, first_patch:]
    if merging:  # Every patch's token back, in patch order; the reduced ones stay in `encoded`.
      out["tokens"] = token_merging_lib.unmerged_patches(x, token_state, first_patch,
                                                         out["stem"].shape[1])
      out["token_sizes"] = token_state["token_sizes"]
      out["token_index"] = token_state["token_index"]
    x = parts.pool(self.pool_type, x, first_patch=first_patch, class_last=class_last,
                   token_sizes=token_state.get("token_sizes"), map_head=lambda tokens: MAPHead(
                       num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                       gelu_approximate=self.gelu_approximate, activation=self.activation,
                       layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="MAPHead_0")(tokens))
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

  def _head(self, name):
    kernel_init = (nn.initializers.zeros if self.head_zeroinit
                   else nn.initializers.normal(stddev=0.02))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical(kernel_init, "embed", "classes"),
                    bias_init=logical(nn.initializers.zeros, "classes"), name=name)
