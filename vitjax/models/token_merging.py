"""Fewer tokens per block: token merging (ToMe) and pruning (EViT, top-k by norm).

One switch on every ViT-family model (ViT, DeiT, registers, DINOv2, MAE's encoder,
CLIP / SigLIP image towers), at inference on loaded weights and in training:

    create_model('vit_base_patch16_224', token_merging=dict(r=13))
    create_model('vit', variant='S/16', token_merging=dict(r=16, schedule='decreasing'))
    create_model('deit_small_patch16_224', token_merging=dict(method='evit', keep_rate=0.7))
    --config.model.token_merging.r=8                                    (the trainer)

Keys of `token_merging` (a dict, or an int: the r of ToMe):

    method      'tome' (default): bipartite soft matching, merged tokens averaged by size.
                'evit': EViT's attentive top-k: keep the tokens the class token attends
                to most, fuse the rest into one token (weighted by that attention). On
                a model without a class token (GAP), the score is the attention a token
                receives, averaged over all queries (this costs the attention matrix).
                'topk': keep the tokens of the largest L2 norm, drop the rest (a baseline).
    r           tokens taken out per block: an int (spread by `schedule`) or one int per
                block. 'evit' fuses the r it takes out into one more token.
    schedule    'constant' (r in every block), 'decreasing' (2r falling linearly to 0:
                ToMe's best trade-off at equal mean r) or 'increasing' (0 to 2r).
    keep_rate   pruning only, instead of r: the share of tokens kept at each pruning
                block (EViT's 0.7).
    layers      block indices that reduce (default: every block; 'evit' with keep_rate:
                EViT's, after 1/4, 1/2 and 3/4 of the depth: blocks 3, 6, 9 of 12).
    proportional_attention   log(token size) added to the attention logits of each key,
                so a merged token counts as the tokens it stands for (ToMe: default on
                for 'tome', off for the pruning methods).

The prefix tokens (class, distillation, registers) are never merged or pruned. The
reduction happens in each block between the attention and the MLP, on the tokens
after the attention's residual, as in ToMe and EViT; ToMe's similarity is the cosine
of the attention keys (mean over heads), EViT's score the class token's attention
(mean over heads). Token counts are static (r is fixed per block), so every
reduction runs under `jit`; the models refuse `scan_layers` (a scan needs the same
token count in every block), RoPE, causal attention and packed sequences.

The token state carries `token_sizes` (B, T): how many input tokens each token
stands for (they always sum to the input length, except for 'topk', which drops
tokens), and `token_index` (B, T0): for each input token, the token it went into
(-1: dropped). `unmerge` puts every input token back from them: the models return
`out['tokens']` unmerged (one per patch, in patch order), so dense features, MAE's
decoder and SimMIM's pixel head work as without merging.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

METHODS = ("tome", "evit", "topk")
SCHEDULES = ("constant", "decreasing", "increasing")
KEYS = ("method", "r", "schedule", "keep_rate", "layers", "proportional_attention")
# What each method needs the block's attention to report (MultiHeadDotProductAttention.report).
# EViT on a model without a class token (GAP) ranks by the attention each token receives,
# averaged over the queries, in place of the class token's row.
REPORTS = {"tome": ("keys",), "evit": ("class_attention",), "topk": ()}
GAP_REPORTS = {**REPORTS, "evit": ("received_attention",)}


@dataclasses.dataclass(frozen=True)
class TokenMerging:
  """A parsed, checked `token_merging` switch (see the module docstring)."""
  method: str = "tome"
  r: Union[int, Tuple[int, ...]] = 0
  schedule: str = "constant"
  keep_rate: Optional[float] = None
  layers: Optional[Tuple[int, ...]] = None
  proportional_attention: Optional[bool] = None

  @property
  def proportional(self):
    if self.proportional_attention is None:
      return self.method == "tome"
    return bool(self.proportional_attention)

  def per_layer(self, depth):
    """One entry per block: tokens to take out (int), a keep rate (float) or 0 (none)."""
    if self.keep_rate is not None:
      layers = self.layers if self.layers is not None else evit_layers(depth)
      return tuple(self.keep_rate if i in layers else 0 for i in range(depth))
    if isinstance(self.r, tuple):
      if len(self.r) != depth:
        raise ValueError(f"token_merging r={self.r!r} gives {len(self.r)} values for "
                         f"{depth} blocks: give one per block, or one int.")
      amounts = self.r
    else:
      amounts = schedule_r(self.r, depth, self.schedule)
    if self.layers is not None:
      amounts = tuple(a if i in self.layers else 0 for i, a in enumerate(amounts))
    return amounts


def evit_layers(depth):
  """EViT's pruning blocks: after 1/4, 1/2 and 3/4 of the depth (3, 6, 9 of 12)."""
  return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4} - {0}))


