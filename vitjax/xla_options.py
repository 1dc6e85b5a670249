"""Per-compilation XLA options that make vitjax faster on a backend, where this JAX knows them.

On a CPU, jax 0.10's XLA hands dots, reductions and the attention softmax to YNNPACK;
its own (Eigen) dot kernels ran ViT-S/16 inference faster (BENCHMARKS.md has the figure
and its machine). Only the order of float32 sums changes. Options are dropped, once per
process, where the installed XLA rejects them (names change between releases).
"""

import functools

import jax
import jax.numpy as jnp

CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def _accepted(backend, options):
  try:
    # An input committed to a device of `backend` compiles for that backend.
    probe = jax.device_put(jnp.zeros(()), jax.devices(backend)[0])
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(probe).compile()
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def compiler_options(backend=None):
  """Options for `jax.jit(..., compiler_options=)` on `backend` (default: JAX's), or None."""
  backend = backend or jax.default_backend()
  if backend != "cpu" or not CPU_COMPILER_OPTIONS:
    return None
  options = tuple(sorted(CPU_COMPILER_OPTIONS.items()))
  return dict(options) if _accepted(backend, options) else None
