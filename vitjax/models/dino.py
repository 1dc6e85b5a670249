"""Self-distillation models: a ViT with DINO's projection head (DINO, iBOT, DINOv2).

    model = vitjax.create_model('dino', variant='S/16', head_out_dim=65536)
    logits, out = model.apply({'params': params}, images, train=True, mask=patch_mask)

`DINO` is a `VisionTransformer` (its parameters keep the ViT's names, at the top level)
with a projection head on top:

  - `dino_head` (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers"): an MLP of `head_layers` Dense layers (GELU between them) down to a
    `head_bottleneck_dim` bottleneck, L2-normalised, then a weight-normalised Dense
    without bias to `head_out_dim` prototypes. With `norm_last_layer` (DINO's default)
    the weight norm's gain is fixed at 1: each prototype is a unit vector.
  - iBOT / DINOv2 (`patch_head`): the patch tokens go through a head too, for the
    masked-patch loss. 'shared' is iBOT's shared head (the class token's); 'separate'
    is a head of its own (`ibot_head`, `patch_out_dim` prototypes), as DINOv2 has.

`__call__(images, train=False, mask=None)` returns `(class-token logits, out)`, with the
ViT's `out` (`pre_logits`: the backbone's class token; `tokens`: its patch tokens) and
`out['patch_logits']` (B, N, K) with a patch head. `mask` (B, N) bool replaces the
masked patches' embeddings by the learned `mask_token` (iBOT's student input). Images
of another size than `image_size` (DINO's local crops) get the position embeddings
resized to their grid.

The teacher (an EMA of these parameters), centring and the losses are the training
task's: vitjax.train.tasks.self_distillation. For fine-tuning, `vitjax.load_weights(vit,
path)` gives a plain ViT the backbone and leaves out the heads and the mask token.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from vitjax.models.partitioning import logical
from vitjax.models.vit import VisionTransformer

PATCH_HEADS = (None, "shared", "separate")
_TRUNC_NORMAL = nn.initializers.truncated_normal(stddev=0.02)


class DINOHead(nn.Module):
  """DINO's projection head: MLP -> L2 normalisation -> weight-normalised prototypes.

  Parameters: `mlp_{i}` (Dense kernels and biases), `last_layer/kernel_v` (bottleneck,
  out_dim) and, without `norm_last_layer`, `last_layer/kernel_g` (out_dim,): the
  prototypes are g * v / ||v||, column by column (PyTorch's weight_norm of a Linear
  layer, dim=0).
  """
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.num_layers < 1:
      raise ValueError(f"head_layers={self.num_layers}: DINO's head has at least one Dense.")
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=logical(_TRUNC_NORMAL, "embed", "mlp"),
                              bias_init=logical(nn.initializers.zeros, "mlp"))
    widths = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
    for i, width in enumerate(widths):
      x = dense(width, name=f"mlp_{i}")(x)
      if i < len(widths) - 1:
        x = nn.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    # F.normalize: x / max(||x||, 1e-12).
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = self.param("kernel_v", logical(_TRUNC_NORMAL, "mlp", "classes"),
                   (self.bottleneck_dim, self.out_dim), self.param_dtype)
    v = v.astype(jnp.float32)
    kernel = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if not self.norm_last_layer:  # A learned gain per prototype, starting at 1.
      kernel = kernel * self.param("kernel_g", logical(nn.initializers.ones, "classes"),
                                   (self.out_dim,), self.param_dtype).astype(jnp.float32)
    return x @ kernel


class DINO(VisionTransformer):
  """A ViT with DINO's projection head (and iBOT's patch head); see the module docstring."""
  num_classes: int = 0  # The ViT's own classifier: none; the heads below replace it.
  head_out_dim: int = 65536
  head_hidden_dim: int = 2048
  head_bottleneck_dim: int = 256
  head_layers: int = 3
  norm_last_layer: bool = True
  patch_head: str = None  # None, 'shared' (iBOT) or 'separate' (DINOv2's ibot_head).
  patch_out_dim: int = None  # The separate head's prototypes; None: head_out_dim.

  def _projection(self, name, out_dim):
    return DINOHead(out_dim=out_dim, hidden_dim=self.head_hidden_dim,
                    bottleneck_dim=self.head_bottleneck_dim, num_layers=self.head_layers,
                    norm_last_layer=self.norm_last_layer, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, images, train=False, step=None, patch_size=None, mask=None, keep=None):
    if self.patch_head not in PATCH_HEADS:
      raise ValueError(f"patch_head={self.patch_head!r}: use None, 'shared' (iBOT) or "
                       "'separate' (DINOv2).")
    if self.num_classes:
      raise ValueError("A DINO model has no classifier (num_classes=0): its head is DINO's "
                       "projection head (head_out_dim).")
    if self.pool_type != "token":
      raise ValueError(f"DINO's head reads the class token: pool_type='token', not "
                       f"{self.pool_type!r}.")
    if mask is None and self.patch_head and self.is_initializing():
      mask = jnp.zeros(images.shape[:1] + (self._num_patches(images),), bool)
    _, out = super().__call__(images, train=train, step=step, patch_size=patch_size,
                              mask=mask, keep=keep)
    dino_head = self._projection("dino_head", self.head_out_dim)
    logits = dino_head(out["pre_logits"])
    if self.patch_head == "shared":
      out["patch_logits"] = dino_head(out["tokens"])
    elif self.patch_head == "separate":
      out["patch_logits"] = self._projection("ibot_head", self.patch_out_dim
                                             or self.head_out_dim)(out["tokens"])
    out["logits"] = logits
    return logits, out

  def _num_patches(self, images):
    patch = self.patch_size
    return (images.shape[1] // patch) * (images.shape[2] // patch)


def register_models(register, **kwargs):
  """The paper's backbones with their heads: DINO ViT-S/16, ViT-B/16 (65,536 prototypes),
  iBOT ViT-S/16, ViT-B/16 (shared head, 8,192 prototypes)."""
  dino_paper = "Emerging Properties in Self-Supervised Vision Transformers (Caron et al., 2021)"
  ibot_paper = "iBOT: Image BERT Pre-Training with Online Tokenizer (Zhou et al., 2022)"
  sizes = {"small": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
           "base": dict(width=768, depth=12, mlp_dim=3072, num_heads=12)}
  for size, dims in sizes.items():
    for patch in (8, 16):
      register(f"dino_vit_{size}_patch{patch}_224", DINO, paper=dino_paper, **kwargs,
               image_size=224, patch_size=patch, **dims)
    register(f"ibot_vit_{size}_patch16_224", DINO, paper=ibot_paper, **kwargs,
             image_size=224, patch_size=16, patch_head="shared", head_out_dim=8192,
             **dims)


__all__ = ["DINO", "DINOHead", "PATCH_HEADS", "register_models"]
