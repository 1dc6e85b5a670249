"""The affine map of every dense layer, `x @ kernel + bias`, with a backward pass for CPUs.

The value and the gradients are those of `x @ kernel + bias` over the last axis of `x`.
On a CPU the backward pass is arranged for XLA:CPU: the kernel's and the bias's gradients
come from one matmul, `[x, 1]^T @ g`, whose last row is the bias gradient. Left to
autodiff, the bias gradient is a sum of `g` over all its rows, which XLA:CPU rewrites into
reduce-windows (a tree reduction, several times slower than the matmul's extra row) and
which pulls the layout of `g` away from what the weight-gradient matmul wants (what it
gains: BENCHMARKS.md, the ablation of the CPU training step). On other platforms it is the
plain autodiff gradient: the extra row would cost a copy of `x` and misalign the
accelerator's matmul tiles, for sums their compilers already do well.
"""

import jax
from jax import lax
import jax.numpy as jnp


def _matmul(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _affine(x, kernel, bias):
  return _matmul(x, kernel) + bias


@jax.custom_vjp
def _affine_cpu(x, kernel, bias):
  return _affine(x, kernel, bias)


def _affine_cpu_forward(x, kernel, bias):
  return _affine(x, kernel, bias), (x, kernel)


def _affine_cpu_backward(residuals, g):
  x, kernel = residuals
  rows = x.reshape(-1, x.shape[-1])
  g = g.reshape(-1, g.shape[-1])
  dx = lax.dot_general(g, kernel, (((1,), (1,)), ((), ()))).reshape(x.shape)
  with_ones = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
  dkernel_and_bias = lax.dot_general(with_ones, g, (((0,), (0,)), ((), ())))
  return dx, dkernel_and_bias[:-1], dkernel_and_bias[-1]


_affine_cpu.defvjp(_affine_cpu_forward, _affine_cpu_backward)


def dense(x, kernel, bias=None):
  """`x @ kernel (+ bias)` over the last axis of `x`: kernel (features_in, features_out).

  All three arrays should already be in the compute dtype. Where a platform is decided at
  lowering, XLA keeps only that platform's branch.
  """
  if bias is None:
    return _matmul(x, kernel)
  return lax.platform_dependent(x, kernel, bias, cpu=_affine_cpu, default=_affine)
