"""Parts that vitjax's transformers are composed of: blocks, encoders, stems, pooling.

A transformer is a stem (images to tokens), an encoder (a stack of blocks and a
final norm), pooling and a head. A block is

    x = x + token_mixer(norm(x))        x = x + token_mixer(norm(x)) + channel_mixer(norm(x))
    x = x + channel_mixer(norm(x))      (the parallel form, ViT-22B)

Each part is a linen module given by a factory, usually `functools.partial(Module,
**options)`; the block calls it with nothing but a name. A new token mixer
(windowed attention, pooling, MoE routing) or channel mixer (SwiGLU, experts) is
a module and a factory, not a new option of the ViT:

    mixer = functools.partial(MyPooling, pool_size=3)
    model = vitjax.create_model('vit', variant='S/16', token_mixer=mixer)

Mixers are called `mixer(x, deterministic=..., token_state=...)` and return the
mixed tokens, or `(tokens, {name: scalar})` to add auxiliary losses (an MoE's
load-balancing loss) that reach the task's loss through `out['aux_loss']`, or
`(tokens, losses, report)` with a dict of arrays for the block's token reducer
(the attention's keys for ToMe, its class-token row for EViT); a report's
`aux_metrics` ({name: scalar}) are logged, not trained on (`out['aux_metrics']`).

A block's `token_reducer` (vitjax.models.token_merging) changes the number of
tokens between the token mixer and the channel mixer: `reducer(x, token_state,
report)` -> `(x, token_state)`.

Token state: a dict of per-token (or per-sequence) arrays that travels with the
tokens through the blocks. Blocks may change the number of tokens (merging,
pruning) and must then update what they carry. Keys vitjax uses:

    positions       RoPE positions of the tokens (see MultiHeadDotProductAttention)
    attention_bias  additive attention bias; replaces the causal mask (iLLaMA's soft mask)
    segment_ids     (batch, tokens) ints: tokens attend within their segment (packing)
    token_sizes     (batch, tokens): how many input tokens each token stands for (merging)
    token_index     (batch, input tokens): the token each input token went into (-1: pruned)
    aux_loss        {name: scalar} auxiliary losses, summed over the blocks
    aux_metrics     {name: (sum, count)} metrics blocks report (an MoE's dropped tokens);
                    `aux_metrics_means` gives the mean over the blocks that reported each
    condition       (batch, features) conditioning vector of adaLN blocks (DiT: timestep
                    and class embeddings summed), see `Block.modulation`

Per-layer patterns: `Encoder(layers=...)` gives some layers another block, e.g.
`every(3, global_block)` (ViTDet: global attention every third block, the default
block elsewhere) or `last(2, moe_block, depth)` (experts in the last two blocks).
With `scan_layers`, the encoder scans the repeating unit of the pattern.

The stem's parameters live in its parent's scope (`share`), so a ViT built from
parts keeps big_vision's flat names (`embedding`, `cls`, `pos_embedding`, ...).
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import flexi
from vitjax.models import posemb as posemb_lib
from vitjax.models.layers import DropPath, LayerScale, MAPHead
from vitjax.models.partitioning import constrain, logical

Dtype = Any
Factory = Callable[..., nn.Module]
AUX_LOSS = "aux_loss"
AUX_METRICS = "aux_metrics"
CONDITION = "condition"

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


def share(parent, module):
  """`module` with its parameters in `parent`'s scope (no name level of its own)."""
  nn.share_scope(parent, module)
  return module


def add_aux_losses(token_state, losses):
  """`token_state` with `losses` ({name: scalar}) added to those the blocks reported so far."""
  total = dict(token_state.get(AUX_LOSS, {}))
  for name, value in losses.items():
    total[name] = total[name] + value if name in total else value
  return {**token_state, AUX_LOSS: total}


def add_aux_metrics(token_state, metrics):
  """`token_state` with `metrics` ({name: scalar}) added: (sum, count) per name, for the mean."""
  total = dict(token_state.get(AUX_METRICS, {}))
  for name, value in metrics.items():
    value = jnp.asarray(value, jnp.float32)
    if name in total:
      total[name] = (total[name][0] + value, total[name][1] + 1.0)
    else:
      total[name] = (value, jnp.ones((), jnp.float32))
  return {**token_state, AUX_METRICS: total}


