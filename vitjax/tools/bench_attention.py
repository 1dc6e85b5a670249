"""Times the attention implementations side by side: speed, memory and error vs 'xla'.

    python -m vitjax.tools.bench_attention [--impl xla,cudnn,pallas]
        [--shapes vit|long|all|cpu|8x1024x12x64] [--dtype bfloat16] [--causal]
        [--packed] [--iters 20] [--warmup 3] [--markdown] [--json rows.json]

For every implementation and shape it reports the median forward and forward+backward
time (compilation excluded), TFLOP/s, the memory XLA plans for each compiled executable,
and the largest difference of the forward output from the 'xla' reference.

FLOPs follow the FlashAttention convention: forward = 4 * B * Tq * Tk * H * D, halved
when causal; backward = 2.5x forward, so forward+backward = 3.5x forward.

`--packed` adds, for every shape B x T, the attention of NaViT batches: images of
T/16 to T/2 tokens (drawn with a fixed seed) packed first fit into the B sequences of
T tokens with segment ids ('packed'), and the same images one per sequence, each
padded to the longest ('padded', segment id 0 on the padding, as an attention mask).
Their TFLOP/s count the images' own attention only (sum of n^2 over the images), so
the two layouts compare as images per second do.

Memory is temporaries + outputs from `compiled.memory_analysis()`: the device's peak
counter cannot be reset between cases, whereas the analysis is per executable and works
on every backend.

Besides vitjax's own implementations ('xla', 'cudnn', 'pallas', 'auto') it runs, where
they are installed, 'tokamax-mosaic' and 'tokamax-triton' (`tokamax.dot_product_attention`)
and 'flash_attn_jax' (`flash_attn_jax.flash_mha`). Whatever fails is an 'n/a' or 'OOM'
cell with the reason in the note column, and the run goes on.

Of vitjax it imports only `vitjax.ops` and `vitjax.models.navit` (its first-fit packer), no
data or config modules, so it runs where ml-collections, grain and tensorflow-datasets are
not installed.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import ops
from vitjax.models import navit

# ViT-B/16 at 224, 384 and 512 pixels: 14^2, 24^2 and 32^2 patches plus the class token.
VIT_SHAPES = ((256, 197, 12, 64), (64, 577, 12, 64), (32, 1025, 12, 64))
# FlashAttention's benchmark sizes: 16k tokens per batch and a model width of 2048.
LONG_LENGTHS = (1024, 2048, 4096, 8192, 16384)
LONG_HEAD_DIMS = (64, 128)
_LONG_TOKENS, _LONG_WIDTH = 16384, 2048
# Small enough for a laptop CPU in seconds.
CPU_SHAPES = ((2, 197, 12, 64), (1, 577, 12, 64))

# The reference runs a few (batch, head) pairs at a time, so that it fits where the
# full-size 'xla' attention runs out of memory: at most this many bytes of fp32 logits.
_REFERENCE_LOGITS_BYTES = 1 << 30
# Timing samples shorter than this are several calls back to back (see _median_ms).
_MIN_SAMPLE_SECONDS = 2e-3


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  q_len: int
  k_len: int
  heads: int
  head_dim: int
  causal: bool = False
  # NaViT layouts (--packed): 'packed' or 'padded', and the images' token counts.
  layout: str | None = None
  images: tuple[int, ...] = ()

  @property
  def label(self):
    lengths = (self.q_len,) if self.q_len == self.k_len else (self.q_len, self.k_len)
    label = "x".join(str(n) for n in (self.batch, *lengths, self.heads, self.head_dim))
    return f"{label} {self.layout} ({len(self.images)} images)" if self.layout else label

  @property
  def forward_flops(self):
    if self.layout:  # The images' own attention: padding and other images are waste.
      return 4 * sum(n * n for n in self.images) * self.heads * self.head_dim
    flops = 4 * self.batch * self.q_len * self.k_len * self.heads * self.head_dim
    return flops // 2 if self.causal else flops

  def segment_ids(self):
    """(batch, length) int32 segment ids of a NaViT layout (0: padding), else None."""
    if not self.layout:
      return None
    ids = np.zeros((self.batch, self.q_len), np.int32)
    if self.layout == "padded":
      for row, length in enumerate(self.images):
        ids[row, :length] = 1
      return jnp.asarray(ids)
    placements = navit.first_fit(self.images, self.q_len, self.batch, len(self.images))
    filled = np.zeros(self.batch, np.int64)
    for image, (length, (row, _)) in enumerate(zip(self.images, placements)):
      ids[row, filled[row]:filled[row] + length] = image + 1
      filled[row] += length
    return jnp.asarray(ids)


def navit_layouts(shape, seed=0):
  """The 'packed' and 'padded' shapes of the images that fill `shape`'s sequences (first fit)."""
  rng = np.random.default_rng(seed)
  length, images = shape.q_len, []
  packer = navit.SequencePacker(length, shape.batch, max_images=length)
  while True:
    size = int(rng.integers(max(1, length // 16), max(2, length // 2) + 1))
    if packer.place(size) is None:
      break
    images.append(size)
  images = tuple(images)
  return [dataclasses.replace(shape, causal=False, layout="packed", images=images),
          Shape(len(images), max(images), max(images), shape.heads, shape.head_dim,
                layout="padded", images=images)]


def _square(batch, length, heads, head_dim, causal=False):
  return Shape(batch, length, length, heads, head_dim, causal)


def parse_shapes(spec, causal_only=False):
  """Shapes for a named set ('vit', 'long', 'all', 'cpu') or 'BxTxHxD[,BxTqxTkxHxD...]'."""
  vit = [_square(*s) for s in VIT_SHAPES]
  long = [_square(_LONG_TOKENS // length, length, _LONG_WIDTH // head_dim, head_dim, causal)
          for length in LONG_LENGTHS for head_dim in LONG_HEAD_DIMS for causal in (False, True)]
  named = {"vit": vit, "long": long, "all": vit + long, "cpu": [_square(*s) for s in CPU_SHAPES]}
  if spec in named:
    shapes = named[spec]
  else:
    shapes = []
    for part in spec.split(","):
      try:
        sizes = [int(n) for n in part.lower().split("x")]
      except ValueError:
        sizes = []
      if len(sizes) == 4:
        shapes.append(_square(*sizes))
      elif len(sizes) == 5:
        shapes.append(Shape(*sizes))
      else:
        raise ValueError(f"--shapes {spec!r}: expected one of {', '.join(named)} or "
                         f"BxTxHxD / BxTqxTkxHxD specs like 8x1024x12x64, got {part!r}")
  if causal_only:
    shapes = [dataclasses.replace(s, causal=True) for s in shapes]
  return list(dict.fromkeys(shapes))  # The 'long' set run with --causal repeats each shape.


# Implementations from other libraries: name -> (module to import, attend(q, k, v, causal)).
# Imports happen while tracing, so a missing library or a changed API becomes an 'n/a' cell.
def _tokamax(implementation):
  def attend(q, k, v, causal):
    import tokamax  # pylint: disable=import-outside-toplevel
    return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  return attend


def _flash_attn_jax(q, k, v, causal):
  from flash_attn_jax import flash_mha  # pylint: disable=import-outside-toplevel
  return flash_mha(q, k, v, softmax_scale=1 / math.sqrt(q.shape[-1]), is_causal=causal)


EXTERNAL = {
    "tokamax-mosaic": ("tokamax", _tokamax("mosaic")),
    "tokamax-triton": ("tokamax", _tokamax("triton")),
    "flash_attn_jax": ("flash_attn_jax", _flash_attn_jax),
}


def parse_block_sizes(name):
  """`ops.BlockSizes` of a 'pallas:BQxBK[xBQ_BWDxBK_BWD[xWARPSxSTAGES]]' name, else None.

  Tiles a sweep can try side by side, e.g. --impl pallas,pallas:128x64x64x64x8x3.
  """
  if not name.startswith("pallas:"):
    return None
  spec = name.removeprefix("pallas:")
  try:
    sizes = [int(n) for n in spec.split("x")]
  except ValueError:
    sizes = []
  if len(sizes) not in (2, 4, 6) or any(n < 1 for n in sizes):
    raise ValueError(f"--impl {name!r}: expected pallas:BQxBK, pallas:BQxBKxBQ_BWDxBK_BWD or "
                     f"pallas:BQxBKxBQ_BWDxBK_BWDxWARPSxSTAGES, e.g. pallas:128x64x64x64x8x3")
  if len(sizes) == 2:
    sizes += sizes  # The same tiles backward.
  return ops.BlockSizes(*sizes)


def attention_function(name):
  """attend(q, k, v, causal, segment_ids=None) for a vitjax implementation or an EXTERNAL one."""
  if name in EXTERNAL:
    def external(q, k, v, causal, segment_ids=None):
      if segment_ids is not None:
        raise ValueError(f"{name} is run without segment ids here.")
      return EXTERNAL[name][1](q, k, v, causal)
    return external
  blocks = parse_block_sizes(name)
  if blocks is not None:
    return lambda q, k, v, causal, segment_ids=None: ops.flash_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, block_sizes=blocks)
  implementation = None if name == "auto" else name
  return lambda q, k, v, causal, segment_ids=None: ops.dot_product_attention(
      q, k, v, causal=causal, segment_ids=segment_ids, implementation=implementation)


def default_implementations(platform):
  """vitjax's implementations that can run on `platform`, and installed external ones on GPU."""
  names = [name for name in ops.IMPLEMENTATIONS if name != "cudnn" or platform == "gpu"]
  if platform == "gpu":
    names += [name for name, (module, _) in EXTERNAL.items() if importlib.util.find_spec(module)]
  return names


def _failure(error):
  """'OOM' or 'n/a: <first line of the error>' for a table cell."""
  message = str(error).strip() or type(error).__name__
  lowered = message.lower()
  if any(s in lowered for s in ("resource_exhausted", "resource exhausted", "out of memory")):
    return "OOM"
  first_line = message.splitlines()[0]
  return "n/a: " + (first_line if len(first_line) <= 100 else first_line[:97] + "...")


def _temp_mib(compiled):
  """Temporaries + outputs of a compiled executable in MiB, or None where XLA does not say."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Some backends have no memory analysis at all.
  if stats is None:
    return None
  return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def _median_ms(compiled, args, iters, warmup):
  """Median milliseconds per call over `iters` samples, after `warmup` calls.

  A sample is several calls back to back when one call is short: XLA dispatches
  asynchronously, so this hides the per-call launch and sync latency that would
  otherwise dominate sub-millisecond kernels.
  """
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  calls = max(1, min(100, int(_MIN_SAMPLE_SECONDS / (time.perf_counter() - start))))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(calls):
      out = compiled(*args)  # Only the last output is kept alive.
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times) * 1e3


def make_inputs(shape, dtype, seed=0):
  """q, k, v in `dtype` and an fp32 output cotangent, all standard normal."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (shape.batch, shape.q_len, shape.heads, shape.head_dim), dtype)
  k = jax.random.normal(keys[1], (shape.batch, shape.k_len, shape.heads, shape.head_dim), dtype)
  v = jax.random.normal(keys[2], k.shape, dtype)
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  return q, k, v, cotangent


def reference_output(q, k, v, causal, segment_ids=None):
  """The 'xla' output in fp32, computed a group of (batch, head) pairs at a time."""
  if segment_ids is not None:  # NaViT layouts: at most a few thousand tokens a row.
    return jax.jit(lambda q, k, v: ops.dot_product_attention(
        q, k, v, segment_ids=segment_ids, implementation="xla"))(q, k, v).astype(jnp.float32)
  batch, q_len, heads, _ = q.shape
  k_len = k.shape[1]

  def per_head(x):  # (b, t, h, d) -> (b * h, 1, t, 1, d): one attention problem per row.
    return x.transpose(0, 2, 1, 3).reshape(batch * heads, 1, x.shape[1], 1, x.shape[3])

  def attend(qkv):
    return ops.dot_product_attention(*qkv, causal=causal, implementation="xla")

  group = max(1, min(batch * heads, _REFERENCE_LOGITS_BYTES // (q_len * k_len * 4)))
  out = jax.jit(lambda q, k, v: jax.lax.map(
      attend, (per_head(q), per_head(k), per_head(v)), batch_size=group))(q, k, v)
  return out.reshape(batch, heads, q_len, -1).transpose(0, 2, 1, 3).astype(jnp.float32)


def bench_one(name, shape, inputs, reference, *, iters, warmup):
  """One row: times, TFLOP/s, memory and error of implementation `name` on `shape`."""
  q, k, v, cotangent = inputs
  attend = attention_function(name)
  segment_ids = shape.segment_ids()
  row = {"implementation": name, "shape": shape.label, "batch": shape.batch,
         "layout": shape.layout, "images": len(shape.images) or None,
         "q_len": shape.q_len, "k_len": shape.k_len, "heads": shape.heads,
         "head_dim": shape.head_dim, "causal": shape.causal, "dtype": str(q.dtype),
         "fwd_flops": shape.forward_flops, "fwd_bwd_flops": 7 * shape.forward_flops // 2,
         "fwd_ms": None, "fwd_bwd_ms": None, "fwd_tflops": None, "fwd_bwd_tflops": None,
         "fwd_temp_mib": None, "fwd_bwd_temp_mib": None, "max_abs_diff": None,
         "fwd_error": None, "fwd_bwd_error": None}

  def forward(q, k, v):
    if segment_ids is None:
      return attend(q, k, v, shape.causal)
    return attend(q, k, v, shape.causal, segment_ids=segment_ids)

  def loss(q, k, v, cotangent):
    return jnp.sum(forward(q, k, v).astype(jnp.float32) * cotangent)

  try:
    compiled = jax.jit(forward).lower(q, k, v).compile()
    row["fwd_temp_mib"] = _temp_mib(compiled)
    out = jax.block_until_ready(compiled(q, k, v))
    if reference is not None:
      row["max_abs_diff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference)))
    del out
    row["fwd_ms"] = _median_ms(compiled, (q, k, v), iters, warmup)
    row["fwd_tflops"] = row["fwd_flops"] / (row["fwd_ms"] * 1e-3) / 1e12
  except Exception as error:  # pylint: disable=broad-except
    row["fwd_error"] = _failure(error)
    row["fwd_bwd_error"] = row["fwd_error"]  # The backward pass needs the forward one.
    return row

  try:
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, cotangent).compile()
    row["fwd_bwd_temp_mib"] = _temp_mib(compiled)
    row["fwd_bwd_ms"] = _median_ms(compiled, (q, k, v, cotangent), iters, warmup)
    row["fwd_bwd_tflops"] = row["fwd_bwd_flops"] / (row["fwd_bwd_ms"] * 1e-3) / 1e12
  except Exception as error:  # pylint: disable=broad-except
    row["fwd_bwd_error"] = _failure(error)
  return row


def run(implementations, shapes, dtype, *, iters, warmup, on_row=None):
  """Rows for every shape x implementation; `on_row(row)` is called as each one finishes."""
  rows = []
  for shape in shapes:
    inputs = make_inputs(shape, dtype)
    try:
      reference = reference_output(*inputs[:3], shape.causal, shape.segment_ids())
    except Exception:  # pylint: disable=broad-except
      reference = None  # The error column then says n/a; the timings still run.
    for name in implementations:
      row = bench_one(name, shape, inputs, reference, iters=iters, warmup=warmup)
      rows.append(row)
      if on_row:
        on_row(row)
    del inputs, reference
  return rows


# (row key, plain-text title, Markdown title).
_COLUMNS = (
    ("implementation", "impl", "impl"),
    ("shape", "shape", "B x T x H x D"),
    ("causal", "causal", "causal"),
    ("fwd_ms", "fwd ms", "fwd ms"),
    ("fwd_tflops", "fwd TFLOP/s", "fwd TFLOP/s"),
    ("fwd_bwd_ms", "fwd+bwd ms", "fwd+bwd ms"),
    ("fwd_bwd_tflops", "fwd+bwd TFLOP/s", "fwd+bwd TFLOP/s"),
    ("fwd_temp_mib", "fwd temp MiB", "fwd temp MiB (XLA memory analysis)"),
    ("fwd_bwd_temp_mib", "fwd+bwd temp MiB", "fwd+bwd temp MiB (XLA memory analysis)"),
    ("max_abs_diff", "max|diff| vs xla", "max abs diff vs xla"),
    ("note", "note", "note"),
)
_WIDTHS = {"implementation": 24, "shape": 30}  # NaViT rows: "2x256x4x32 packed (9 images)".


def _number(x):
  if x >= 100:
    return f"{x:.0f}"
  return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _cells(row):
  """Table cells of a row: numbers, or 'n/a'/'OOM' with the reason once in the note."""
  errors = {"fwd": row["fwd_error"], "fwd_bwd": row["fwd_bwd_error"]}
  cells = {"implementation": row["implementation"], "shape": row["shape"],
           "causal": "yes" if row["causal"] else "no"}
  for key in ("fwd_ms", "fwd_tflops", "fwd_temp_mib", "fwd_bwd_ms", "fwd_bwd_tflops",
              "fwd_bwd_temp_mib"):
    cells[key] = "-" if row[key] is None else _number(row[key])
  for key, error in (("fwd_ms", errors["fwd"]), ("fwd_bwd_ms", errors["fwd_bwd"])):
    if error:
      cells[key] = error.split(":")[0]  # 'n/a' or 'OOM'; the reason goes in the note.
  diff = row["max_abs_diff"]
  if diff is not None:
    cells["max_abs_diff"] = f"{diff:.1e}"
  else:  # No output to compare, or no reference ('xla' itself failed).
    cells["max_abs_diff"] = "-" if errors["fwd"] else "n/a"
  cells["note"] = ""
  if errors["fwd"] and errors["fwd"] != "OOM":
    cells["note"] = errors["fwd"].removeprefix("n/a: ")
  elif errors["fwd_bwd"] and errors["fwd_bwd"] != "OOM":
    cells["note"] = "fwd+bwd: " + errors["fwd_bwd"].removeprefix("n/a: ")
  return cells


def header_lines(command, platform, dtype, iters, warmup, markdown=False):
  """Where and how the numbers were taken: device, jax version, date, command."""
  device = jax.devices()[0]
  extras = []
  for module in sorted({module for module, _ in EXTERNAL.values()}):
    try:
      extras.append(f"{module} {importlib.metadata.version(module.replace('_', '-'))}")
    except importlib.metadata.PackageNotFoundError:
      pass
  lines = [
      f"Attention benchmark on {device.device_kind}"
      + ("" if device.device_kind == platform else f" ({platform})") + f", jax {jax.__version__}"
      + "".join(f", {e}" for e in extras) + f", {datetime.date.today().isoformat()}.",
      f"Command: `{command}`" if markdown else f"Command: {command}",
      f"dtype {jnp.dtype(dtype).name}; time per call: median of {iters} samples after "
      f"{warmup} warm-up calls, compilation excluded (calls under "
      f"{_MIN_SAMPLE_SECONDS * 1e3:g} ms run back to back within a sample). "
      "FLOPs: forward 4*B*Tq*Tk*H*D (halved when causal), fwd+bwd 3.5x forward.",
      "Memory (temp MiB): temporaries + outputs of the compiled executable by XLA's memory "
      "analysis. max|diff|: largest absolute difference of the forward output from 'xla', "
      "in float32.",
  ]
  if platform == "cpu":
    lines.append("CPU: these numbers are for smoke-testing only; they say nothing about GPU "
                 "kernels (Pallas runs in interpret mode on the CPU).")
  return lines


def _format_plain(cells, titles=False):
  out = []
  for key, plain, _ in _COLUMNS:
    text = plain if titles else cells[key]
    width = max(len(plain), _WIDTHS.get(key, 0))
    left = key in ("implementation", "shape", "note")
    out.append(text.ljust(width) if left else text.rjust(width))
  return "  ".join(out).rstrip()


def _format_markdown(cells):
  return "| " + " | ".join(cells[key].replace("|", "\\|") for key, _, _ in _COLUMNS) + " |"


def main(argv=None):
  """Runs the benchmark, prints the table and returns the rows (a list of dicts)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(prog="python -m vitjax.tools.bench_attention",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--impl", help="comma-separated implementations (default: all available "
                      f"here of {', '.join(ops.IMPLEMENTATIONS)}, {', '.join(EXTERNAL)}); "
                      "pallas:BQxBK[xBQ_BWDxBK_BWD[xWARPSxSTAGES]] runs the Pallas kernels "
                      "with those tiles (a sweep: pallas:128x64,pallas:64x64x32x32x4x3)")
  parser.add_argument("--shapes", help="vit, long, all, cpu or BxTxHxD[,...] such as "
                      "8x1024x12x64 (BxTqxTkxHxD when lengths differ); default: all, or cpu "
                      "on a CPU")
  parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                      help="default: bfloat16, or float32 on a CPU")
  parser.add_argument("--causal", action="store_true",
                      help="causal attention only (by default the long shapes run both)")
  parser.add_argument("--packed", action="store_true",
                      help="also NaViT batches of each shape: images packed with segment ids "
                      "beside the same images padded one per sequence")
  parser.add_argument("--iters", type=int, default=20, help="timed samples; the median is reported")
  parser.add_argument("--warmup", type=int, default=3, help="untimed calls after compiling")
  parser.add_argument("--markdown", action="store_true", help="a Markdown table for BENCHMARKS.md")
  parser.add_argument("--json", metavar="PATH", help="also write all rows as JSON")
  args = parser.parse_args(argv)
  if args.iters < 1 or args.warmup < 0:
    parser.error("--iters must be at least 1 and --warmup at least 0")

  platform = jax.devices()[0].platform
  on_cpu = platform == "cpu"
  implementations = (args.impl.split(",") if args.impl else default_implementations(platform))
  try:
    for name in implementations:
      parse_block_sizes(name)
  except ValueError as error:
    parser.error(str(error))
  try:
    shapes = parse_shapes(args.shapes or ("cpu" if on_cpu else "all"), causal_only=args.causal)
  except ValueError as error:
    parser.error(str(error))
  if args.packed:
    shapes = [s for shape in shapes for s in (shape, *navit_layouts(shape))]
  dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))

  command = f"python -m vitjax.tools.bench_attention {shlex.join(argv)}".rstrip()
  header = header_lines(command, platform, dtype, args.iters, args.warmup, args.markdown)
  if args.markdown:  # The first line as a caption, the details as a list.
    header = header[:1] + [""] + ["- " + line for line in header[1:]]
  print("\n".join(header) + "\n", flush=True)
  if args.markdown:
    print("| " + " | ".join(title for _, _, title in _COLUMNS) + " |")
    print("|" + "|".join("---" if key in ("implementation", "shape", "causal", "note") else "---:"
                         for key, _, _ in _COLUMNS) + "|", flush=True)
    on_row = lambda row: print(_format_markdown(_cells(row)), flush=True)
  else:
    print(_format_plain(None, titles=True), flush=True)
    on_row = lambda row: print(_format_plain(_cells(row)), flush=True)

  rows = run(implementations, shapes, dtype, iters=args.iters, warmup=args.warmup, on_row=on_row)

  stats = jax.devices()[0].memory_stats()  # None on the CPU.
  if stats and "peak_bytes_in_use" in stats:
    print(f"\nDevice peak memory over the whole run (memory_stats): "
          f"{stats['peak_bytes_in_use'] / 2**20:.0f} MiB.")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"device": jax.devices()[0].device_kind, "platform": platform,
                 "jax": jax.__version__, "date": datetime.date.today().isoformat(),
                 "command": command, "dtype": dtype.name, "iters": args.iters, "warmup": args.warmup,
                 "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
