"""Flash attention in Pallas: forward and backward kernels behind one `jax.custom_vjp`.

The forward pass walks over key blocks with an online softmax (running max `m`,
running sum `l`, fp32 accumulator) and never materialises the (q_len, k_len)
score matrix; it saves the log-sum-exp per query row. The backward pass
recomputes the probabilities block by block from that log-sum-exp:

  * one kernel per key block accumulates dK and dV over the query blocks,
  * one kernel per query block accumulates dQ over the key blocks and, when the
    bias is differentiated, writes dS (the bias gradient) block by block. A bias
    nothing differentiates (a constant mask such as Swin's or iLLaMA's, or a
    `stop_gradient`) gets no dS: `custom_vjp(symbolic_zeros=True)` tells the
    forward rule which arguments are perturbed.

Everything the caller may pass is handled inside: lengths that are not a
multiple of the block size (padded here, masked in the kernel), a boolean mask
and an additive bias (each broadcastable to (batch, heads, q_len, k_len); their
broadcast dimensions are never materialised), segment ids for packed sequences,
and causal masking with the queries aligned to the end of the keys (so
q_len < k_len decodes the last positions), where key blocks entirely above the
diagonal are skipped.

The same kernels lower to Triton on NVIDIA GPUs and to Mosaic on TPUs, and run
in interpret mode on the CPU, where the tests check them against the 'xla'
reference. The tests also lower them for 'cuda' and 'tpu' from the CPU
(`platform=`, with `jax.jit(...).trace(...).lower(lowering_platforms=...)`),
which catches what each Pallas front end rejects (tile shapes, unsupported
operations) without the hardware; what the Triton and Mosaic compilers decide
after that (registers, shared memory, VMEM) shows only on the device.

Per-row statistics (log-sum-exp, the softmax-gradient correction) and segment
ids are kept as columns (length, 1) and rows (1, length), so every tile is 2-D,
broadcasts without a transpose, and meets Mosaic's tiling rule (last two tile
dimensions divisible by (8, 128) or whole).

Known costs: a differentiated bias's gradient is written whole, (batch, heads,
q_len, k_len) in fp32, before it is summed over the bias's broadcast dimensions
(a (1, heads, q_len, k_len) relative-position bias included), so that backward
pass needs the memory of the attention matrix; summing inside the kernel would
need programs that revisit one output tile, which Mosaic allows along sequential
grid axes and Triton's parallel programs do not. And each program's
BlockSpecs hold a (batch, head)'s whole K and V (Q and dO for dK/dV), which on a
GPU are only pointers but on a TPU are copied into VMEM, bounding the length
there (untried: no TPU has been available).
"""

import dataclasses
import functools
import math
from typing import Optional

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

try:  # Deprecated in JAX 0.11 in favour of Mosaic GPU; kept while it ships.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a JAX without the Triton backend.
  pltriton = None

