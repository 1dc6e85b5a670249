"""Mixtures of experts: V-MoE's sparse routing and Soft MoE, as channel mixers, and their ViTs.

Two channel mixers (parts: any block can take one through `channel_mixer=`):

* `SparseMoE`, V-MoE ("Scaling Vision with Sparse Mixture of Experts", Riquelme et al.
  2021). Each token goes to its top-k of E expert MLPs by a linear router,
  g(x) = top_k(softmax(W x + eps)) with eps ~ N(0, noise_std^2) while training. The
  tokens are routed in groups (`group_size` images); expert e takes at most
  C = round(k * tokens_per_group * capacity_factor / E) of a group's tokens, and
  assignments over capacity are dropped: that choice adds nothing, the token
  passes on through the residual. Capacity is handed out choice by choice (every
  token's first expert before any token's second), in token order, or with
  batch-prioritised routing (BPR) by decreasing top routing weight. The output is
  sum_j g_j(x) E_j(x), the weights left as the softmax gave them. Auxiliary losses
  (reported as `moe_importance` and `moe_load`, already scaled by their weights,
  summed over the MoE blocks): importance = CV(sum_x g(x))^2 and load =
  CV(sum_x P(expert chosen | new noise))^2, per group, averaged over groups.
* `SoftMoE` ("From Sparse to Soft Mixtures of Experts", Puigcerver et al. 2024).
  Per image, logits = norm(X) (scale * norm(Phi)) over the m tokens and the n * p
  slots (n experts, p slots each); dispatch weights are a softmax over the tokens
  (each slot is a convex combination of tokens), combine weights a softmax over
  the slots (each output token a convex combination of slot outputs). Expert i
  runs on its p slots. No token is dropped and there is no auxiliary loss.

Both hold the experts as one `Experts` module: MLP weights stacked on a leading
axis with the logical name `expert` (`Dense_0/kernel`: (E, width, mlp_dim)), which
the sharding rules split over the `expert` mesh axis. Tokens are laid out by group
(batch) on the data-like axes, then resharded so that the expert dimension lies on
`expert` (`act_group`, `act_expert`): XLA moves the tokens to their experts
(all-to-all) and back, and each device keeps 1/E of the experts and of their
optimizer state. The dispatch and combine of the sparse layer are gathers of token
indices, not one-hot matrix products, so they cost no multiply-adds.

Each MoE layer also reports metrics through the token state (`aux_metrics`, the
mean over MoE blocks): `moe_dropped` (the fraction of token-expert assignments
dropped for capacity) and `moe_max_load` (the busiest expert's share of the
assignments, 1/E when balanced).

The family `MoeVisionTransformer` is a ViT whose MLPs in `moe_layers` ('every2':
blocks 1, 3, 5, ...; 'last2'; 'last_half'; or block indices) are MoE layers; `vmoe` and
`soft_moe` are its registry families, and the papers' sizes are registered by name.
"""

import dataclasses
import functools
import math
import re
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import parts
from vitjax.models import vit
from vitjax.models.layers import mlp_activation
from vitjax.models.partitioning import constrain, logical

Dtype = Any
MOE_TYPES = ("sparse", "soft")
AUX_METRICS = parts.AUX_METRICS