def aux_metrics_means(token_state):
  """{name: mean over the blocks that reported it} of the token state's aux metrics."""
  return {name: total / count for name, (total, count) in token_state.get(AUX_METRICS, {}).items()}


def _mix(mixer, y, token_state, deterministic):
  """Runs a mixer: (its tokens, `token_state` with any auxiliary losses added, its report)."""
  result = mixer(y, deterministic=deterministic, token_state=token_state)
  report = {}
  if isinstance(result, tuple):
    result, losses, *rest = result
    token_state = add_aux_losses(token_state, losses)
    report = dict(rest[0]) if rest else {}
    if AUX_METRICS in report:
      token_state = add_aux_metrics(token_state, report.pop(AUX_METRICS))
  return result, token_state, report


class AdaLNModulation(nn.Module):
  """A conditioning vector -> `num_chunks` per-channel (batch, 1, width) vectors: SiLU, Dense.

  The Dense (`Dense_0`) starts at zero (DiT's adaLN-Zero): shifts and scales of 0 and
  gates of 0, so every modulated block starts as the identity.
  """
  width: int
  num_chunks: int = 6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, condition):
    y = nn.Dense(self.num_chunks * self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(nn.initializers.zeros, None, "mlp"),
                 bias_init=logical(nn.initializers.zeros, "mlp"))(nn.silu(condition))
    return [chunk[:, None] for chunk in jnp.split(y, self.num_chunks, axis=-1)]


def modulate(x, shift, scale):
  """adaLN: x * (1 + scale) + shift, per channel."""
  return x * (1 + scale) + shift


class Block(nn.Module):
  """Pre-norm residual block: token mixer, then channel mixer, each on its own norm.

  `parallel` applies both mixers to one norm of the same input and adds both
  (ViT-22B); `layer_scale_init` scales each branch by a learned per-channel
  vector (CaiT, DINOv2). The norms are named `LayerNorm_0` / `LayerNorm_1` whatever
  their kind, the names of big_vision's block, so checkpoints load unchanged.
  `token_reducer` (merging, pruning) runs after the token mixer's residual, or at
  the end of a parallel block, and changes the number of tokens.
  `modulation` (adaLN, DiT): a factory of a module (`AdaLNModulation`) mapping the token
  state's `condition` to the shift, scale and gate of each branch:
  x = x + gate * mixer(norm(x) * (1 + scale) + shift), named `adaLN_modulation`.
  `__call__(x, token_state, deterministic, drop_path)` -> `(x, token_state)`.
  """
  token_mixer: Factory
  channel_mixer: Factory
  norm: Factory
  parallel: bool = False
  token_reducer: Optional[Callable] = None
  modulation: Optional[Factory] = None
  layer_scale_init: Optional[float] = None
  dropout: float = 0.0
  drop_path: float = 0.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, token_state=None, deterministic=True, drop_path=None):
    token_state = dict(token_state or {})
    # `drop_path` overrides the field: under nn.scan each layer's rate comes in as an array.
    drop_path = self.drop_path if drop_path is None else drop_path

    def residual(branch, index):
      branch = nn.Dropout(rate=self.dropout)(branch, deterministic)
      if self.layer_scale_init is not None:
        branch = LayerScale(self.layer_scale_init, self.param_dtype,
                            name=f"LayerScale_{index}")(branch)
      return DropPath(drop_path)(branch, deterministic)

    token_mixer, channel_mixer = self.token_mixer(), self.channel_mixer()
    if self.modulation is not None:
      return self._modulated(x, token_state, deterministic, token_mixer, channel_mixer,
                             residual)
    if self.parallel:
      y = self.norm(name="LayerNorm_0")(x)
      mixed, token_state, report = _mix(token_mixer, y, token_state, deterministic)
      channels, token_state, _ = _mix(channel_mixer, y, token_state, deterministic)
      x = x + residual(mixed, 0) + residual(channels, 1)
      if self.token_reducer is not None:
        x, token_state = self.token_reducer(x, token_state, report)
    else:
      mixed, token_state, report = _mix(token_mixer, self.norm(name="LayerNorm_0")(x),
                                        token_state, deterministic)
      x = x + residual(mixed, 0)
      if self.token_reducer is not None:
        x, token_state = self.token_reducer(x, token_state, report)
      channels, token_state, _ = _mix(channel_mixer, self.norm(name="LayerNorm_1")(x),
                                      token_state, deterministic)
      x = x + residual(channels, 1)
    return constrain(x, "act_batch", "act_length", "act_embed"), token_state

  def _modulated(self, x, token_state, deterministic, token_mixer, channel_mixer, residual):
    """The adaLN block: each branch's norm shifted and scaled, its output gated."""
    if self.parallel or self.token_reducer is not None:
      raise ValueError("An adaLN block (modulation=...) is sequential and keeps its tokens: "
                       "use parallel=False and no token_reducer.")
    if CONDITION not in token_state:
      raise ValueError(f"An adaLN block (modulation=...) needs token_state[{CONDITION!r}], "
                       "the (batch, features) conditioning vector.")
    shift_0, scale_0, gate_0, shift_1, scale_1, gate_1 = self.modulation(
        name="adaLN_modulation")(token_state[CONDITION])
    y = modulate(self.norm(name="LayerNorm_0")(x), shift_0, scale_0)
    mixed, token_state, _ = _mix(token_mixer, y, token_state, deterministic)
    x = x + residual(gate_0 * mixed, 0)
    y = modulate(self.norm(name="LayerNorm_1")(x), shift_1, scale_1)
    channels, token_state, _ = _mix(channel_mixer, y, token_state, deterministic)
    x = x + residual(gate_1 * channels, 1)
    return constrain(x, "act_batch", "act_length", "act_embed"), token_state