def schedule_r(r, depth, schedule="constant"):
  """Per-block r: constant, or linear from 2r to 0 ('decreasing') or 0 to 2r ('increasing').

  ToMe's schedules (its `parse_r`): the mean over the blocks stays about r.
  """
  if schedule == "constant" or depth == 1:
    return (r,) * depth
  start, end = (2 * r, 0) if schedule == "decreasing" else (0, 2 * r)
  step = (end - start) / (depth - 1)
  return tuple(int(start + step * i) for i in range(depth))


def parse(spec, depth):
  """A `TokenMerging` of the `token_merging` option, or None when it reduces nothing.

  `spec`: None, an int (ToMe's r), or a mapping (dict, FrozenDict, ConfigDict) of KEYS.
  Raises ValueError naming the key and the fix for anything else.
  """
  if spec is None:
    return None
  if isinstance(spec, TokenMerging):
    return spec if any(spec.per_layer(depth)) else None
  if hasattr(spec, "to_dict"):  # An ml_collections ConfigDict from a config file.
    spec = spec.to_dict()
  if isinstance(spec, bool) or not isinstance(spec, (int, Mapping)):
    raise ValueError(f"token_merging={spec!r}: give a dict such as dict(r=8) or "
                     "dict(method='evit', keep_rate=0.7), an int (ToMe's r), or None.")
  if isinstance(spec, int):
    spec = {"r": spec}
  unknown = sorted(set(spec) - set(KEYS))
  if unknown:
    raise ValueError(f"Unknown token_merging key(s) {', '.join(map(repr, unknown))}; the keys "
                     f"are: {', '.join(KEYS)}.")
  spec = {k: v for k, v in spec.items() if v is not None}
  method = spec.get("method", "tome")
  if method not in METHODS:
    raise ValueError(f"Unknown token_merging method {method!r}; use one of: "
                     f"{', '.join(map(repr, METHODS))}.")
  schedule = spec.get("schedule", "constant")
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown token_merging schedule {schedule!r}; use one of: "
                     f"{', '.join(map(repr, SCHEDULES))}.")
  r = spec.get("r", 0)
  if isinstance(r, (list, tuple)):
    r = tuple(r)
    if not all(_is_count(v) for v in r):
      raise ValueError(f"token_merging r={r!r}: every entry must be an int >= 0.")
  elif not _is_count(r):
    raise ValueError(f"token_merging r={r!r}: must be an int >= 0 (tokens taken out per block) "
                     "or a tuple of one per block.")
  keep_rate = spec.get("keep_rate")
  if keep_rate is not None:
    if method == "tome":
      raise ValueError("token_merging keep_rate is for the pruning methods ('evit', 'topk'); "
                       "ToMe takes r (tokens merged per block).")
    if "r" in spec and r:
      raise ValueError(f"token_merging has r={r!r} and keep_rate={keep_rate!r}: give one.")
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not (
        0 < keep_rate <= 1):
      raise ValueError(f"token_merging keep_rate={keep_rate!r}: must be in (0, 1], e.g. 0.7.")
    keep_rate = float(keep_rate)
  layers = spec.get("layers")
  if layers is not None:
    layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
    bad = [i for i in layers if not _is_count(i) or i >= depth]
    if bad:
      raise ValueError(f"token_merging layers={layers!r}: {bad} are not block indices of a "
                       f"{depth}-block model (0 to {depth - 1}).")
  proportional = spec.get("proportional_attention")
  if proportional is not None and not isinstance(proportional, bool):
    raise ValueError(f"token_merging proportional_attention={proportional!r}: True or False.")
  parsed = TokenMerging(method, r, schedule, keep_rate, layers, proportional)
  if any(parsed.per_layer(depth)):
    return parsed
  if method != "tome":  # Asked for pruning, but nothing would be pruned: say so.
    raise ValueError(f"token_merging method={method!r} with r=0 and no keep_rate prunes "
                     "nothing: give keep_rate (e.g. 0.7) or r (tokens per block), or "
                     "method='tome' with r=0 to switch reduction off.")
  return None