class _ExpertDense(nn.Module):
  """One dense layer per expert: (E, groups, slots, in) -> (E, groups, slots, features)."""
  features: int
  axes: tuple  # Logical names of the kernel's (in, out) axes.
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    num_experts = x.shape[0]
    # MlpBlock's initialisation, with the fans of one expert, not of the stack.
    kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", batch_axis=(0,))
    kernel = self.param("kernel", logical(kernel_init, "expert", *self.axes),
                        (num_experts, x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum("egcd,edf->egcf", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.normal(stddev=1e-6), "expert",
                                        self.axes[1]),
                        (num_experts, self.features), self.param_dtype)
      y = y + bias[:, None, None, :].astype(self.dtype)
    return y


class _ExpertOptions(nn.Module):
  """The options of E transformer MLPs, shared by `Experts` and the MoE layers that hold them."""
  num_experts: int
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = False
  activation: str = "gelu"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def run_experts(self, inputs, deterministic):
    """`Experts_0` on (groups, E, slots, width) inputs, laid out with E on the expert axis.

    The constraints make XLA move each group's slots to the devices of their experts
    (an all-to-all over the `expert` mesh axis) and the outputs back.
    """
    options = {f.name: getattr(self, f.name) for f in dataclasses.fields(_ExpertOptions)
               if f.name not in ("parent", "name")}
    # Expert-major: each expert's matmul has its batch dimension first, the layout the
    # compilers' batched matmuls take without transposing (3.3x faster on XLA:CPU).
    inputs = constrain(jnp.swapaxes(inputs, 0, 1), "act_expert", "act_group", None, "act_embed")
    outputs = Experts(**options, name="Experts_0")(inputs, deterministic)
    outputs = constrain(outputs, "act_expert", "act_group", None, "act_embed")
    return jnp.swapaxes(outputs, 0, 1)


class Experts(_ExpertOptions):
  """E transformer MLPs (Dense_0 -> GELU -> dropout -> Dense_1), their weights stacked.

  `__call__(x)`, x of shape (E, groups, slots, width): expert e runs on x[e].
  Parameters: MlpBlock's with a leading expert axis, `Dense_0/kernel` (E, width,
  mlp_dim), `Dense_0/bias` (E, mlp_dim), `Dense_1/kernel` (E, mlp_dim, width),
  `Dense_1/bias` (E, width).
  """

  @nn.compact
  def __call__(self, x, deterministic=True):
    if x.shape[0] != self.num_experts:
      raise ValueError(f"Experts got inputs for {x.shape[0]} experts; it has "
                       f"{self.num_experts}.")
    dense = functools.partial(_ExpertDense, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = dense(self.mlp_dim, ("embed", "mlp"), name="Dense_0")(x)
    x = mlp_activation(self.activation, self.gelu_approximate)(x)
    x = constrain(x, "act_expert", "act_group", None, "act_mlp")
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return dense(width, ("mlp", "embed"), name="Dense_1")(x)


def expert_capacity(tokens_per_group, num_experts, top_k, capacity_factor):
  """Slots per expert and group: ceil(k * tokens * capacity_factor / E), at least 1.

  V-MoE's C_e = round(k N C / E); its code takes the ceiling (and pads to a multiple of 4
  for TPUs, which vitjax does not need).
  """
  return max(1, math.ceil(top_k * tokens_per_group * capacity_factor / num_experts - 1e-9))


def top_k_routing(gates, top_k, capacity, batch_priority=False):
  """Token-choice top-k routing with expert capacity, per group.

  `gates` (groups, tokens, E): the router's softmax. Returns `(experts, weights,
  position, kept)`, each (groups, tokens, k): the chosen experts (best first),
  their gate values, the token's slot in that expert's buffer and whether it got
  one (position < capacity). Slots are handed out choice by choice: every token's
  first choice before any token's second; within a choice in token order, or,
  with `batch_priority` (BPR), by decreasing top gate value (ties in token order).
  """
  groups, tokens, num_experts = gates.shape
  weights, experts = jax.lax.top_k(gates, top_k)
  if batch_priority:
    order = jnp.argsort(-weights[..., 0], axis=-1, stable=True)
  else:
    order = jnp.broadcast_to(jnp.arange(tokens), (groups, tokens))
  ordered = jnp.take_along_axis(experts, order[..., None], axis=1)
  choice_major = jnp.swapaxes(ordered, 1, 2).reshape(groups, top_k * tokens)
  one_hot = jax.nn.one_hot(choice_major, num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)
  position = jnp.swapaxes(position.reshape(groups, top_k, tokens), 1, 2)
  inverse = jnp.argsort(order, axis=-1)  # Back from priority order to token order.
  position = jnp.take_along_axis(position, inverse[..., None], axis=1)
  return experts, weights, position, position < capacity


def dispatch_table(experts, position, kept, num_experts, capacity):
  """(groups, E, capacity): the token in each expert slot; `tokens` (a row of zeros) if none."""
  groups, tokens, top_k = experts.shape
  slot = jnp.where(kept, experts * capacity + position, num_experts * capacity)
  token = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], (tokens, top_k))
  table = jnp.full((groups, num_experts * capacity), tokens, jnp.int32)
  # Kept assignments have distinct slots; the dropped ones point past the end and vanish.
  table = jax.vmap(lambda t, s: t.at[s.ravel()].set(token.ravel(), mode="drop"))(table, slot)
  return table.reshape(groups, num_experts, capacity)


