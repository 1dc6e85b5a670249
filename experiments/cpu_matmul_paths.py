"""ViT-S/16's matmuls (batch 8: 1,576 token rows) on this CPU, through each of XLA:CPU's dot
paths and through PyTorch, in one process: the matmul side of BENCHMARKS.md's "CPU speed by
vendor".

    taskset -c 0 python experiments/cpu_matmul_paths.py [--rounds 9]

Paths (compile options of `jax.jit`): 'eigen' (vitjax's CPU option: YNNPACK off, XLA's
Eigen contraction), 'ynnpack' (XLA's default), 'onednn' and 'xnnpack' (their dot fusions
asked for on top of 'eigen'). For each it says whether the option changed the compiled
executable at all (an XLA built without that library ignores the option), and prints
GFLOP/s from the median of `--rounds` calls (the first two dropped), the paths and PyTorch
alternating call by call, and the largest difference from the first path. PyTorch gets as
many threads as the cores this process may use.
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np
import torch

ROWS = 8 * 197
# name, lhs shape, rhs shape, transposes: the MLP's and attention projections' forward
# matmuls, and fc1's weight and input gradients.
SHAPES = (
    ("fc1 forward", (ROWS, 384), (384, 1536), ""),
    ("fc2 forward", (ROWS, 1536), (1536, 384), ""),
    ("qkv forward", (ROWS, 384), (384, 384), ""),
    ("fc1 weight gradient", (ROWS, 384), (ROWS, 1536), "lhs"),
    ("fc1 input gradient", (ROWS, 1536), (384, 1536), "rhs"),
)
EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
PATHS = {
    "eigen": EIGEN,
    "ynnpack": None,
    "onednn": {**EIGEN, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnnpack": {**EIGEN, "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


def matmul(transpose):
  if transpose == "lhs":
    return lambda a, b: a.T @ b
  if transpose == "rhs":
    return lambda a, b: a @ b.T
  return lambda a, b: a @ b


def flops(lhs, rhs, transpose):
  m, k = lhs[::-1] if transpose == "lhs" else lhs
  n = rhs[0] if transpose == "rhs" else rhs[1]
  return 2 * m * k * n


def hlo_body(compiled):
  """The executable's HLO without metadata: equal text, same program."""
  return "\n".join(line.split(", metadata=")[0] for line in compiled.as_text().splitlines()
                   if not line.startswith("HloModule"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=9)
  args = parser.parse_args()
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  print(f"{threads} thread(s); jax {jax.__version__}, torch {torch.__version__}")
  for name, lhs_shape, rhs_shape, transpose in SHAPES:
    lhs = jax.random.normal(jax.random.key(0), lhs_shape)
    rhs = jax.random.normal(jax.random.key(1), rhs_shape)
    fn = matmul(transpose)
    calls, notes, reference, eigen_hlo = {}, {}, None, None
    for path, options in PATHS.items():
      compiled = jax.jit(fn, compiler_options=options).lower(lhs, rhs).compile()
      body = hlo_body(compiled)
      eigen_hlo = eigen_hlo or body
      out = np.asarray(compiled(lhs, rhs))
      reference = out if reference is None else reference
      if path != "eigen" and body == eigen_hlo:
        notes[path] = "same executable as eigen"
      else:
        notes[path] = f"max diff {np.max(np.abs(out - reference)):.1e}"
      calls[path] = lambda c=compiled: c(lhs, rhs).block_until_ready()
    torch_lhs, torch_rhs = torch.tensor(np.asarray(lhs)), torch.tensor(np.asarray(rhs))
    calls["pytorch"] = lambda: fn(torch_lhs, torch_rhs)
    notes["pytorch"] = ""
    times = {path: [] for path in calls}
    for _ in range(args.rounds):
      for path, call in calls.items():
        start = time.perf_counter()
        call()
        times[path].append(time.perf_counter() - start)
    work = flops(lhs_shape, rhs_shape, transpose)
    print(f"{name} ({'x'.join(map(str, lhs_shape))} @ {'x'.join(map(str, rhs_shape))}"
          f"{', ' + transpose + ' transposed' if transpose else ''}):")
    for path, t in times.items():
      rate = work / statistics.median(t[2:]) / 1e9
      print(f"  {path:8s} {rate:6.0f} GFLOP/s  {notes[path]}")


if __name__ == "__main__":
  main()
