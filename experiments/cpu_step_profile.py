"""Where a CPU training step's time goes, vitjax's and PyTorch's, op by op: what BENCHMARKS.md's
"CPU speed by vendor" asks of a machine it has no figures for.

    taskset -c 0 python experiments/cpu_step_profile.py [--model vit_small_patch16_224]
        [--batch 8] [--steps 2] [--top 25]

One process, one core (run it under `taskset -c 0`, so that each op's time is the time it
takes and not its share of two threads). The vitjax side is the benchmark's train step
(`vitjax.tools.benchmark.build_vitjax`, vitjax's CPU compile options), profiled with
`jax.profiler` over `--steps` steps: the time of each HLO instruction of the compiled step,
grouped by its opcode (dot, fusion, copy, ...) and the JAX operation it came from (the
last name of its `op_name` metadata, "backward" where it is under a `transpose`), and the
costliest instructions other than dots one by one (`--instructions`); plus the process's
system time and minor page faults per step (`getrusage`). The PyTorch side is
the benchmark's transformers ViT step under `torch.profiler`: self CPU time per aten op.
Each side prints ms per step and its share of the profiled step.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from vitjax.tools import benchmark

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FUSION_KIND = re.compile(r"kind=(k\w+)")


def hlo_sources(compiled):
  """{instruction name: (label, output shape, op_name)} for the instructions of the
  compiled step; label: 'opcode source'."""
  sources = {}
  for line in compiled.as_text().splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    op_name = _OP_NAME.search(line)
    path = op_name.group(1) if op_name else ""
    source = path.rsplit("/", 1)[-1] or "?"
    if "transpose(" in path:
      source += " (backward)"
    kind = _FUSION_KIND.search(line) if opcode == "fusion" else None
    label = f"{opcode}{'/' + kind.group(1) if kind else ''}"
    if "ynn" in name:
      label = "ynn fusion"
    shape = line.split(" = ", 1)[1].split(" ", 1)[0]
    sources[name] = (f"{label} {source}", shape, path)
  return sources


def trace_op_times(directory, sources, steps):
  """ms per step of each HLO instruction, read from the Perfetto trace in `directory`."""
  path = glob.glob(f"{directory}/**/perfetto_trace.json.gz", recursive=True)[0]
  with gzip.open(path, "rt", encoding="utf-8") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  times = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in sources:
      times[event["name"]] += event.get("dur", 0) / 1e3 / steps
  return times


def warm_and_time(run_step, steps):
  """Seconds per step of `steps` steps after 2 warm-up steps, and the process's resource
  usage over them (before, after)."""
  for _ in range(2):
    run_step()
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(steps):
    run_step()
  wall = (time.perf_counter() - start) / steps
  return wall, before, resource.getrusage(resource.RUSAGE_SELF)


def vitjax_profile(args, model, inputs, steps, instructions):
  run_step, compiled, _, _ = benchmark.build_vitjax(args, jnp.float32, inputs,
                                                    benchmark.compiler_options("cpu"),
                                                    model=model)
  wall, before, after = warm_and_time(run_step, steps)
  directory = tempfile.mkdtemp(prefix="cpu_step_profile_")
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for _ in range(steps):
      run_step()
  sources = hlo_sources(compiled)
  per_op = trace_op_times(directory, sources, steps)
  grouped = collections.Counter()
  for name, ms in per_op.items():
    grouped[sources[name][0]] += ms
  # The costliest instructions that are not dots: where the rest of the step goes.
  others = [(ms, name, *sources[name][1:]) for name, ms in per_op.most_common()
            if not sources[name][0].startswith("dot")]
  usage = {"others": others[:instructions], "wall": wall,
           "system": (after.ru_stime - before.ru_stime) / steps,
           "faults": (after.ru_minflt - before.ru_minflt) / steps}
  return grouped, usage


def torch_profile(args, model, inputs, steps):
  import torch  # pylint: disable=import-outside-toplevel
  from torch import profiler  # pylint: disable=import-outside-toplevel
  run_step, _ = benchmark.build_torch("transformers", model, args, "float32", inputs, "cpu")
  wall, _, _ = warm_and_time(run_step, steps)
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      run_step()
  grouped = collections.Counter()
  for event in prof.key_averages():
    grouped[event.key] += event.self_cpu_time_total / 1e3 / steps
  return grouped, {"wall": wall, "threads": torch.get_num_threads()}


def print_table(title, grouped, top):
  total = sum(grouped.values())
  print(f"\n{title}: {total:,.0f} ms per step in profiled ops")
  for label, ms in grouped.most_common(top):
    print(f"  {ms:9.1f} ms  {100 * ms / total:5.1f}%  {label}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="vit_small_patch16_224")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=25, help="rows of each table")
  parser.add_argument("--instructions", type=int, default=30,
                      help="vitjax's costliest instructions other than dots to list")
  options = parser.parse_args(argv)
  if min(options.batch, options.steps) < 1:
    parser.error("--batch and --steps must be at least 1")
  args = benchmark.parse_args(["--model", options.model, "--batch", str(options.batch),
                               "--mode", "train"])
  from vitjax import models, xla_options  # pylint: disable=import-outside-toplevel
  model = models.create_model(options.model, **benchmark.model_overrides(args, jnp.float32))
  inputs = benchmark.step_inputs(model, options.batch, False)
  print(f"{xla_options.cpu_model_name()}, {benchmark.cpu_threads()} core(s); train step of "
        f"{options.model}, batch {options.batch}, float32")
  grouped, usage = vitjax_profile(args, model, inputs, options.steps, options.instructions)
  print(f"vitjax: {usage['wall'] * 1e3:,.0f} ms per step unprofiled; system time "
        f"{usage['system'] * 1e3:,.0f} ms and {usage['faults']:,.0f} minor page faults per step")
  print_table("vitjax, by HLO opcode and JAX operation", grouped, options.top)
  print("\nvitjax, the costliest instructions other than dots (ms per step, output, op_name):")
  for ms, name, shape, path in usage["others"]:
    print(f"  {ms:7.1f} ms  {name[:30]:30s} {shape[:34]:34s} {path[-100:]}")
  grouped, usage = torch_profile(args, model, inputs, options.steps)
  print(f"\nPyTorch (transformers ViT, eager, {usage['threads']} threads): "
        f"{usage['wall'] * 1e3:,.0f} ms per step unprofiled")
  print_table("PyTorch, self CPU time by aten op", grouped, options.top)
  return 0


if __name__ == "__main__":
  sys.exit(main())