def freeze(spec):
  """`spec` in a hashable form (models are static arguments of jit): FrozenDict, tuples."""
  if spec is None or isinstance(spec, (int, TokenMerging)):
    return spec
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if isinstance(spec, Mapping):
    import flax  # pylint: disable=g-import-not-at-top
    return flax.core.FrozenDict({k: tuple(v) if isinstance(v, list) else v
                                 for k, v in spec.items()})
  return spec


def _is_count(value):
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_model(model, spec):
  """Raises ValueError if `model` (its fields) cannot run `spec`'s reduction."""
  name = type(model).__name__
  if getattr(model, "scan_layers", False):
    raise ValueError(f"token_merging changes the token count from block to block, which "
                     f"scan_layers=True cannot run (one scanned block, one shape): set "
                     f"scan_layers=False on the {name}.")
  if getattr(model, "rope", None):
    raise ValueError(f"token_merging does not support RoPE (rope={model.rope!r}): merged "
                     "tokens have no position to rotate by. Use a model without rope.")
  if getattr(model, "causal", False) or getattr(model, "class_token_position", "first") != "first":
    raise ValueError("token_merging needs bidirectional attention with the class token first; "
                     "a causal model (iLLaMA) cannot merge tokens.")


def apply(spec, factories, num_protected, class_token=True):
  """The block factories of a stack with `spec`'s reductions put in.

  `factories`: one block factory per layer, each a functools.partial of a block taking
  `token_mixer` and `token_reducer` (parts.Block), whose token mixer is a partial of
  vitjax's MultiHeadDotProductAttention (it reports keys / class attention and adds
  the proportional-attention bias). Blocks before the first reduction keep their
  factory; one factory is made per distinct amount. `class_token`: whether the first
  token is a class token (EViT's score is its attention row; without one, the
  attention each token receives).
  """
  reports = REPORTS if class_token else GAP_REPORTS
  from vitjax.models.attention import MultiHeadDotProductAttention  # pylint: disable=g-import-not-at-top
  amounts = spec.per_layer(len(factories))
  first = next((i for i, a in enumerate(amounts) if a), len(amounts))
  made = {}
  result = []
  for i, (factory, amount) in enumerate(zip(factories, amounts)):
    if i < first:
      result.append(factory)
      continue
    mixer = factory.keywords.get("token_mixer") if isinstance(factory, functools.partial) else None
    if not (isinstance(mixer, functools.partial) and isinstance(mixer.func, type)
            and issubclass(mixer.func, MultiHeadDotProductAttention)):
      raise ValueError("token_merging needs blocks whose token mixer is vitjax's attention "
                       f"(MultiHeadDotProductAttention); block {i} has {mixer!r}.")
    key = (id(factory), amount)
    if key not in made:
      reducer = (Reducer(spec.method, amount, num_protected) if amount else None)
      new_mixer = functools.partial(mixer, proportional=spec.proportional,
                                    report=reports[spec.method] if amount else ())
      made[key] = functools.partial(factory, token_mixer=new_mixer, token_reducer=reducer)
    result.append(made[key])
  return tuple(result)


def initial_state(x, token_state):
  """`token_state` with `token_sizes` (ones) and `token_index` (identity) if missing."""
  batch, length = x.shape[:2]
  state = dict(token_state)
  state.setdefault("token_sizes", jnp.ones((batch, length), jnp.float32))
  state.setdefault("token_index", jnp.broadcast_to(
      jnp.arange(length, dtype=jnp.int32), (batch, length)))
  return state


