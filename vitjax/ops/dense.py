"""The affine map of every dense layer, `x @ kernel + bias`, with a backward pass for CPUs.

The value and the gradients are those of `x @ kernel + bias`, contracting the last
`contract` axes of `x` with the first `contract` axes of `kernel` (1 for a plain dense
layer; the attention's output projection contracts (heads, head_dim)). On a CPU the
backward pass is arranged for XLA:CPU: the kernel's and the bias's gradients come from
one matmul, `[x, 1]^T @ g`, whose last row is the bias gradient. Left to autodiff, the
bias gradient is a sum of `g` over all its rows, which XLA:CPU rewrites into
reduce-windows (a tree reduction, several times slower than the matmul's extra row) and
which pulls the layout of `g` away from what the weight-gradient matmul wants (what it
gains: BENCHMARKS.md, the ablation of the CPU training step). On other platforms it is the
plain autodiff gradient: the extra row would cost a copy of `x` and misalign the
accelerator's matmul tiles, for sums their compilers already do well.

Under a qwix quantization provider (vitjax.quantize) that claims the current module's
`dot_general`, the map is the plain `lax.dot_general` of the unreshaped kernel: qwix
recognises a weight by the parameter it is, and swaps in its quantized value, which it
could not do through a reshape or inside the CPU branch's custom VJP.
"""

import functools
import math
import sys

import jax
from jax import lax
import jax.numpy as jnp


def _matmul(x, kernel, contract):
  x_axes = tuple(range(x.ndim - contract, x.ndim))
  return lax.dot_general(x, kernel, ((x_axes, tuple(range(contract))), ((), ())))


def _affine(x, kernel, bias, contract):
  return _matmul(x, kernel, contract) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _affine_cpu(x, kernel, bias, contract):
  return _affine(x, kernel, bias, contract)


def _affine_cpu_forward(x, kernel, bias, contract):
  return _affine(x, kernel, bias, contract), (x, kernel)


def _affine_cpu_backward(contract, residuals, g):
  x, kernel = residuals
  features_in = math.prod(kernel.shape[:contract])
  kernel_2d = kernel.reshape(features_in, -1)
  rows = x.reshape(-1, features_in)
  g = g.reshape(-1, kernel_2d.shape[1])
  dx = lax.dot_general(g, kernel_2d, (((1,), (1,)), ((), ()))).reshape(x.shape)
  with_ones = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
  dkernel_and_bias = lax.dot_general(with_ones, g, (((0,), (0,)), ((), ())))
  return (dx, dkernel_and_bias[:-1].reshape(kernel.shape),
          dkernel_and_bias[-1].reshape(kernel.shape[contract:]))


_affine_cpu.defvjp(_affine_cpu_forward, _affine_cpu_backward)


def _quantizer_intercepts_dot_general():
  """Whether a qwix provider (vitjax.quantize) has a rule for this module's dot_general.

  Every qwix provider intercepts `qwix._src.qconfig.get_current_rule` while a quantized
  model runs; read through sys.modules so that vitjax never imports qwix for this.
  """
  qconfig = sys.modules.get("qwix._src.qconfig")
  return qconfig is not None and qconfig.get_current_rule("dot_general") is not None


def dense(x, kernel, bias=None, contract=1):
  """`x @ kernel (+ bias)`: the last `contract` axes of `x` with the first of `kernel`.

  kernel (features_in..., features_out...), where features_in are the last `contract`
  axes of `x`; bias (features_out...); the result is (x's leading axes...,
  features_out...). All three arrays should already be in the compute dtype. Where a
  platform is decided at lowering, XLA keeps only that platform's branch.
  """
  if x.shape[x.ndim - contract:] != kernel.shape[:contract]:
    raise ValueError(f"dense: x {x.shape} and kernel {kernel.shape} do not match on the "
                     f"{contract} contracted axes.")
  if bias is None:
    return _matmul(x, kernel, contract)
  if _quantizer_intercepts_dot_general():
    return _affine(x, kernel, bias, contract)
  return lax.platform_dependent(
      x, kernel, bias, cpu=lambda *arrays: _affine_cpu(*arrays, contract),
      default=lambda *arrays: _affine(*arrays, contract))
