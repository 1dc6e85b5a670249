"""U-ViT: a ViT backbone for diffusion models, from `vitjax.models.parts`.

"All are Worth Words: A ViT Backbone for Diffusion Models" (Bao et al., CVPR 2023;
code: thu-ml/U-ViT). Every input is a token: the diffusion time, the class label
(or the text's tokens) and the noisy image's patches, with learned position
embeddings. The blocks are the ViT's (`parts.Block` of the ViT's attention and MLP
factories, pre-norm); `depth // 2` in-blocks, a mid block and `depth // 2`
out-blocks, each out-block taking a long skip from its in-block (last in, first
out): x = Dense(concat[x, skip]) before the block, the paper's best way to combine
them. A final norm and a Dense give each patch's pixels back, and an optional 3x3
convolution (`conv`) smooths the seams between patches.

    model = vitjax.create_model('uvit_huge_patch2_256')       # latent 32x32x4
    prediction, out = model.apply({'params': params}, x, timesteps=t, labels=y)

`depth` counts all the blocks, as the paper's table does (13 for U-ViT-S);
thu-ml/U-ViT's configs give it as `depth=12`, the in- and out-blocks together.
Token order is the authors' code's: [class, time, patches] for class conditions,
[time, text, patches] for text; their parameter names are kept where vitjax has
none of its own (`time_embed`, `label_emb`, `context_embed`, `skip_linear`,
`decoder_pred`, `final_layer`).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models import mae
from vitjax.models import parts
from vitjax.models import vit
from vitjax.models.conditioning import LabelEmbedder, timestep_embedding
from vitjax.models.layers import layer_norm, patch_stem_input
from vitjax.models.partitioning import logical

Dtype = Any
PAPER = "All are Worth Words: A ViT Backbone for Diffusion Models (Bao et al., 2023)"

# Size table: name -> (width, depth, mlp_dim, num_heads); the paper's Table 1 ('S-deep'
# is its U-ViT-S (Deep)). Depth counts every block: depth // 2 in, one mid, depth // 2 out.
SIZES = {
    "mu": (64, 5, 256, 4),  # A toy size for CPU runs; not from the paper.
    "S": (512, 13, 2048, 8),
    "S-deep": (512, 17, 2048, 8),
    "M": (768, 17, 3072, 12),
    "L": (1024, 21, 4096, 16),
    "H": (1152, 29, 4608, 16),
}


def decode_variant(variant):
  """'H/2' -> dict(width=1152, depth=29, mlp_dim=4608, num_heads=16, patch_size=2)."""
  size, slash, patch = variant.partition("/")
  if size not in SIZES or (slash and not patch.isdigit()):
    raise ValueError(f"Unknown U-ViT variant {variant!r}: expected SIZE/PATCH with SIZE in "
                     f"{', '.join(SIZES)} and an integer PATCH, e.g. 'H/2'.")
  width, depth, mlp_dim, num_heads = SIZES[size]
  config = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    config["patch_size"] = int(patch)
  return config


class UViT(nn.Module):
  """U-ViT: (B, H, W, in_channels) noisy images -> (B, H, W, out_channels) predictions.

  `__call__(x, timesteps=None, labels=None, train=False, force_drop=None, context=None)`
  returns `(prediction, out)`. `timesteps` (B,) ints or floats (None: zeros). `labels`
  (B,) ints, for `num_classes` > 0; None gives the null class (classifier-free
  guidance's unconditional input), or class 0 in a model without one
  (`class_dropout_prob=0`), so init and shape checks need no labels; an unconditional
  model (`num_classes=0`) ignores them. While training, each label is replaced by the
  null class with probability `class_dropout_prob` (the 'dropout' rng stream);
  `force_drop` (B,) bools replace chosen ones, in training or not. `context` (B,
  num_context_tokens, context_dim): a text encoder's tokens (U-ViT's text-to-image
  model; None: zeros).
  The prediction is float32 whatever `dtype`. `out` holds `encoded` (all final tokens,
  normed), `tokens` (the patch tokens among them) and `patches` (each patch's predicted
  pixels, (B, N, p * p * out_channels)).
  """
  image_size: int = 32  # The side the position embeddings are made for (a latent's side).
  in_channels: int = 3
  patch_size: int = 2
  width: int = 512
  depth: int = 13  # All blocks, odd: depth // 2 in-blocks, a mid block, depth // 2 out.
  mlp_dim: int = 2048
  num_heads: int = 8
  num_classes: int = 0  # 0: unconditional (no class token).
  # Classifier-free guidance: > 0 adds the null class (row `num_classes` of the table) and
  # drops labels to it with this probability while training (DiT's name and default).
  class_dropout_prob: float = 0.1
  # Text conditioning (U-ViT's text-to-image model): context_dim > 0 embeds the
  # num_context_tokens tokens of a text encoder (77 of CLIP's 768) with a Dense.
  context_dim: int = 0
  num_context_tokens: int = 0
  mlp_time_embed: bool = False  # The time token through Dense(4 * width), SiLU, Dense(width).
  conv: bool = True  # The final 3x3 convolution.
  learn_sigma: bool = False  # Also predict the variance: out_channels = 2 * in_channels (DiT).
  qkv_bias: bool = False  # Biases of the query/key/value projections; U-ViT has none.
  layer_norm_eps: float = 1e-5  # PyTorch's nn.LayerNorm, as in the authors' code.
  attention_impl: Optional[str] = None  # See vitjax.ops.dot_product_attention.
  remat_policy: str = "none"  # Recompute block activations: see parts.REMAT_POLICIES.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def out_channels(self):
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def num_prefix_tokens(self):
    """Tokens before the patches: class (if any), time, text (if any)."""
    return int(self.num_classes > 0) + 1 + (self.num_context_tokens if self.context_dim else 0)

  @property
  def null_class(self):
    """The label of the unconditional input; None without one (class_dropout_prob=0)."""
    return self.num_classes if self.num_classes and self.class_dropout_prob > 0 else None

  def _check(self):
    if self.depth < 1 or self.depth % 2 == 0:
      raise ValueError(f"U-ViT's depth counts its in-blocks, mid block and out-blocks, "
                       f"depth // 2 + 1 + depth // 2: an odd number; got depth={self.depth} "
                       f"(thu-ml/U-ViT's configs' depth={self.depth} is depth={self.depth + 1} "
                       "here).")
    if self.context_dim and not self.num_context_tokens:
      raise ValueError(f"context_dim={self.context_dim} needs num_context_tokens, the length "
                       "of the text encoder's output (77 for CLIP).")
    parts.rematted(parts.Block, self.remat_policy)  # Raises for an unknown policy.

  def block_factory(self):
    """The block: `parts.Block` of the ViT's attention and GELU MLP, LayerNorms with biases."""
    mixers = vit.VisionTransformer(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, use_bias=self.qkv_bias,
        mlp_use_bias=True, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, parent=None).builtin_mixers()
    # The output projection keeps its bias whatever `qkv_bias` (U-ViT's attention).
    mixers["token_mixer"] = functools.partial(mixers["token_mixer"], out_use_bias=True)
    norm = functools.partial(layer_norm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    block = functools.partial(parts.Block, norm=norm, param_dtype=self.param_dtype, **mixers)
    return parts.rematted(block, self.remat_policy)

  def _dense(self, features, name, axes, x):
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                    kernel_init=logical(nn.initializers.normal(stddev=0.02), *axes),
                    bias_init=logical(nn.initializers.zeros, axes[1]))(x)

  @nn.compact
  def __call__(self, x, timesteps=None, labels=None, train=False, force_drop=None,
               context=None):
    self._check()
    x = patch_stem_input(self, x, "embedding", image_size=self.image_size)
    batch = x.shape[0]
    patches = parts.share(self, parts.PatchEmbedding(
        self.patch_size, self.width, self.dtype, self.param_dtype))(x)
    grid_h = patches.shape[1]
    patches = patches.reshape(batch, -1, self.width)

    if timesteps is None:
      timesteps = jnp.zeros((batch,), jnp.float32)
    time = timestep_embedding(jnp.broadcast_to(timesteps, (batch,)), self.width)
    time = time.astype(self.dtype)
    if self.mlp_time_embed:
      time = self._dense(4 * self.width, "time_embed_0", (None, "mlp"), time)
      time = self._dense(self.width, "time_embed_2", ("mlp", "embed"), nn.silu(time))
    tokens = [time[:, None]]
    if self.num_classes:
      if labels is None:
        labels = self.null_class or 0
      labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (batch,))
      label = LabelEmbedder(self.num_classes, self.width, self.class_dropout_prob,
                            self.param_dtype, name="label_emb")(
                                labels, deterministic=not train, force_drop=force_drop)
      tokens.insert(0, label[:, None].astype(self.dtype))
    if self.context_dim:
      if context is None:
        context = jnp.zeros((batch, self.num_context_tokens, self.context_dim), self.dtype)
      tokens.append(self._dense(self.width, "context_embed", (None, "embed"),
                                context.astype(self.dtype)))
    x = jnp.concatenate(tokens + [patches], axis=1)
    posemb = self.param("pos_embedding",
                        logical(nn.initializers.normal(stddev=0.02), None, None, "embed"),
                        (1,) + x.shape[1:], self.param_dtype)
    x = x + posemb.astype(self.dtype)

    block = self.block_factory()
    run = lambda name, x: block(name=name)(x, {}, not train, None)[0]
    skips = []
    for i in range(self.depth // 2):
      x = run(f"in_block_{i}", x)
      skips.append(x)
    x = run("mid_block", x)
    for i in range(self.depth // 2):
      x = self._dense(self.width, f"skip_linear_{i}", (None, "embed"),
                      jnp.concatenate([x, skips.pop()], axis=-1))
      x = run(f"out_block_{i}", x)
    x = layer_norm("encoder_norm", self.layer_norm_eps, self.dtype, self.param_dtype)(x)

    out = {"encoded": x, "tokens": x[:, self.num_prefix_tokens:]}
    pixels = self.patch_size ** 2 * self.out_channels
    out["patches"] = self._dense(pixels, "decoder_pred", ("embed", None), out["tokens"])
    prediction = mae.unpatchify(out["patches"], self.patch_size, grid_h, self.out_channels)
    if self.conv:
      prediction = nn.Conv(self.out_channels, (3, 3), padding="SAME", dtype=self.dtype,
                           param_dtype=self.param_dtype, name="final_layer")(prediction)
    return prediction.astype(jnp.float32), out  # float32 for the loss, as DiT's.


def register_models(register, **kwargs):
  """Registers the paper's models, by the authors' configs (thu-ml/U-ViT, configs/).

  `uvit_{size}_patch{p}_{resolution}`: CIFAR-10 (S/2, 32 px) and CelebA (S/4, 64 px)
  unconditional; ImageNet 64 (M/4, L/4) class-conditional in pixels, without a null
  class; ImageNet 256 and 512 (L/2, H/2 on 32x32x4 latents; L/4, H/4 on 64x64x4) in
  Stable Diffusion's autoencoder's latent space (image_size is the latent's side),
  with the null class for guidance (class_dropout_prob: their p_uncond). `uvit_t2i_*`:
  MS-COCO text-to-image on 256 px latents, 77 CLIP tokens. None embeds the time with
  the MLP (mlp_time_embed=False in every config); only the H models drop the conv.
  """
  sizes = {"small": "S", "small_deep": "S-deep", "mid": "M", "large": "L", "huge": "H"}
  models = (
      ("small", 2, 32, dict(image_size=32)),
      ("small", 4, 64, dict(image_size=64)),
      ("mid", 4, 64, dict(image_size=64, num_classes=1000, class_dropout_prob=0.0)),
      ("large", 4, 64, dict(image_size=64, num_classes=1000, class_dropout_prob=0.0)),
      ("large", 2, 256, dict(image_size=32, in_channels=4, num_classes=1000,
                             class_dropout_prob=0.15)),
      ("huge", 2, 256, dict(image_size=32, in_channels=4, num_classes=1000,
                            class_dropout_prob=0.1, conv=False)),
      ("large", 4, 512, dict(image_size=64, in_channels=4, num_classes=1000,
                             class_dropout_prob=0.15)),
      ("huge", 4, 512, dict(image_size=64, in_channels=4, num_classes=1000,
                            class_dropout_prob=0.1, conv=False)),
  )
  for size, patch, resolution, config in models:
    register(f"uvit_{size}_patch{patch}_{resolution}", UViT, paper=PAPER, **kwargs,
             **decode_variant(f"{sizes[size]}/{patch}"), **config)
  for size in ("small", "small_deep"):
    register(f"uvit_t2i_{size}_patch2_256", UViT, paper=PAPER, **kwargs, image_size=32,
             in_channels=4, context_dim=768, num_context_tokens=77,
             **decode_variant(f"{sizes[size]}/2"))


__all__ = ["SIZES", "UViT", "decode_variant", "register_models"]