@dataclasses.dataclass(frozen=True)
class Reducer:
  """One block's reduction: `reducer(x, token_state, report)` -> `(x, token_state)`.

  `amount`: tokens taken out (int) or the share kept (float, pruning); the first
  `num_protected` tokens are left alone. `report` is what the block's attention
  reported: 'keys' (B, T, head_dim), 'class_attention' or 'received_attention' (B, T).
  """
  method: str
  amount: Union[int, float]
  num_protected: int

  def __call__(self, x, token_state, report):
    state = initial_state(x, token_state)
    protected = self.num_protected
    count = x.shape[1] - protected
    sizes, index = state["token_sizes"], state["token_index"]
    if self.method == "tome":
      r = min(int(self.amount), count // 2)
      if r <= 0:
        return x, state
      merged, new_sizes, slots = merge(x[:, protected:], sizes[:, protected:],
                                       report["keys"][:, protected:], r)
    else:
      keep = (math.ceil(self.amount * count) if isinstance(self.amount, float)
              else count - int(self.amount))
      keep = max(keep, 1)
      if keep >= count:
        return x, state
      if self.method == "evit":
        score = report.get("class_attention", report.get("received_attention"))
        merged, new_sizes, slots = fuse_inattentive(
            x[:, protected:], sizes[:, protected:], score[:, protected:], keep)
      else:
        merged, new_sizes, slots = prune_by_norm(x[:, protected:], sizes[:, protected:], keep)
    batch = x.shape[0]
    prefix_slots = jnp.broadcast_to(jnp.arange(protected, dtype=jnp.int32), (batch, protected))
    slots = jnp.concatenate([prefix_slots, jnp.where(slots < 0, -1, slots + protected)], axis=1)
    moved = jnp.take_along_axis(slots, jnp.maximum(index, 0), axis=1)
    state["token_index"] = jnp.where(index < 0, -1, moved)
    state["token_sizes"] = jnp.concatenate([sizes[:, :protected], new_sizes], axis=1)
    return jnp.concatenate([x[:, :protected], merged], axis=1), state


def _take(values, indices):
  """values (B, N, ...) at indices (B, K) along axis 1."""
  indices = indices.reshape(indices.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, indices, axis=1)


def _scatter_rows(shape, indices, values, fill=0):
  """(B, N) int32 `fill` with values (B, K) or (K,) written at the distinct indices (B, K)."""
  values = jnp.broadcast_to(values, indices.shape)
  return jax.vmap(lambda row, i, v: row.at[i].set(v))(jnp.full(shape, fill, jnp.int32), indices,
                                                      values)


def bipartite_soft_matching(metric, r):
  """ToMe's matching of (B, N, C) tokens: (src, dst, unmerged) index arrays.

  Tokens alternate into sets A (even positions) and B (odd); each token of A is
  matched to its most similar token of B (cosine of `metric`); the r matches of
  highest similarity are merged: A's `src` (B, r) into B's `dst` (B, r). A's other
  tokens, `unmerged` (B, |A| - r), stay, in their order. Ties go to the earlier token.
  """
  metric = metric.astype(jnp.float32)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  scores = jnp.einsum("bic,bjc->bij", metric[:, ::2], metric[:, 1::2],
                      precision=jax.lax.Precision.HIGHEST)
  best = jnp.max(scores, axis=-1)
  partner = jnp.argmax(scores, axis=-1)
  order = jnp.argsort(-best, axis=-1, stable=True)
  src = order[:, :r]
  unmerged = jnp.sort(order[:, r:], axis=-1)
  return src, jnp.take_along_axis(partner, src, axis=-1), unmerged


def merge(x, sizes, metric, r):
  """ToMe's merge of (B, N, C) tokens with sizes (B, N): (tokens, sizes, slots).

  r tokens of A are averaged, weighted by size, into their matches in B. Returns
  the N - r tokens [A's unmerged, B's] and their sizes, and `slots` (B, N): where
  each input token went. A token of B that received nothing is unchanged, bit for bit.
  """
  src, dst, unmerged = bipartite_soft_matching(metric, r)
  x_a, x_b = x[:, ::2], x[:, 1::2]
  size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
  count_a, count_b = x_a.shape[1], x_b.shape[1]
  # A one-hot product rather than a scatter-add: the same sums, in a fixed order on every
  # device (a GPU's atomic scatter-add is not), and a matmul the compilers tile well.
  onehot = jax.nn.one_hot(dst, count_b, dtype=jnp.float32)  # (B, r, |B|)
  src_sizes = _take(size_a, src)
  added = jnp.einsum("brj,brc->bjc", onehot, _take(x_a, src).astype(jnp.float32)
                     * src_sizes[..., None], precision=jax.lax.Precision.HIGHEST)
  added_sizes = jnp.einsum("brj,br->bj", onehot, src_sizes, precision=jax.lax.Precision.HIGHEST)
  new_size_b = size_b + added_sizes
  averaged = (x_b.astype(jnp.float32) * size_b[..., None] + added) / new_size_b[..., None]
  new_b = jnp.where((added_sizes > 0)[..., None], averaged.astype(x.dtype), x_b)
  tokens = jnp.concatenate([_take(x_a, unmerged), new_b], axis=1)
  new_sizes = jnp.concatenate([_take(size_a, unmerged), new_size_b], axis=1)

  batch, kept_a = x.shape[0], count_a - r
  # A's unmerged tokens keep their order; its src tokens go where their dst went. The two
  # index sets split A, so every slot is written once.
  kept_slots = jnp.broadcast_to(jnp.arange(kept_a, dtype=jnp.int32), unmerged.shape)
  slots_a = _scatter_rows((batch, count_a), jnp.concatenate([unmerged, src], axis=1),
                          jnp.concatenate([kept_slots, (kept_a + dst).astype(jnp.int32)], axis=1))
  slots_b = jnp.broadcast_to(kept_a + jnp.arange(count_b, dtype=jnp.int32), (batch, count_b))
  slots = jnp.zeros(sizes.shape, jnp.int32).at[:, ::2].set(slots_a).at[:, 1::2].set(slots_b)
  return tokens, new_sizes, slots


def _keep_top(scores, keep):
  """(kept, is_kept): indices (B, keep) of the highest `scores`, in order, and their (B, N) mask."""
  _, top = jax.lax.top_k(scores, keep)
  kept = jnp.sort(top, axis=-1)
  is_kept = jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], kept].set(True)
  return kept, is_kept