# Internally the kernels see (batch, heads, length, head_dim): one (batch, head)
# pair per grid row, and contiguous (block, head_dim) tiles.
_MIN_BLOCK = 16  # The smallest tile a GPU matrix unit takes.
PLATFORMS = ("cpu", "gpu", "tpu")  # What the kernels are built for; 'cpu' interprets them.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes along the query and key axes, for the forward and backward kernels.

  `num_warps` and `num_stages` are Triton's launch parameters (GPU only): warps
  per program and software-pipelining depth of the key/query loops.
  """
  block_q: int = 128
  block_k: int = 128
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def default(cls, head_dim, backend=None):
    """Defaults per platform; tune with `python -m vitjax.tools.bench_attention`."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
      return cls(256, 512, 256, 256)  # Mosaic wants lane-aligned (x128) tiles.
    if backend == "gpu" and head_dim > 64:
      return cls(128, 64, 64, 64, num_warps=8)  # Keep the fp32 accumulators in registers.
    return cls()

  def fitted(self, q_len, k_len):
    """Shrinks tiles for short sequences (a 7-token sequence needs no 128-row tile).

    A tile shrunk below 128 covers its whole (padded) axis, which keeps Mosaic's
    tiling rule on TPUs.
    """
    fit = lambda block, length: max(_MIN_BLOCK, min(block, pl.next_power_of_2(length)))
    return dataclasses.replace(
        self, block_q=fit(self.block_q, q_len), block_k=fit(self.block_k, k_len),
        block_q_bwd=fit(self.block_q_bwd, q_len), block_k_bwd=fit(self.block_k_bwd, k_len))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels need to know at trace time."""
  scale: float
  causal: bool
  q_len: int  # True (unpadded) lengths.
  k_len: int
  blocks: BlockSizes
  platform: str  # 'cpu' (interpreted), 'gpu' (Triton) or 'tpu' (Mosaic).
  interpret: bool
  has_bias: bool
  has_mask: bool
  has_segments: bool
  bias_shape: tuple = ()  # 4-D, each dimension 1 (broadcast) or full (padded) size.
  bias_grad: bool = False  # Backward only: whether the dQ kernel also writes dS.
  mask_shape: tuple = ()

  @property
  def causal_offset(self):
    return self.k_len - self.q_len


def flash_attention(q, k, v, *, bias=None, mask=None, segment_ids=None, causal=False,
                    scale=None, block_sizes: Optional[BlockSizes] = None,
                    interpret: Optional[bool] = None, platform: Optional[str] = None):
  """Fused attention; same contract as `vitjax.ops.dot_product_attention`.

  Args:
    q: (batch, q_len, heads, head_dim); k, v: (batch, k_len, heads, head_dim).
    bias: additive, broadcastable to (batch, heads, q_len, k_len); differentiable.
    mask: boolean, broadcastable to (batch, heads, q_len, k_len); True = attend.
    segment_ids: (batch, length) int, or a (q_segment_ids, kv_segment_ids) pair;
      a query attends only to keys of its own segment (packed sequences).
    causal: query i attends to keys j <= i + (k_len - q_len).
    scale: multiplies q k^T; defaults to 1/sqrt(head_dim).
    block_sizes: tile sizes; defaults per platform and shape.
    interpret: run the kernels in the Pallas interpreter (default: on the CPU).
    platform: 'gpu' (Triton), 'tpu' (Mosaic) or 'cpu'; what the kernels are
      built for. Defaults to the platform this runs on; name another only to
      lower for it from here (`jax.jit(f).trace(...).lower(lowering_platforms=...)`).

  Returns:
    (batch, q_len, heads, head_dim) in the dtype of `v`.
  """
  batch, q_len, heads, head_dim = q.shape
  k_len = k.shape[1]
  if k.shape != (batch, k_len, heads, head_dim) or v.shape != k.shape:
    raise ValueError(f"flash_attention needs q (B, Tq, H, D) and k, v (B, Tk, H, D) with "
                     f"equal B, H, D; got {q.shape}, {k.shape}, {v.shape}.")
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  platform = platform or jax.default_backend()
  if platform not in PLATFORMS:
    raise ValueError(f"flash_attention runs on {', '.join(PLATFORMS)}, not {platform!r}.")
  if interpret is None:
    interpret = platform == "cpu"
  if platform == "cpu" and not interpret:
    raise ValueError("On the CPU the Pallas kernels run only interpreted: pass "
                     "interpret=True (the default there), or platform='gpu'/'tpu' to lower "
                     "for an accelerator.")
  blocks = (block_sizes or BlockSizes.default(head_dim, platform)).fitted(q_len, k_len)
  q_pad = _round_up(q_len, math.lcm(blocks.block_q, blocks.block_q_bwd))
  k_pad = _round_up(k_len, math.lcm(blocks.block_k, blocks.block_k_bwd))
  # Head dims like 80 (ViT-H/14) go to a power of two: zero columns change no dot product.
  d_pad = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))

  def to_kernel_layout(x, length):
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, d_pad - head_dim)))

  qt, kt, vt = to_kernel_layout(q, q_pad), to_kernel_layout(k, k_pad), to_kernel_layout(v, k_pad)
  bias4 = None if bias is None else _broadcastable_4d(bias, (batch, heads, q_len, k_len), "bias")
  mask4 = None if mask is None else _broadcastable_4d(mask, (batch, heads, q_len, k_len), "mask")
  if bias4 is not None:
    bias4 = _pad_scores(bias4, q_pad, k_pad)
  if mask4 is not None:
    # An additive 0 / -inf mask: masked scores vanish from the softmax, and a fully
    # masked row is recognised by its -inf maximum (and yields zeros, as 'xla').
    mask4 = _pad_scores(jnp.where(mask4, 0.0, -jnp.inf).astype(jnp.float32), q_pad, k_pad)
  segments = None
  if segment_ids is not None:
    q_seg, kv_seg = (segment_ids if isinstance(segment_ids, (tuple, list))
                     else (segment_ids, segment_ids))
    if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, k_len):
      raise ValueError(f"segment_ids must be (batch, q_len) and (batch, k_len): "
                       f"got {q_seg.shape} and {kv_seg.shape}.")
    # Query ids as a column (batch, q_len, 1), key ids as a row (batch, 1, k_len).
    segments = (jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, q_pad - q_len)))[:, :, None],
                jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, k_pad - k_len)))[:, None, :])

  static = _Static(scale=float(scale), causal=bool(causal), q_len=q_len, k_len=k_len,
                   blocks=blocks, platform=platform, interpret=bool(interpret),
                   has_bias=bias4 is not None,
                   has_mask=mask4 is not None, has_segments=segments is not None,
                   bias_shape=() if bias4 is None else bias4.shape,
                   mask_shape=() if mask4 is None else mask4.shape)
  out = _flash(static, qt, kt, vt, bias4, mask4, segments)
  return jnp.swapaxes(out[:, :, :q_len, :head_dim], 1, 2).astype(v.dtype)


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def _broadcastable_4d(x, full_shape, name):
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"{name} has {x.ndim} dimensions; at most 4 (batch, heads, q_len, k_len).")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for size, full in zip(x.shape, full_shape):
    if size not in (1, full):
      raise ValueError(f"{name} of shape {x.shape} does not broadcast to "
                       f"(batch, heads, q_len, k_len) = {full_shape}.")
  return x


def _pad_scores(x, q_pad, k_pad):
  """Pads the q_len and k_len dimensions that are not broadcast (size 1)."""
  pad_q = 0 if x.shape[2] == 1 else q_pad - x.shape[2]
  pad_k = 0 if x.shape[3] == 1 else k_pad - x.shape[3]
  return jnp.pad(x, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))


# ---------------------------------------------------------------------------
# Block specs. Grid rows are (batch, head, block); `which` is 'q' when the
# block index walks the queries (forward, dQ) and 'k' when it walks the keys (dK/dV).


def _score_spec(shape, block_q, block_k, which):
  """BlockSpec of a bias or mask whose broadcast dimensions stay size 1.

  The block covers `block_q` query rows (or all when walking keys) and all key
  columns (or `block_k` when walking keys); the kernel slices the other axis.
  """
  batch_b, heads_b, q_b, k_b = (s > 1 for s in shape)
  rows = (block_q if which == "q" else shape[2]) if q_b else 1
  cols = (shape[3] if which == "q" else block_k) if k_b else 1

  def index_map(b, h, i):
    q_index = (i if which == "q" else 0) if q_b else 0
    k_index = (i if which == "k" else 0) if k_b else 0
    return (b if batch_b else 0, h if heads_b else 0, q_index, k_index)

  return pl.BlockSpec((None, None, rows, cols), index_map)


def _row_spec(block, head_dim):
  return pl.BlockSpec((None, None, block, head_dim), lambda b, h, i: (b, h, i, 0))


def _full_spec(length, head_dim):
  return pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, h, 0, 0))


def _column_spec(block):
  """A (block, 1) tile of a per-query-row statistic stored as (batch, heads, length, 1)."""
  return pl.BlockSpec((None, None, block, 1), lambda b, h, i: (b, h, i, 0))


def _full_column_spec(length):
  return pl.BlockSpec((None, None, length, 1), lambda b, h, i: (b, h, 0, 0))


def _q_segment_spec(block):
  """Query segment ids, a (block, 1) column of (batch, q_len, 1)."""
  return pl.BlockSpec((None, block, 1), lambda b, h, i: (b, i, 0))


def _full_q_segment_spec(length):
  return pl.BlockSpec((None, length, 1), lambda b, h, i: (b, 0, 0))


def _kv_segment_spec(block):
  """Key segment ids, a (1, block) row of (batch, 1, k_len)."""
  return pl.BlockSpec((None, 1, block), lambda b, h, i: (b, 0, i))


def _full_kv_segment_spec(length):
  return pl.BlockSpec((None, 1, length), lambda b, h, i: (b, 0, 0))


def _compiler_params(static):
  """Triton's or Mosaic's parameters for the platform; None for the interpreter."""
  if static.interpret:
    return None
  if static.platform == "gpu":
    if pltriton is None:
      raise NotImplementedError(
          f"This JAX ({jax.__version__}) has no Pallas Triton backend, which vitjax's GPU "
          f"kernels use. Use attention_impl='cudnn' or 'xla' on GPUs.")
    # Named explicitly: a bare pallas_call may go to Mosaic GPU, which these kernels
    # are not written for.
    return pltriton.CompilerParams(num_warps=static.blocks.num_warps,
                                   num_stages=static.blocks.num_stages)
  # TPU: every program writes its own output tile, so all grid axes may run in parallel.
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)


def _call(static, kernel, name, **kwargs):
  """`pl.pallas_call` with the platform's compiler: Triton, Mosaic or the interpreter."""
  return pl.pallas_call(functools.partial(kernel, static), interpret=static.interpret,
                        compiler_params=_compiler_params(static), name=name, **kwargs)


