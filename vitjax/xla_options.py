"""Per-compilation XLA options that make vitjax faster on a backend, where this JAX knows them.

On a CPU, jax 0.10's XLA hands dots, reductions and the attention softmax to YNNPACK;
its own (Eigen) dot kernels ran ViT-S/16 inference faster (BENCHMARKS.md has the figure
and its machine). Only the order of float32 sums changes. Options are dropped, once per
process, where the installed XLA rejects them (names change between releases).

The user's XLA_FLAGS win: an option named there is left out of vitjax's, since an option
passed to `jax.jit(compiler_options=)` would silently override it. So
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT` reaches the
trainer's step as written.

The option was measured on an AMD EPYC (Zen 4, AVX-512) only. On an Intel Xeon, issue #22
reports the same speed with and without it (BENCHMARKS.md, "CPU speed by vendor"): there is
no evidence yet for another choice on another vendor, so one set serves every CPU.
`cpu_model_name()` names the CPU in the benchmark's output and BENCHMARKS.md's rows.
"""

import functools
import os
import platform
import shlex

import jax
import jax.numpy as jnp

CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def rejection(backend, options):
  """Why this XLA rejects the compile `options` (a dict) on `backend`: the first line of its
  error, or None where a small program compiles with them."""
  try:
    # An input committed to a device of `backend` compiles for that backend.
    probe = jax.device_put(jnp.zeros(()), jax.devices(backend)[0])
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(probe).compile()
  except Exception as error:  # pylint: disable=broad-except
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
  return None


@functools.lru_cache(maxsize=None)
def _accepted(backend, options):
  return rejection(backend, dict(options)) is None


def xla_flag_names(xla_flags=None):
  """The option names that `xla_flags` (default: the XLA_FLAGS variable) sets.

  '--xla_foo=1 --xla_bar' -> {'xla_foo', 'xla_bar'}; words that are not flags are ignored
  (XLA itself rejects them when it starts).
  """
  text = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  try:
    words = shlex.split(text)
  except ValueError:  # Unbalanced quotes: XLA splits on whitespace.
    words = text.split()
  return {word[2:].partition("=")[0] for word in words if word.startswith("--")}


def compiler_options(backend=None):
  """Options for `jax.jit(..., compiler_options=)` on `backend` (default: JAX's), or None.

  Options that XLA_FLAGS sets are left out: the user's setting stands.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return None
  user = xla_flag_names()
  options = tuple(sorted((k, v) for k, v in CPU_COMPILER_OPTIONS.items() if k not in user))
  if not options:
    return None
  return dict(options) if _accepted(backend, options) else None


@functools.lru_cache(maxsize=None)
def cpu_model_name():
  """The CPU's model name as `lscpu` prints it ('AMD EPYC', 'Intel(R) Xeon(R) ...')."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return model_name_of(f.read()) or platform.processor() or "unknown CPU"
  except OSError:  # Not Linux.
    return platform.processor() or platform.machine() or "unknown CPU"


def model_name_of(cpuinfo):
  """The first 'model name' of a /proc/cpuinfo text, spaces collapsed, or ''."""
  for line in cpuinfo.splitlines():
    key, colon, value = line.partition(":")
    if colon and key.strip() == "model name":
      return " ".join(value.split())
  return ""