def fuse_inattentive(x, sizes, class_attention, keep):
  """EViT: keep the `keep` tokens of highest class attention, fuse the rest into one.

  The fused token is sum_i a_i x_i over the dropped tokens, a_i their class
  attention (EViT's Eq. 4 and code: not renormalised); its size is theirs summed.
  Returns the keep + 1 tokens, their sizes and `slots` as `merge`.
  """
  attention = class_attention.astype(jnp.float32)
  kept, is_kept = _keep_top(attention, keep)
  weights = jnp.where(is_kept, 0.0, attention)
  fused = jnp.einsum("bn,bnc->bc", weights, x.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
  fused_size = jnp.sum(jnp.where(is_kept, 0.0, sizes), axis=1)
  tokens = jnp.concatenate([_take(x, kept), fused[:, None]], axis=1)
  new_sizes = jnp.concatenate([_take(sizes, kept), fused_size[:, None]], axis=1)
  # Dropped tokens went into the fused one, slot `keep`.
  slots = _scatter_rows(sizes.shape, kept, jnp.arange(keep, dtype=jnp.int32), fill=keep)
  return tokens, new_sizes, slots


def prune_by_norm(x, sizes, keep):
  """Keeps the `keep` tokens of largest L2 norm, drops the rest (slot -1)."""
  norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
  kept, _ = _keep_top(norms, keep)
  slots = _scatter_rows(sizes.shape, kept, jnp.arange(keep, dtype=jnp.int32), fill=-1)
  return _take(x, kept), _take(sizes, kept), slots


def unmerge(x, token_index):
  """(B, T0, C): each input token's current token (zeros for a dropped one).

  `x` (B, T, C) are the reduced tokens, `token_index` (B, T0) the token state's map.
  """
  values = _take(x, jnp.maximum(token_index, 0))
  return jnp.where((token_index >= 0)[..., None], values, jnp.zeros((), x.dtype))


def unmerged_patches(x, token_state, first_patch, num_patches):
  """The final patch tokens, one per input patch in patch order, after any reduction."""
  if "token_index" not in token_state:
    return x[:, first_patch:first_patch + num_patches]
  index = token_state["token_index"][:, first_patch:first_patch + num_patches]
  return unmerge(x, index)


__all__ = ["GAP_REPORTS", "KEYS", "METHODS", "REPORTS", "Reducer", "SCHEDULES", "TokenMerging", "apply",
           "bipartite_soft_matching", "check_model", "evit_layers", "freeze", "fuse_inattentive",
           "initial_state", "merge", "parse", "prune_by_norm", "schedule_r", "unmerge",
           "unmerged_patches"]
