"""Masked image modelling: MAE (He et al. 2022) and SimMIM (Xie et al. 2022).

Both encoders are the ViT's parts (`parts.PatchEmbedding`, `parts.Encoder` of
`parts.Block`s) under the
ViT's parameter names ('embedding', 'cls', 'pos_embedding', 'Transformer/...'),
so `encoder_params(params)` is a plain ViT's parameters (pool_type='token',
posemb='learn') ready for fine-tuning, and `vitjax.load_weights(vit_model,
mae_checkpoint)` reads them from a saved MAE or SimMIM.

    model = vitjax.create_model('mae_vit_base_patch16')
    predictions, out = model.apply({'params': params}, images, train=True,
                                   rngs={'random': key})
    out['loss'], out['mask'], out['targets'], out['pre_logits']

Masking happens when `train=True` or a 'random' rng stream is given (the mask is
drawn from it), or when a `noise` (MAE) / `mask` (SimMIM) is given. Otherwise the
encoder sees every patch and the call returns `(None, out)` with the whole
image's `pre_logits`: what the few-shot and linear-probe evaluators read.

MAE's position embeddings are the paper's fixed 2-D sin-cos ones, held as
parameters (as in the published checkpoints) that no gradient reaches.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import parts
from vitjax.models import token_merging as token_merging_lib
from vitjax.models.attention import MultiHeadDotProductAttention
from vitjax.models.layers import MlpBlock, layer_norm, patch_stem_input
from vitjax.models.partitioning import logical

Dtype = Any

# The parameters a plain ViT (pool_type='token', posemb='learn') shares with these models.
ENCODER_PARAMS = ("embedding", "cls", "pos_embedding", "Transformer")


def mae_sincos_2d(grid_h, grid_w, width, temperature=10_000.0):
  """MAE's fixed position embeddings, (1, 1 + grid_h * grid_w, width), zeros for the class token.

  Per patch: [sin(column * w), cos(column * w), sin(row * w), cos(row * w)] with
  w_k = temperature^(-k / (width / 4)), the layout of the published MAE weights.
  (vitjax's posemb='sincos2d' spaces the frequencies over width / 4 - 1 instead.)
  """
  if width % 4:
    raise ValueError(f"MAE's sin-cos position embeddings need a width divisible by 4, got {width}.")
  frequencies = temperature ** (-np.arange(width // 4) / (width // 4))
  rows, columns = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  angles = [np.outer(axis.ravel(), frequencies) for axis in (columns, rows)]
  grid = np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1)
  return np.concatenate([np.zeros((1, width)), grid])[None].astype(np.float32)


def patchify(images, patch_size):
  """(B, H, W, C) -> (B, H/p * W/p, p * p * C), patches row by row, pixels (row, column, channel)."""
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"Images of {height}x{width} do not split into {patch_size}x{patch_size} "
                     "patches; use an image size divisible by the patch size.")
  grid_h, grid_w = height // patch_size, width // patch_size
  x = images.reshape(batch, grid_h, patch_size, grid_w, patch_size, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * grid_w, -1)


def unpatchify(patches, patch_size, grid_h=None, channels=3):
  """The inverse of `patchify`: (B, N, p * p * C) -> (B, H, W, C) (a square grid by default)."""
  batch, num_patches, _ = patches.shape
  grid_h = grid_h or int(round(num_patches ** 0.5))
  grid_w = num_patches // grid_h
  x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * patch_size,
                                               grid_w * patch_size, channels)


def patch_targets(images, patch_size, norm_pix_loss=False, eps=1e-6):
  """Per-patch pixel targets; with `norm_pix_loss`, each patch normalised to mean 0, std 1.

  The variance is the unbiased one (ddof=1), as in MAE's code and Hugging Face's.
  """
  targets = patchify(images.astype(jnp.float32), patch_size)
  if not norm_pix_loss:
    return targets
  mean = targets.mean(axis=-1, keepdims=True)
  variance = targets.var(axis=-1, keepdims=True, ddof=1)
  return (targets - mean) / jnp.sqrt(variance + eps)


def patch_errors(predictions, targets, norm="l2"):
  """(B, N) each patch's mean squared ('l2', MAE) or absolute ('l1', SimMIM) error."""
  difference = predictions.astype(jnp.float32) - targets
  return (jnp.square(difference) if norm == "l2" else jnp.abs(difference)).mean(axis=-1)


def masked_patch_loss(predictions, targets, mask, norm="l2"):
  """Mean of `patch_errors` over the masked patches (mask 1).

  Visible patches (mask 0) do not count, whatever is predicted for them.
  """
  mask = mask.astype(jnp.float32)
  errors = patch_errors(predictions, targets, norm)
  return jnp.sum(errors * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def num_visible(num_patches, mask_ratio):
  """Patches an MAE encoder sees: round(N * (1 - mask_ratio)), at least one."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio={mask_ratio}: it must be in (0, 1), e.g. MAE's 0.75.")
  return max(1, int(round(num_patches * (1.0 - mask_ratio))))


def random_masking(noise, num_keep):
  """MAE's per-example masking: the `num_keep` patches of lowest noise stay visible.

  Returns (ids_keep (B, K), ids_restore (B, N), mask (B, N), 1 for a masked patch);
  `ids_restore` puts the sequence [visible..., masked...] back in patch order.
  """
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :num_keep]
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return ids_keep, ids_restore, mask


def block_mask(rng, batch_size, grid_size, mask_grid_size, mask_ratio):
  """SimMIM's masking: ceil(G^2 * ratio) random cells of a G x G grid of mask patches, per example.

  Returns (B, grid_size^2) float, 1 for masked patches, row by row; each mask cell
  covers (grid_size / G)^2 patches.
  """
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio={mask_ratio}: it must be in (0, 1), e.g. SimMIM's 0.6.")
  num_cells = mask_grid_size * mask_grid_size
  num_masked = int(np.ceil(num_cells * mask_ratio))
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch_size, num_cells)), axis=1), axis=1)
  cells = (ranks < num_masked).reshape(batch_size, mask_grid_size, mask_grid_size)
  scale = grid_size // mask_grid_size
  mask = jnp.repeat(jnp.repeat(cells, scale, axis=1), scale, axis=2)
  return mask.reshape(batch_size, grid_size * grid_size).astype(jnp.float32)


def encoder_params(params):
  """A MAE's or SimMIM's encoder as a plain ViT's parameters (pool_type='token', posemb='learn').

  Load them with `vitjax.load_weights(vit_model, path)` on a saved checkpoint,
  or use them directly for a ViT of the same size, with a head of your own.
  """
  params = params.get("params", params) if set(params) == {"params"} else params
  missing = [name for name in ENCODER_PARAMS if name not in params]
  if missing:
    raise ValueError(f"These are not a MAE / SimMIM model's parameters: no {', '.join(missing)}.")
  return {name: params[name] for name in ENCODER_PARAMS}


class _MaskedImageModel(nn.Module):
  """The ViT encoder shared by MAE and SimMIM: patch embedding, class token, encoder."""
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  in_channels: int = 3
  attention_impl: Optional[str] = None
  remat_policy: str = "none"
  scan_layers: bool = False
  # Token merging / pruning in the encoder (vitjax.models.token_merging), e.g. dict(r=4):
  # the encoded tokens are unmerged (one per visible patch) before the decoder.
  token_merging: Optional[Any] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "token_merging", token_merging_lib.freeze(self.token_merging))
    super().__post_init__()

  @property
  def grid_size(self):
    return self.image_size // self.patch_size

  def _check_images(self, images):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}.")
    # The fixed position embeddings and the mask grid take image_size images only.
    return patch_stem_input(self, images, "embedding", image_size=self.image_size)

  def _embed_patches(self, images):
    """(B, N, width) patch embeddings, row by row."""
    x = parts.share(self, parts.PatchEmbedding(self.patch_size, self.width, self.dtype,
                                               self.param_dtype))(images)
    return x.reshape(x.shape[0], -1, self.width)

  def _token(self, name, width, init=nn.initializers.normal(stddev=0.02)):
    return self.param(name, logical(init, None, None, "embed"), (1, 1, width),
                      self.param_dtype).astype(self.dtype)

  def _encoder(self, name, depth, mlp_dim, num_heads, drop_path_rate):
    norm = functools.partial(layer_norm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    block = functools.partial(
        parts.Block, norm=norm, dropout=self.dropout, param_dtype=self.param_dtype,
        token_mixer=functools.partial(
            MultiHeadDotProductAttention, num_heads=num_heads, dropout=self.attention_dropout,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
            name="MultiHeadDotProductAttention_0"),
        channel_mixer=functools.partial(
            MlpBlock, mlp_dim=mlp_dim, dropout=self.dropout,
            gelu_approximate=self.gelu_approximate, dtype=self.dtype,
            param_dtype=self.param_dtype, name="MlpBlock_0"))
    layers = None
    merging = name == "Transformer" and token_merging_lib.parse(self.token_merging, depth)
    if merging:  # The encoder only; the decoder sees every token again.
      token_merging_lib.check_model(self, merging)
      layers = token_merging_lib.apply(merging, (block,) * depth, num_protected=1)
    return parts.Encoder(block=block, depth=depth, layers=layers, norm=norm,
                         drop_path_rate=drop_path_rate, scan_layers=self.scan_layers,
                         remat_policy=self.remat_policy, name=name)

  def _encode(self, x, deterministic, out):
    """Runs the ViT encoder on (B, 1 + n, width) tokens; fills out's encoder entries.

    With token merging, the encoded tokens are unmerged: one per input token again.
    """
    x, token_state, out["encoder"] = self._encoder(
        "Transformer", self.depth, self.mlp_dim, self.num_heads,
        self.drop_path_rate)(x, deterministic=deterministic)
    if "token_index" in token_state:
      out["token_sizes"] = token_state["token_sizes"]
      out["token_index"] = token_state["token_index"]
      x = token_merging_lib.unmerge(x, token_state["token_index"])
    out["encoded"] = x
    out["tokens"] = x[:, 1:]
    out["pre_logits"] = x[:, 0]  # The class token, as MAE's linear probe reads it.
    return x


class MaskedAutoencoder(_MaskedImageModel):
  """MAE: a ViT encoder on the visible patches, a light decoder that predicts every patch's pixels.

  `__call__(images, train=False, noise=None)` returns `(predictions, out)`:
  predictions (B, N, p * p * C) for every patch (None when nothing is masked),
  and `out` with 'mask' (B, N, 1 = masked), 'ids_restore', 'predictions',
  'targets' (per-patch pixels, normalised with `norm_pix_loss`), 'loss' (mean
  squared error over masked patches), and the encoder's 'encoded' (class token +
  visible patches, normed), 'tokens' and 'pre_logits' (the class token).
  `noise` (B, N) fixes the mask: the patches of lowest noise stay visible (the
  `noise` argument of Hugging Face's ViTMAE, for parity checks).
  """
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_mlp_dim: Optional[int] = None  # 4 x decoder_width.
  decoder_num_heads: int = 16
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False  # The paper's better setting; Hugging Face's default is False.
  loss_norm = "l2"  # Mean squared error (see patch_errors).

  @nn.compact
  def __call__(self, images, train=False, noise=None):
    images = self._check_images(images)
    deterministic = not train
    out = {}
    batch = images.shape[0]
    posemb = self._fixed_posemb("pos_embedding", self.width)
    x = self._embed_patches(images) + posemb[:, 1:]
    num_patches = x.shape[1]

    masked = train or noise is not None or self.has_rng("random")
    if masked:
      if noise is None:
        noise = jax.random.uniform(self.make_rng("random"), (batch, num_patches))
      ids_keep, ids_restore, mask = random_masking(
          noise, num_visible(num_patches, self.mask_ratio))
      x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    else:  # Every patch visible: features of the whole image.
      ids_restore = jnp.tile(jnp.arange(num_patches), (batch, 1))
      mask = jnp.zeros((batch, num_patches), jnp.float32)
    cls = self._token("cls", self.width) + posemb[:, :1]
    x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)), x], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    x = self._encode(x, deterministic, out)
    out["mask"] = mask
    out["ids_restore"] = ids_restore
    if not masked and not self.is_initializing():
      return None, out

    predictions = self._decode(x, ids_restore, deterministic)
    out["predictions"] = predictions
    out["targets"] = patch_targets(images, self.patch_size, self.norm_pix_loss)
    out["loss"] = masked_patch_loss(predictions, out["targets"], mask, self.loss_norm)
    return predictions, out

  def _decode(self, x, ids_restore, deterministic):
    """Pixels (B, N, p * p * C) of every patch from the encoded class + visible tokens."""
    batch, num_patches = ids_restore.shape
    x = nn.Dense(self.decoder_width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
                 bias_init=logical(nn.initializers.zeros, "mlp"), name="decoder_embed")(x)
    mask_tokens = jnp.tile(self._token("mask_token", self.decoder_width),
                           (batch, num_patches + 1 - x.shape[1], 1))
    # [visible..., mask tokens...] back to patch order.
    patches = jnp.take_along_axis(jnp.concatenate([x[:, 1:], mask_tokens], axis=1),
                                  ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + self._fixed_posemb("decoder_pos_embedding", self.decoder_width)
    x, _, _ = self._encoder("Decoder", self.decoder_depth,
                            self.decoder_mlp_dim or 4 * self.decoder_width,
                            self.decoder_num_heads, 0.0)(x, deterministic=deterministic)
    pixels = self.patch_size * self.patch_size * self.in_channels
    x = nn.Dense(pixels, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", None),
                 bias_init=logical(nn.initializers.zeros, None), name="decoder_pred")(x)
    return x[:, 1:].astype(jnp.float32)

  def _fixed_posemb(self, name, width):
    """MAE's sin-cos embeddings as a parameter (the checkpoints hold them) that is never trained."""
    grid = self.grid_size
    posemb = self.param(name, logical(lambda *_: jnp.asarray(mae_sincos_2d(grid, grid, width)),
                                      None, None, "embed"),
                        (1, 1 + grid * grid, width), self.param_dtype)
    return jax.lax.stop_gradient(posemb).astype(self.dtype)


class SimMIM(_MaskedImageModel):
  """SimMIM: masked patches replaced by a learned mask token in the encoder's input; a linear
  head predicts raw pixels; L1 loss on the masked patches.

  `__call__(images, train=False, mask=None)` returns `(predictions, out)` like
  MaskedAutoencoder's; `mask` (B, N) fixes which patches are masked (1). Masks
  are random blocks of `mask_patch_size` pixels (32 over patch 16 in the paper).
  Position embeddings are learned, as a ViT's.
  """
  mask_ratio: float = 0.6
  mask_patch_size: int = 32
  norm_pix_loss = False  # Raw pixels are the target.
  loss_norm = "l1"

  @nn.compact
  def __call__(self, images, train=False, mask=None):
    images = self._check_images(images)
    if self.image_size % self.mask_patch_size or self.mask_patch_size % self.patch_size:
      raise ValueError(f"SimMIM needs image_size ({self.image_size}) divisible by "
                       f"mask_patch_size ({self.mask_patch_size}), and mask_patch_size "
                       f"divisible by patch_size ({self.patch_size}).")
    deterministic = not train
    out = {}
    batch = images.shape[0]
    x = self._embed_patches(images)
    masked = train or mask is not None or self.has_rng("random")
    if mask is None:
      mask = (block_mask(self.make_rng("random"), batch, self.grid_size,
                         self.image_size // self.mask_patch_size, self.mask_ratio)
              if masked else jnp.zeros(x.shape[:2], jnp.float32))
    mask = mask.astype(jnp.float32)
    mask_token = self._token("mask_token", self.width)
    x = x * (1.0 - mask[..., None]).astype(self.dtype) + mask_token * mask[..., None].astype(
        self.dtype)
    cls = jnp.tile(self._token("cls", self.width, nn.initializers.zeros), (batch, 1, 1))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.param("pos_embedding",
                       logical(nn.initializers.normal(stddev=0.02), None, None, "embed"),
                       (1, x.shape[1], self.width), self.param_dtype).astype(self.dtype)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    x = self._encode(x, deterministic, out)
    out["mask"] = mask
    if not masked and not self.is_initializing():
      return None, out

    pixels = self.patch_size * self.patch_size * self.in_channels
    predictions = nn.Dense(pixels, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=logical(nn.initializers.xavier_uniform(), "embed", None),
                           bias_init=logical(nn.initializers.zeros, None),
                           name="decoder_pred")(out["tokens"]).astype(jnp.float32)
    out["predictions"] = predictions
    out["targets"] = patch_targets(images, self.patch_size, self.norm_pix_loss)
    out["loss"] = masked_patch_loss(predictions, out["targets"], mask, self.loss_norm)
    return predictions, out


def register_models(register, **kwargs):
  """Registers the published MAE sizes, SimMIM ViT-B and toy sizes for CPU runs."""
  mae_paper = "Masked Autoencoders Are Scalable Vision Learners (He et al., 2022)"
  # (name, encoder width, depth, mlp_dim, heads, patch): the paper's three encoders.
  for size, width, depth, mlp_dim, heads, patch in (
      ("base", 768, 12, 3072, 12, 16), ("large", 1024, 24, 4096, 16, 16),
      ("huge", 1280, 32, 5120, 16, 14)):
    register(f"mae_vit_{size}_patch{patch}", MaskedAutoencoder, paper=mae_paper, **kwargs,
             image_size=224, patch_size=patch, width=width, depth=depth, mlp_dim=mlp_dim,
             num_heads=heads, decoder_width=512, decoder_depth=8, decoder_num_heads=16)
  # A toy for CPU runs on 16 px digits (ViT 'mu' encoder); not from a paper.
  register("mae_vit_mu_patch4", MaskedAutoencoder, paper=mae_paper, **kwargs, image_size=16,
           patch_size=4, width=64, depth=4, mlp_dim=256, num_heads=4, decoder_width=32,
           decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)
  simmim_paper = "SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., 2022)"
  register("simmim_vit_base_patch16", SimMIM, paper=simmim_paper, **kwargs, image_size=224,
           patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12, mask_patch_size=32)
  register("simmim_vit_mu_patch4", SimMIM, paper=simmim_paper, **kwargs, image_size=16,
           patch_size=4, width=64, depth=4, mlp_dim=256, num_heads=4, mask_patch_size=8)