# ---------------------------------------------------------------------------
# Shared block math.


def _scores(static, q, k, q_start, k_start, bias_block, mask_block, q_seg, kv_seg):
  """Masked fp32 scores of one (q block, k block) tile; disallowed entries are -inf."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  s = s * static.scale
  if bias_block is not None:
    s = s + bias_block.astype(jnp.float32)
  if mask_block is not None:
    s = s + mask_block
  block_q, block_k = s.shape
  q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  allowed = k_pos < static.k_len  # Padded keys.
  if static.causal:
    allowed = jnp.logical_and(allowed, k_pos <= q_pos + static.causal_offset)
  if static.has_segments:
    allowed = jnp.logical_and(allowed, q_seg == kv_seg)  # (block_q, 1) == (1, block_k).
  return jnp.where(allowed, s, -jnp.inf)


def _slice_scores(ref, rows, cols):
  """A tile of a bias/mask ref; `rows`/`cols` are pl.ds slices or None to take all."""
  if ref is None:
    return None
  row_index = slice(None) if rows is None or ref.shape[0] == 1 else rows
  col_index = slice(None) if cols is None or ref.shape[1] == 1 else cols
  return ref[row_index, col_index]


def _causal_k_blocks(static, q_block_index, block_q, block_k, num_k_blocks):
  """Key blocks that hold any allowed key for this query block (all, if not causal)."""
  if not static.causal:
    return num_k_blocks
  # Blocks holding keys 0 .. last allowed key, by non-negative integer division
  # (jnp's floor division lowers through `sign`, which Mosaic cannot lower everywhere).
  allowed_keys = jnp.maximum((q_block_index + 1) * block_q + static.causal_offset, 0)
  return jnp.minimum(jax.lax.div(allowed_keys + block_k - 1, block_k), num_k_blocks)


def _causal_first_q_block(static, k_block_index, block_q, block_k):
  """The first query block that sees any key of this key block (0, if not causal)."""
  if not static.causal:
    return 0
  first_q = k_block_index * block_k - static.causal_offset
  return jax.lax.div(jnp.maximum(first_q, 0), block_q)


# ---------------------------------------------------------------------------
# Forward.


def _forward_kernel(static, *refs):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  rest = refs[3:]
  bias_ref = rest.pop(0) if static.has_bias else None
  mask_ref = rest.pop(0) if static.has_mask else None
  q_seg_ref, kv_seg_ref = (rest.pop(0), rest.pop(0)) if static.has_segments else (None, None)
  out_ref, lse_ref = rest

  block_q, head_dim = q_ref.shape
  block_k = static.blocks.block_k
  q_block_index = pl.program_id(2)
  q_start = q_block_index * block_q
  q = q_ref[...]
  q_seg = q_seg_ref[...] if q_seg_ref is not None else None

  def body(j, carry):
    m, l, acc = carry
    k_start = j * block_k
    cols = pl.ds(pl.multiple_of(k_start, block_k), block_k)
    k = k_ref[cols, :]
    v = v_ref[cols, :]
    kv_seg = kv_seg_ref[:, cols] if kv_seg_ref is not None else None
    s = _scores(static, q, k, q_start, k_start, _slice_scores(bias_ref, None, cols),
                _slice_scores(mask_ref, None, cols), q_seg, kv_seg)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # A row with nothing allowed yet.
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = acc * alpha + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc

  num_k_blocks = k_ref.shape[0] // block_k
  upper = _causal_k_blocks(static, q_block_index, block_q, block_k, num_k_blocks)
  init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, upper, body, init)
  empty = l == 0.0  # No allowed key: the output is zeros, as in the reference.
  out_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _forward(static, q, k, v, bias, mask, segments):
  batch, heads, q_pad, head_dim = q.shape
  k_pad = k.shape[2]
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  in_specs = [_row_spec(block_q, head_dim), _full_spec(k_pad, head_dim),
              _full_spec(k_pad, head_dim)]
  inputs = [q, k, v]
  for extra in (bias, mask):
    if extra is not None:
      in_specs.append(_score_spec(extra.shape, block_q, block_k, "q"))
      inputs.append(extra)
  if segments is not None:
    in_specs += [_q_segment_spec(block_q), _full_kv_segment_spec(k_pad)]
    inputs += list(segments)
  out, lse = _call(
      static, _forward_kernel, "vitjax_flash_forward",
      grid=(batch, heads, q_pad // block_q),
      in_specs=in_specs,
      out_specs=[_row_spec(block_q, head_dim), _column_spec(block_q)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_pad, 1), jnp.float32)],
  )(*inputs)
  return out, lse


# ---------------------------------------------------------------------------
# Backward.


def _dkdv_kernel(static, *refs):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  bias_ref = rest.pop(0) if static.has_bias else None
  mask_ref = rest.pop(0) if static.has_mask else None
  q_seg_ref, kv_seg_ref = (rest.pop(0), rest.pop(0)) if static.has_segments else (None, None)
  dk_ref, dv_ref = rest

  block_k, head_dim = k_ref.shape
  block_q = static.blocks.block_q_bwd
  k_block_index = pl.program_id(2)
  k_start = k_block_index * block_k
  k = k_ref[...]
  v = v_ref[...]
  kv_seg = kv_seg_ref[...] if kv_seg_ref is not None else None

  def body(i, carry):
    dk, dv = carry
    q_start = i * block_q
    rows = pl.ds(pl.multiple_of(q_start, block_q), block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    q_seg = q_seg_ref[rows, :] if q_seg_ref is not None else None
    s = _scores(static, q, k, q_start, k_start, _slice_scores(bias_ref, rows, None),
                _slice_scores(mask_ref, rows, None), q_seg, kv_seg)
    p = jnp.exp(s - lse_ref[rows, :])  # lse = inf on empty rows: p = 0.
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[rows, :])
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return dk, dv

  num_q_blocks = q_ref.shape[0] // block_q
  first = _causal_first_q_block(static, k_block_index, block_q, block_k)
  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = jax.lax.fori_loop(first, num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(static, *refs):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  bias_ref = rest.pop(0) if static.has_bias else None
  mask_ref = rest.pop(0) if static.has_mask else None
  q_seg_ref, kv_seg_ref = (rest.pop(0), rest.pop(0)) if static.has_segments else (None, None)
  dq_ref = rest.pop(0)
  dbias_ref = rest.pop(0) if static.bias_grad else None

  block_q, head_dim = q_ref.shape
  block_k = static.blocks.block_k_bwd
  q_block_index = pl.program_id(2)
  q_start = q_block_index * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_seg = q_seg_ref[...] if q_seg_ref is not None else None

  def body(j, dq):
    k_start = j * block_k
    cols = pl.ds(pl.multiple_of(k_start, block_k), block_k)
    k = k_ref[cols, :]
    v = v_ref[cols, :]
    kv_seg = kv_seg_ref[:, cols] if kv_seg_ref is not None else None
    s = _scores(static, q, k, q_start, k_start, _slice_scores(bias_ref, None, cols),
                _slice_scores(mask_ref, None, cols), q_seg, kv_seg)
    p = jnp.exp(s - lse)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if dbias_ref is not None:
      dbias_ref[:, cols] = ds.astype(dbias_ref.dtype)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  num_k_blocks = k_ref.shape[0] // block_k
  upper = _causal_k_blocks(static, q_block_index, block_q, block_k, num_k_blocks)
  dq = jax.lax.fori_loop(0, upper, body, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)
  if dbias_ref is not None:
    # Tiles skipped by causal masking have zero gradient; written a tile at a time
    # because GPU tiles must have power-of-two shapes and the padded k_len need not.
    def zero_tile(j, carry):
      cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
      dbias_ref[:, cols] = jnp.zeros((block_q, block_k), dbias_ref.dtype)
      return carry
    jax.lax.fori_loop(upper, num_k_blocks, zero_tile, 0)


def _backward(static, q, k, v, bias, mask, segments, out, lse, d_out, *,
              bias_needs_grad):
  batch, heads, q_pad, head_dim = q.shape
  k_pad = k.shape[2]
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  static = dataclasses.replace(static, bias_grad=bias_needs_grad)
  # delta_i = sum_d dO_id O_id, the softmax-gradient correction per query row.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  common = [q, k, v, d_out, lse, delta]
  extras = [x for x in (bias, mask) if x is not None]
  segment_inputs = list(segments) if segments is not None else []

  # dK, dV: a key block per program, looping over the query blocks.
  in_specs = [_full_spec(q_pad, head_dim), _row_spec(block_k, head_dim),
              _row_spec(block_k, head_dim), _full_spec(q_pad, head_dim),
              _full_column_spec(q_pad), _full_column_spec(q_pad)]
  in_specs += [_score_spec(x.shape, block_q, block_k, "k") for x in extras]
  if segments is not None:
    in_specs += [_full_q_segment_spec(q_pad), _kv_segment_spec(block_k)]
  dk, dv = _call(
      static, _dkdv_kernel, "vitjax_flash_backward_dkdv",
      grid=(batch, heads, k_pad // block_k),
      in_specs=in_specs,
      out_specs=[_row_spec(block_k, head_dim), _row_spec(block_k, head_dim)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
  )(*common, *extras, *segment_inputs)

  # dQ (and dS for the bias): a query block per program, looping over the key blocks.
  in_specs = [_row_spec(block_q, head_dim), _full_spec(k_pad, head_dim),
              _full_spec(k_pad, head_dim), _row_spec(block_q, head_dim),
              _column_spec(block_q), _column_spec(block_q)]
  in_specs += [_score_spec(x.shape, block_q, block_k, "q") for x in extras]
  if segments is not None:
    in_specs += [_q_segment_spec(block_q), _full_kv_segment_spec(k_pad)]
  out_specs = [_row_spec(block_q, head_dim)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if bias_needs_grad:
    out_specs.append(pl.BlockSpec((None, None, block_q, k_pad), lambda b, h, i: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_pad, k_pad), jnp.float32))
  results = _call(
      static, _dq_kernel, "vitjax_flash_backward_dq",
      grid=(batch, heads, q_pad // block_q),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
  )(*common, *extras, *segment_inputs)
  dq = results[0]
  d_bias = None
  if bias_needs_grad:
    d_scores = results[1]
    # Sum over the dimensions the bias broadcasts along, back to its own shape.
    reduce_axes = tuple(axis for axis in range(4) if bias.shape[axis] == 1)
    d_bias = jnp.sum(d_scores, axis=reduce_axes, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, d_bias


# ---------------------------------------------------------------------------
# The differentiable op.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, bias, mask, segments):
  return _forward(static, q, k, v, bias, mask, segments)[0]


def _flash_fwd(static, q, k, v, bias, mask, segments):
  # With `symbolic_zeros=True` every array argument arrives as a CustomVJPPrimal:
  # `.value` is the array, `.perturbed` whether anything differentiates through it.
  bias_needs_grad = bias is not None and bias.perturbed
  q, k, v, bias, mask, segments = jax.tree_util.tree_map(
      lambda primal: primal.value, (q, k, v, bias, mask, segments))
  out, lse = _forward(static, q, k, v, bias, mask, segments)
  # The bias rides in one of two slots, so the backward pass knows at trace time
  # whether to compute its gradient: a constant bias (Swin's window mask, iLLaMA's
  # soft mask, a stop_gradient) gets none, and no (batch, heads, q_len, k_len) dS.
  bias_slots = (bias, None) if bias_needs_grad else (None, bias)
  return out, (q, k, v, bias_slots, mask, segments, out, lse)


def _flash_bwd(static, residuals, d_out):
  q, k, v, (differentiated_bias, constant_bias), mask, segments, out, lse = residuals
  if not isinstance(d_out, jax.Array):  # A symbolic zero: nothing flows back.
    return None, None, None, None, None, None
  bias = constant_bias if differentiated_bias is None else differentiated_bias
  dq, dk, dv, d_bias = _backward(static, q, k, v, bias, mask, segments, out, lse, d_out,
                                 bias_needs_grad=differentiated_bias is not None)
  # None: no cotangent for the mask, the segment ids, or a bias nobody differentiates.
  return dq, dk, dv, d_bias, None, None


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)