def _cv_squared(values):
  """Squared coefficient of variation over the last axis: var / mean^2."""
  mean = jnp.mean(values, axis=-1)
  return jnp.var(values, axis=-1) / (jnp.square(mean) + 1e-10)


def importance_loss(gates):
  """V-MoE's importance loss: CV^2 over experts of the summed gates, mean over groups."""
  return jnp.mean(_cv_squared(jnp.sum(gates, axis=1)))


def load_loss(logits, noisy_logits, noise_std, top_k):
  """V-MoE's load loss (after Shazeer et al. 2017), mean over groups.

  With the threshold t(x) the k-th largest noisy logit, the probability that
  expert i is still chosen when the noise is drawn again is
  p_i(x) = 1 - Phi((t(x) - logit_i(x)) / noise_std); load_i = sum_x p_i(x);
  the loss is CV^2 of the loads.
  """
  threshold = jax.lax.top_k(noisy_logits, top_k)[0][..., -1:]
  probability = jax.scipy.stats.norm.cdf((logits - threshold) / noise_std)
  return jnp.mean(_cv_squared(jnp.sum(probability, axis=1)))


class SparseMoE(_ExpertOptions):
  """V-MoE's MoE layer: noisy top-k routing with expert capacity (see the module docstring).

  `__call__(x, deterministic, token_state)` -> `(y, losses, report)`: `losses` are
  `moe_importance` and `moe_load` (times their weights; no load loss when
  `noise_std` is 0), `report['aux_metrics']` the layer's `moe_dropped` and
  `moe_max_load`. Parameters: `router/kernel` (width, E), and `Experts`' stacked MLPs.
  """
  num_experts: int
  mlp_dim: int
  top_k: int = 2
  capacity_factor: float = 1.05
  eval_capacity_factor: Optional[float] = None  # None: `capacity_factor`.
  group_size: int = 8  # Images per routing group (the largest divisor of the batch up to it).
  noise_std: Optional[float] = None  # None: 1 / num_experts (V-MoE).
  batch_priority: bool = False
  importance_loss_weight: float = 0.005
  load_loss_weight: float = 0.005

  @nn.compact
  def __call__(self, x, deterministic=True, token_state=None):
    del token_state  # Routing is per token.
    batch, length, width = x.shape
    images = math.gcd(batch, self.group_size)
    groups, tokens = batch // images, images * length
    x = constrain(x.reshape(groups, tokens, width), "act_batch", None, "act_embed")
    # The router in float32, as V-MoE's: small logit differences decide the experts.
    logits = nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32,
                      param_dtype=self.param_dtype, name="router",
                      kernel_init=logical(nn.initializers.lecun_normal(), "embed", None))(
                          x.astype(jnp.float32))
    noise_std = 1.0 / self.num_experts if self.noise_std is None else self.noise_std
    noisy_logits = logits
    if not deterministic and noise_std > 0:
      noisy_logits = logits + noise_std * jax.random.normal(self.make_rng("dropout"),
                                                            logits.shape)
    gates = jax.nn.softmax(noisy_logits, axis=-1)
    factor = (self.capacity_factor if not deterministic or self.eval_capacity_factor is None
              else self.eval_capacity_factor)
    capacity = expert_capacity(tokens, self.num_experts, self.top_k, factor)
    experts, weights, position, kept = top_k_routing(gates, self.top_k, capacity,
                                                     self.batch_priority)

    # Dispatch: each expert slot gathers its token (zeros where the slot is empty).
    table = dispatch_table(experts, position, kept, self.num_experts, capacity)
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    inputs = jax.vmap(lambda rows, index: rows[index])(padded, table)
    outputs = constrain(self.run_experts(inputs, deterministic),
                        "act_batch", None, None, "act_embed")
    # Combine: each token sums its kept choices' outputs, weighted by their gates.
    flat = outputs.reshape(groups, self.num_experts * capacity, width)
    slot = experts * capacity + jnp.minimum(position, capacity - 1)
    chosen = jax.vmap(lambda rows, index: rows[index])(flat, slot)
    combine = jnp.where(kept, weights, 0.0).astype(chosen.dtype)
    y = jnp.einsum("gtkd,gtk->gtd", chosen, combine)
    y = constrain(y, "act_batch", None, "act_embed").reshape(batch, length, width)

    losses = {"moe_importance": self.importance_loss_weight *
                                importance_loss(jax.nn.softmax(logits, axis=-1))}
    if noise_std > 0:
      losses["moe_load"] = self.load_loss_weight * load_loss(logits, noisy_logits, noise_std,
                                                             self.top_k)
    assigned = jnp.sum(jax.nn.one_hot(experts, self.num_experts), axis=(1, 2))  # (groups, E)
    metrics = {"moe_dropped": 1.0 - jnp.mean(kept.astype(jnp.float32)),
               "moe_max_load": jnp.mean(jnp.max(assigned, axis=-1) / (tokens * self.top_k))}
    return y.astype(self.dtype), losses, {AUX_METRICS: metrics}