def every(n, factory):
  """A layer pattern: `factory` in every n-th layer (the n-th, 2n-th, ...), the default elsewhere."""
  if n < 1:
    raise ValueError(f"every(n={n}): n must be at least 1.")
  return (None,) * (n - 1) + (factory,)


def last(k, factory, depth):
  """A layer pattern: `factory` in the last `k` of `depth` layers, the default elsewhere."""
  if not 0 <= k <= depth:
    raise ValueError(f"last(k={k}, depth={depth}): k must be in [0, depth].")
  return (None,) * (depth - k) + (factory,) * k


def layer_factories(block, layers, depth):
  """One block factory per layer: `layers` (None entries: `block`) repeated over `depth`.

  `layers` is a whole stack (`depth` entries) or a repeating unit whose length divides
  `depth`; None means every layer is `block`.
  """
  if layers is None:
    return (block,) * depth
  layers = tuple(block if factory is None else factory for factory in layers)
  if not layers or depth % len(layers):
    raise ValueError(f"A layer pattern of {len(layers)} entries does not tile depth={depth}: "
                     "give one entry per layer or a repeating unit whose length divides the "
                     "depth.")
  return layers * (depth // len(layers))


def scan_segments(factories):
  """How `scan_layers` runs a stack: [(unit, repeats, first layer)].

  The stack's smallest repeating unit when it has one (one segment); otherwise
  each run of consecutive layers with the same block is scanned on its own.
  Factories compare by identity: a pattern repeats the same factory object.
  """
  depth = len(factories)
  period = next(p for p in range(1, depth + 1)
                if depth % p == 0 and all(factories[i] is factories[i % p] for i in range(depth)))
  if period < depth or depth == 1:
    return [(tuple(factories[:period]), depth // period, 0)]
  segments, start = [], 0
  for i in range(1, depth + 1):
    if i == depth or factories[i] is not factories[start]:
      segments.append(((factories[start],), i - start, start))
      start = i
  return segments


def rematted(factory, remat_policy="none", prevent_cse=True):
  """`factory` whose module recomputes its activations in the backward pass (nn.remat).

  `factory` is a module class or a functools.partial of one. `deterministic` (the
  third argument of a block's call) is static: it picks Python branches.
  """
  if remat_policy == "none":
    return factory
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {remat_policy!r}; use one of: "
                     f"{', '.join(['none', *REMAT_POLICIES])}.")
  wrap = lambda cls: nn.remat(cls, policy=REMAT_POLICIES[remat_policy],
                              prevent_cse=prevent_cse, static_argnums=(3,))
  if isinstance(factory, functools.partial):
    return functools.partial(wrap(factory.func), *factory.args, **factory.keywords)
  if isinstance(factory, type) and issubclass(factory, nn.Module):
    return wrap(factory)
  raise TypeError(f"remat_policy={remat_policy!r} needs a block factory that is a module class "
                  f"or a functools.partial of one; got {factory!r}.")


class _Unit(nn.Module):
  """A repeating unit of several blocks: the body of a scan over a layer pattern."""
  blocks: Sequence[Factory]

  @nn.compact
  def __call__(self, x, token_state, deterministic, drop_path=None):
    for j, factory in enumerate(self.blocks):
      rate = None if drop_path is None else drop_path[j]
      x, token_state = factory(name=f"block_{j}")(x, token_state, deterministic, rate)
    return x, token_state


class Encoder(nn.Module):
  """`depth` blocks and a final norm (`encoder_norm`); stochastic depth rises linearly.

  `block` is the default block's factory, `layers` an optional per-layer pattern
  (see `layer_factories`, `every`, `last`). Without scan the blocks are
  `encoderblock_{i}`; with `scan_layers` a uniform stack is one scanned
  `encoderblock` (parameters stacked on a leading 'layers' axis: big_vision's
  scan=True layout), a patterned stack scans its repeating unit (`encoderblock/
  block_{j}`) or, without one, each run of equal blocks (`encoderblock_run{k}`).

  `__call__(x, token_state=None, deterministic=True)` -> `(x, token_state, out)`:
  `out['pre_norm']` is the last block's output and, without scan, `out['blockNN']`
  each block's (stacking them under scan would cost the memory scan saves).
  """
  block: Factory
  depth: int
  layers: Optional[Sequence[Optional[Factory]]] = None
  norm: Optional[Factory] = None  # The final norm; None: none.
  drop_path_rate: float = 0.0
  scan_layers: bool = False
  remat_policy: str = "none"  # 'none', or a name in REMAT_POLICIES.

  @nn.compact
  def __call__(self, x, token_state=None, deterministic=True):
    token_state = dict(token_state or {})
    factories = layer_factories(self.block, self.layers, self.depth)
    # prevent_cse keeps XLA from merging the recomputation back into the forward pass;
    # scan's loop already does that, and the guard would cost speed there.
    remat = lambda f: rematted(f, self.remat_policy, prevent_cse=not self.scan_layers)
    rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
    out = {}
    if self.scan_layers:
      segments = scan_segments(factories)
      for k, (unit, repeats, first) in enumerate(segments):
        name = "encoderblock" if len(segments) == 1 else f"encoderblock_run{k}"
        if len(unit) == 1:
          module = remat(unit[0])(name=name)
        else:
          module = _Unit(tuple(remat(f) for f in unit), name=name)
        unit_rates = None
        if self.drop_path_rate and not deterministic:  # Each layer's rate is scanned in.
          unit_rates = jnp.asarray(rates[first:first + repeats * len(unit)], jnp.float32)
          unit_rates = unit_rates.reshape(repeats, len(unit)) if len(unit) > 1 else unit_rates
        x, token_state = self._scan(module, repeats, x, token_state, deterministic, unit_rates)
    else:
      for i, (factory, rate) in enumerate(zip(factories, rates)):
        x, token_state = remat(factory)(drop_path=rate, name=f"encoderblock_{i}")(
            x, token_state, deterministic, None)
        out[f"block{i:02d}"] = x
    out["pre_norm"] = x
    if self.norm is not None:
      x = self.norm(name="encoder_norm")(x)
    return x, token_state, out

  def _scan(self, module, repeats, x, token_state, deterministic, rates):
    """`repeats` applications of `module`; aux losses and metrics leave the loop as outputs."""
    losses = token_state.pop(AUX_LOSS, {})
    metrics = token_state.pop(AUX_METRICS, {})

    def body(module, carry, rate):
      x, state = module(*carry, deterministic, rate)
      state = dict(state)
      return (x, state), (state.pop(AUX_LOSS, {}), state.pop(AUX_METRICS, {}))

    scanned = nn.scan(body, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=0,
                      length=repeats, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, token_state), (layer_losses, layer_metrics) = scanned(module, (x, token_state), rates)
    token_state = add_aux_losses(token_state, losses)
    token_state = add_aux_losses(token_state, {k: jnp.sum(v) for k, v in layer_losses.items()})
    for name, (total, count) in layer_metrics.items():
      metrics = dict(metrics)
      previous = metrics.get(name, (0.0, 0.0))
      metrics[name] = (previous[0] + jnp.sum(total), previous[1] + jnp.sum(count))
    if metrics:
      token_state[AUX_METRICS] = metrics
    return x, token_state


class PatchEmbedding(nn.Module):
  """(B, H, W, C) images -> (B, H/p, W/p, width) patch embeddings: the conv named `embedding`.

  Shared by the ViT's stem, MAE and SimMIM; call it through `share(parent, ...)` so
  the conv is the parent's `embedding`. The parent checks the images first
  (layers.patch_stem_input: its messages name the model).
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  patch_resize: str = "bilinear"  # How the kernel is PI-resized: flexi.PATCH_RESIZE_METHODS.

  @nn.compact
  def __call__(self, images, patch_size=None):
    """`patch_size` other than the kernel's: the kernel PI-resized to it (FlexiViT)."""
    flexible = patch_size is not None and patch_size != self.patch_size
    return nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                   padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
                   bias_init=logical(nn.initializers.zeros, "embed"),
                   conv_general_dilated=(_pi_resized_conv(patch_size, self.patch_resize)
                                         if flexible else None),
                   name="embedding")(images.astype(self.dtype))


def _pi_resized_conv(patch_size, patch_resize="bilinear"):
  """lax.conv_general_dilated with the kernel PI-resized to `patch_size` and that stride."""
  def conv(inputs, kernel, strides, padding, **kwargs):
    del strides  # The kernel's own patch size; the call's replaces it.
    kernel = flexi.pi_resize_for(kernel, patch_size, patch_resize)
    return jax.lax.conv_general_dilated(inputs, kernel, (patch_size, patch_size), padding,
                                        **kwargs)
  return conv


class PatchStem(nn.Module):
  """Images -> tokens: patch embedding, prefix tokens, position embeddings, registers.

  Token order: [class, distillation, registers, patches], or with
  `class_token_position='last'` (iLLaMA) [patches, class]. Position embeddings
  (learned `pos_embedding`, fixed 'sincos2d', or 'none') cover the prefix tokens
  too unless `class_posemb=False` (timm's no_embed_class: patches only);
  registers get none. Learned ones are resized to another grid with
  `posemb_resize`. `rope` ('axial', 'mixed': 2-D; '1d': the token index) puts the
  tokens' RoPE positions in the token state.

  `__call__(images, patch_size=None, mask=None, keep=None)` -> `(tokens, token_state,
  out)` with `out['stem']` (the patch embeddings, (B, N, width)) and `out['grid']`
  ((grid_h, grid_w)). A `patch_size` other than the module's cuts the images into
  patches of that size with the kernel PI-resized to it (FlexiViT), the position
  embeddings resized to the grid that gives.

  Masked-token objectives: `mask` (B, N) bool replaces the embeddings of the masked
  patches by a learned `mask_token` before the position embeddings are added (BEiT,
  SimMIM, iBOT); `keep` (B, K) int keeps only those patches (row-major indices), with
  their position embeddings, after the prefix tokens (I-JEPA's context encoder).
  Parameters: `embedding`, `cls`, `dist`, `pos_embedding`, `reg`, `embedding_norm`,
  `mask_token` (created by a call with a `mask`).
  """
  patch_size: int
  width: int
  image_size: int  # The grid learned position embeddings are made for.
  class_token: bool = True
  distillation_token: bool = False
  num_registers: int = 0
  posemb: str = "learn"  # 'learn', 'sincos2d' or 'none'.
  posemb_resize: str = "bilinear"
  patch_resize: str = "bilinear"  # How the kernel is PI-resized: flexi.PATCH_RESIZE_METHODS.
  class_posemb: bool = True
  class_token_position: str = "first"  # Or 'last'.
  embedding_norm: Optional[Factory] = None  # A norm over the embedded tokens (CLIP's ln_pre).
  rope: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_prefix_tokens(self):
    return int(self.class_token) + int(self.distillation_token)

  @nn.compact
  def __call__(self, images, patch_size=None, mask=None, keep=None):
    x = share(self, PatchEmbedding(self.patch_size, self.width, self.dtype, self.param_dtype,
                                   self.patch_resize))(images, patch_size)
    batch, grid_h, grid_w, width = x.shape
    x = x.reshape(batch, grid_h * grid_w, width)
    out = {"stem": x, "grid": (grid_h, grid_w)}
    if mask is not None:
      if mask.shape != x.shape[:2]:
        raise ValueError(f"mask has shape {mask.shape}; it needs one entry per patch: "
                         f"{x.shape[:2]} (batch, {grid_h} x {grid_w} patches).")
      mask_token = self.param("mask_token", logical(nn.initializers.zeros, None, None, "embed"),
                              (1, 1, width), self.param_dtype).astype(self.dtype)
      x = jnp.where(mask[..., None], mask_token, x)
    if keep is not None and (self.rope or self.class_token_position == "last"):
      raise ValueError("keep= (a subset of the patches) is for models with position "
                       "embeddings and prefix tokens first; this one has "
                       f"rope={self.rope!r}, class_token_position={self.class_token_position!r}.")
    num_prefix = self.num_prefix_tokens
    token = lambda name, count, init: jnp.tile(self.param(
        name, logical(init, None, None, "embed"), (1, count, width),
        self.param_dtype).astype(self.dtype), [batch, 1, 1])
    prefix = []
    if self.class_token:
      prefix.append(token("cls", 1, nn.initializers.zeros))
    if self.distillation_token:
      prefix.append(token("dist", 1, nn.initializers.zeros))
    posemb = self._position_embedding(grid_h, grid_w, width).astype(self.dtype)
    if self.class_posemb or not prefix:
      x = jnp.concatenate(prefix + [x], axis=1) + posemb
    else:  # Position embeddings of the patches only.
      x = jnp.concatenate(prefix + [x + posemb], axis=1)
    if keep is not None:
      kept = jnp.take_along_axis(x[:, num_prefix:], keep[..., None].astype(jnp.int32), axis=1)
      x = jnp.concatenate([x[:, :num_prefix], kept], axis=1)
    if self.num_registers:
      registers = token("reg", self.num_registers, nn.initializers.normal(stddev=0.02))
      x = jnp.concatenate([x[:, :num_prefix], registers, x[:, num_prefix:]], axis=1)
    token_state = {}
    if self.rope == "1d":
      token_state["positions"] = posemb_lib.sequence_positions(x.shape[1])
    elif self.rope:
      token_state["positions"] = posemb_lib.patch_positions(grid_h, grid_w, num_prefix,
                                                            self.num_registers)
    if self.class_token_position == "last" and num_prefix:
      # The class token moves behind the patches, its position embedding with it.
      x = jnp.roll(x, -num_prefix, axis=1)
      if self.rope and self.rope != "1d":
        token_state["positions"] = tuple(jnp.roll(p, -num_prefix, axis=0)
                                         for p in token_state["positions"])
    if self.embedding_norm is not None:
      x = self.embedding_norm(name="embedding_norm")(x)
    return x, token_state, out

  def _position_embedding(self, grid_h, grid_w, width):
    """(1, rows, width): rows for the prefix tokens (if `class_posemb`) and the patches."""
    num_prefix = self.num_prefix_tokens if self.class_posemb else 0
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


POOL_TYPES = ("token", "gap", "map", "none")


def pool(kind, x, *, first_patch, class_last=False, token_sizes=None, map_head=None):
  """(B, width) features of (B, T, width) encoded tokens.

  'token': the class token (first, or last with `class_last`); 'gap': the mean of
  the patch tokens from `first_patch` on (registers and prefix excluded), weighted
  by `token_sizes` when blocks merged tokens, so it stays the mean over the
  image's patches; 'map': `map_head` (attention pooling) over all tokens; 'none':
  the tokens unchanged.
  """
  if kind == "token":
    return x[:, -1] if class_last else x[:, 0]
  if kind == "gap":
    patches = x[:, :-1] if class_last else x[:, first_patch:]
    if token_sizes is None:
      return jnp.mean(patches, axis=1)
    sizes = (token_sizes[:, :-1] if class_last else token_sizes[:, first_patch:])
    sizes = sizes.astype(patches.dtype)[..., None]
    return jnp.sum(patches * sizes, axis=1) / jnp.sum(sizes, axis=1)
  if kind == "map":
    return map_head(x)
  if kind == "none":
    return x
  raise ValueError(f"Unknown pool_type {kind!r}; use one of: {', '.join(POOL_TYPES)}.")


__all__ = ["AUX_LOSS", "AUX_METRICS", "AdaLNModulation", "Block", "CONDITION", "Encoder",
           "MAPHead", "PatchEmbedding", "PatchStem", "REMAT_POLICIES", "add_aux_losses",
           "add_aux_metrics", "aux_metrics_means", "every", "last", "layer_factories",
           "modulate", "pool", "rematted", "scan_segments", "share"]