def l2_normalize(x, axis, epsilon=1e-6):
  """x / sqrt(sum x^2 + epsilon) along `axis` (Soft MoE's normalisation)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + epsilon)


class SoftMoE(_ExpertOptions):
  """Soft MoE (Puigcerver et al. 2024): experts on slots that are soft mixtures of the tokens.

  Per image: logits = norm(X) . (scale * norm(Phi)), (tokens, E * p); dispatch =
  softmax over the tokens, combine = softmax over the E * p slots; slots = dispatch^T X,
  slot j goes to expert j // p; y = combine . expert outputs. `normalize=False` uses X
  and Phi as they are (the paper's normalisation keeps the logits in range as the
  width grows). Parameters: `phi` (width, E * p), `scale` (), and `Experts`' MLPs.
  """
  slots_per_expert: int = 1
  normalize: bool = True

  @nn.compact
  def __call__(self, x, deterministic=True, token_state=None):
    del token_state
    batch, _, width = x.shape
    slots = self.num_experts * self.slots_per_expert
    phi = self.param("phi", logical(nn.initializers.lecun_normal(), "embed", None),
                     (width, slots), self.param_dtype)
    keys, phi = x.astype(jnp.float32), phi.astype(jnp.float32)
    if self.normalize:
      scale = self.param("scale", nn.initializers.ones, (), self.param_dtype)
      keys, phi = l2_normalize(keys, -1), scale.astype(jnp.float32) * l2_normalize(phi, 0)
    logits = jnp.einsum("btd,ds->bts", keys, phi)
    dispatch = jax.nn.softmax(logits, axis=1).astype(self.dtype)
    combine = jax.nn.softmax(logits, axis=2).astype(self.dtype)
    inputs = jnp.einsum("bts,btd->bsd", dispatch, x.astype(self.dtype))
    inputs = inputs.reshape(batch, self.num_experts, self.slots_per_expert, width)
    outputs = self.run_experts(inputs, deterministic).reshape(batch, slots, width)
    outputs = constrain(outputs, "act_batch", None, "act_embed")
    return jnp.einsum("bts,bsd->btd", combine, outputs)


def moe_layer_indices(spec, depth):
  """Block indices of a `moe_layers` spec: 'everyN' (blocks N-1, 2N-1, ...: V-MoE's
  every-2 is blocks 1, 3, 5, ...), 'lastN' (the last N blocks), 'last_half' (Soft MoE's
  layout), or the indices themselves."""
  if isinstance(spec, str) and spec.strip().lower() in ("last_half", "lasthalf"):
    return tuple(range(depth - depth // 2, depth))
  if isinstance(spec, str):
    match = re.fullmatch(r"(every|last)[_-]?(\d+)", spec.strip().lower())
    if not match:
      raise ValueError(f"Unknown moe_layers {spec!r}: use 'every2' (blocks 1, 3, 5, ...), "
                       "'last2' (the last two blocks), 'last_half' or a tuple of block "
                       "indices.")
    n = int(match.group(2))
    if n < 1 or (match.group(1) == "last" and n > depth):
      raise ValueError(f"moe_layers={spec!r} for depth {depth}: N must be in [1, {depth}].")
    if match.group(1) == "every":
      return tuple(range(n - 1, depth, n))
    return tuple(range(depth - n, depth))
  indices = tuple(spec)
  if (not indices or any(not isinstance(i, (int, np.integer)) or isinstance(i, bool)
                         for i in indices)
      or any(not 0 <= i < depth for i in indices) or len(set(indices)) != len(indices)):
    raise ValueError(f"moe_layers={spec!r}: give distinct block indices in [0, {depth - 1}], "
                     "or 'everyN' / 'lastN'.")
  return tuple(sorted(int(i) for i in indices))


class MoeVisionTransformer(vit.VisionTransformer):
  """A ViT whose MLPs in `moe_layers` are mixtures of experts: V-MoE or Soft MoE.

  Every ViT option applies (pooling, registers, scan_layers, token merging, ...);
  the MoE options below build the channel mixer of the MoE blocks, named
  `MoeBlock_0` (`Transformer/encoderblock_1/MoeBlock_0/Experts_0/Dense_0/kernel`).
  `out['aux_loss']` holds the sparse layers' losses, `out['aux_metrics']` their
  `moe_dropped` / `moe_max_load` (means over the MoE blocks).
  """
  moe_type: str = "sparse"  # 'sparse' (V-MoE) or 'soft' (Soft MoE).
  num_experts: int = 8
  moe_layers: Union[str, Sequence[int]] = "every2"
  # Sparse (V-MoE) routing; see SparseMoE.
  top_k: int = 2
  capacity_factor: float = 1.05
  eval_capacity_factor: Optional[float] = None
  group_size: int = 8
  noise_std: Optional[float] = None
  batch_priority: bool = False
  importance_loss_weight: float = 0.005
  load_loss_weight: float = 0.005
  # Soft MoE.
  slots_per_expert: int = 1

  def __post_init__(self):
    if not isinstance(self.moe_layers, str):  # Hashable: jit takes the model as static.
      object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
    super().__post_init__()

  def _check(self):
    super()._check()
    if self.moe_type not in MOE_TYPES:
      raise ValueError(f"Unknown moe_type {self.moe_type!r}; use one of: "
                       f"{', '.join(map(repr, MOE_TYPES))}.")
    positive = {"num_experts": self.num_experts, "group_size": self.group_size,
                "slots_per_expert": self.slots_per_expert}
    for name, value in positive.items():
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer.")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"top_k={self.top_k!r}: each token picks 1 to num_experts="
                       f"{self.num_experts} experts.")
    for name in ("capacity_factor", "eval_capacity_factor"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"{name}={value!r}: must be > 0 (1.0: room for an even split of "
                         "the tokens; V-MoE trains at 1.05).")
    for name in ("noise_std", "importance_loss_weight", "load_loss_weight"):
      value = getattr(self, name)
      if value is not None and not value >= 0:
        raise ValueError(f"{name}={value!r}: must be >= 0.")
    moe_layer_indices(self.moe_layers, self.depth)

  def moe_mixer(self):
    """The channel mixer of the MoE blocks, from the MoE options and the MLP's."""
    common = dict(num_experts=self.num_experts, mlp_dim=self.mlp_dim, dropout=self.dropout,
                  gelu_approximate=self.gelu_approximate, activation=self.activation,
                  use_bias=self.use_bias if self.mlp_use_bias is None else self.mlp_use_bias,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="MoeBlock_0")
    if self.moe_type == "soft":
      return functools.partial(SoftMoE, slots_per_expert=self.slots_per_expert, **common)
    return functools.partial(
        SparseMoE, top_k=self.top_k, capacity_factor=self.capacity_factor,
        eval_capacity_factor=self.eval_capacity_factor, group_size=self.group_size,
        noise_std=self.noise_std, batch_priority=self.batch_priority,
        importance_loss_weight=self.importance_loss_weight,
        load_loss_weight=self.load_loss_weight, **common)

  def layer_pattern(self):
    """The ViT's pattern with the MoE block in `moe_layers` (replacing what `layers` put there)."""
    self._check()
    default, layers = super().layer_pattern()
    factories = list(parts.layer_factories(default, layers, self.depth))
    moe_block = functools.partial(self.block or parts.Block,
                                  **{**self.block_options(), "channel_mixer": self.moe_mixer()})
    for index in moe_layer_indices(self.moe_layers, self.depth):
      factories[index] = moe_block
    return default, tuple(factories)

  def parameter_counts(self, params):
    """{'total', 'active'}: all parameters, and those one token's forward pass uses.

    Sparse: each MoE layer counts its router and k of its E experts. Soft: all of them
    (each token's output mixes every expert's slots); its saving is in the
    multiply-adds (`vitjax.tools.model_table`), not in the parameters touched.
    """
    total = active = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      names = [str(getattr(k, "key", k)) for k in path]
      size = int(np.prod(leaf.shape))
      total += size
      if self.moe_type == "sparse" and "Experts_0" in names:
        size = size * self.top_k // self.num_experts
      active += size
    return {"total": total, "active": active}


def dense_counterpart(model):
  """The plain ViT `model` is built on: the same options, MLPs where it has experts."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(vit.VisionTransformer)
            if f.name not in ("parent", "name")}
  return vit.VisionTransformer(**fields)


# V-MoE's backbones (Riquelme et al. 2021, Table 7 / vmoe configs): its S is 8 blocks of
# width 512 (not the 12-block ViT-S of DeiT); B, L, H as ViT's.
VMOE_SIZES = {**vit.SIZES, "S": (512, 8, 2048, 8)}


def decode_vmoe_variant(variant):
  """'S/32' -> V-MoE's S (width 512, 8 blocks) at patch 32; other sizes as ViT's."""
  config = vit.decode_variant(variant)
  size = variant.partition("/")[0]
  config.update(zip(("width", "depth", "mlp_dim", "num_heads"), VMOE_SIZES[size]))
  return config


VMOE_PAPER = "Scaling Vision with Sparse Mixture of Experts (Riquelme et al., 2021)"
SOFT_MOE_PAPER = "From Sparse to Soft Mixtures of Experts (Puigcerver et al., 2024)"


def register_models(register, register_family, mean, std):
  """The V-MoE and Soft MoE families and the papers' models by name.

  V-MoE (ImageNet head, class token; the paper's tables count a JFT head of 18,291
  classes and a pre-logits layer): S/32 and B/16 with 8 experts in every other
  block (1, 3, 5, ...) or in the last two odd blocks, k=2, capacity 1.05.
  Soft MoE (GAP, 128 experts of one slot in the last half of the blocks): S/16, B/16.
  """
  register_family("vmoe", MoeVisionTransformer, decode_vmoe_variant, VMOE_SIZES,
                  moe_type="sparse")
  register_family("soft_moe", MoeVisionTransformer, vit.decode_variant, vit.SIZES,
                  moe_type="soft", num_experts=128, moe_layers="last_half", pool_type="gap")
  for size_name, variant in (("small", "S/32"), ("base", "B/16")):
    config = decode_vmoe_variant(variant)
    depth = config["depth"]
    patch = config["patch_size"]
    for pattern, layers in (("every2", "every2"), ("last2", (depth - 3, depth - 1))):
      register(f"vmoe_{size_name}_patch{patch}_224_e8_{pattern}", MoeVisionTransformer,
               mean=mean, std=std, paper=VMOE_PAPER, image_size=224, moe_type="sparse",
               num_experts=8, moe_layers=layers, top_k=2, **config)
  for size_name, variant in (("small", "S/16"), ("base", "B/16")):
    config = vit.decode_variant(variant)
    register(f"soft_moe_{size_name}_patch16_224_e128", MoeVisionTransformer, mean=mean,
             std=std, paper=SOFT_MOE_PAPER, image_size=224, moe_type="soft", num_experts=128,
             slots_per_expert=1, moe_layers="last_half", pool_type="gap",
             **config)


__all__ = ["Experts", "MoeVisionTransformer", "SoftMoE", "SparseMoE", "dense_counterpart",
           "dispatch_table",
           "expert_capacity", "importance_loss", "l2_normalize", "load_loss",
           "moe_layer_indices", "top_k_routing"]
