"""The dense layers' affine map and the exact GELU: the values and gradients users rely on.

`vitjax.ops.dense` arranges its backward pass for XLA:CPU; whatever the arrangement, its
value and gradients must be those of `x @ kernel + bias`.

Run: python -m pytest -q tests/test_dense.py
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import ops
from vitjax.models import layers


def _inputs(shape=(2, 5, 7), features=3, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], (shape[-1], features))
  bias = jax.random.normal(keys[2], (features,))
  cotangent = jax.random.normal(keys[3], shape[:-1] + (features,))
  return x, kernel, bias, cotangent


@pytest.mark.parametrize("shape", [(2, 5, 7), (6, 7), (1, 2, 3, 7)])
def test_dense_value_and_gradients_match_numpy(shape):
  x, kernel, bias, cotangent = _inputs(shape)
  value, pullback = jax.vjp(ops.dense, x, kernel, bias)
  dx, dkernel, dbias = pullback(cotangent)
  x64, k64, b64, g64 = (np.asarray(a, np.float64) for a in (x, kernel, bias, cotangent))
  rows, g_rows = x64.reshape(-1, shape[-1]), g64.reshape(-1, g64.shape[-1])
  np.testing.assert_allclose(value, x64 @ k64 + b64, atol=1e-5)
  np.testing.assert_allclose(dx, g64 @ k64.T, atol=1e-5)
  np.testing.assert_allclose(dkernel, rows.T @ g_rows, atol=1e-5)
  np.testing.assert_allclose(dbias, g_rows.sum(0), atol=1e-5)


@pytest.mark.parametrize("contract,kernel_shape", [(1, (6, 2, 3)), (2, (2, 3, 5))])
def test_dense_contracts_several_kernel_axes_with_the_same_value_and_gradients(
    contract, kernel_shape):
  # The attention projections pass their kernels unreshaped: (width, heads, head_dim)
  # contracts one axis, (heads, head_dim, width) two; bias is the kernel's output shape.
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (2, 4) + kernel_shape[:contract])
  kernel = jax.random.normal(keys[1], kernel_shape)
  bias = jax.random.normal(keys[2], kernel_shape[contract:])
  out_shape = x.shape[:x.ndim - contract] + kernel_shape[contract:]
  cotangent = jax.random.normal(keys[3], out_shape)
  value, pullback = jax.vjp(lambda *a: ops.dense(*a, contract=contract), x, kernel, bias)
  dx, dkernel, dbias = pullback(cotangent)
  features_in = math.prod(kernel_shape[:contract])
  x64 = np.asarray(x, np.float64).reshape(-1, features_in)
  k64 = np.asarray(kernel, np.float64).reshape(features_in, -1)
  g64 = np.asarray(cotangent, np.float64).reshape(x64.shape[0], -1)
  assert value.shape == out_shape
  np.testing.assert_allclose(value.reshape(x64.shape[0], -1),
                             x64 @ k64 + np.asarray(bias).reshape(-1), atol=1e-5)
  np.testing.assert_allclose(dx.reshape(x64.shape), g64 @ k64.T, atol=1e-5)
  np.testing.assert_allclose(dkernel.reshape(k64.shape), x64.T @ g64, atol=1e-5)
  np.testing.assert_allclose(dbias.reshape(-1), g64.sum(0), atol=1e-5)
  with pytest.raises(ValueError, match="do not match"):
    ops.dense(x, kernel.reshape(-1, kernel_shape[-1])[:1], None, contract=contract)


def test_dense_without_bias_is_the_matmul():
  x, kernel, _, cotangent = _inputs()
  value, pullback = jax.vjp(ops.dense, x, kernel)
  dx, dkernel = pullback(cotangent)
  np.testing.assert_allclose(value, x @ kernel, atol=1e-5)
  np.testing.assert_allclose(dx, cotangent @ kernel.T, atol=1e-5)
  np.testing.assert_allclose(dkernel, jnp.einsum("bti,bto->io", x, cotangent), atol=1e-5)


def test_dense_keeps_bfloat16():
  x, kernel, bias, cotangent = (a.astype(jnp.bfloat16) for a in _inputs())
  value, pullback = jax.vjp(ops.dense, x, kernel, bias)
  assert value.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in pullback(cotangent))


def _gradient_hlo(platform):
  x, kernel, bias, _ = _inputs()
  grads = jax.grad(lambda *args: jnp.sum(ops.dense(*args) ** 2), argnums=(0, 1, 2))
  return jax.jit(grads).trace(x, kernel, bias).lower(lowering_platforms=(platform,)).as_text()


def test_cpu_backward_is_one_matmul_with_ones_other_platforms_plain_autodiff():
  # The CPU branch appends a column of ones to x for the kernel-and-bias matmul; lowered
  # for a GPU, only the plain branch is there.
  assert "concatenate" in _gradient_hlo("cpu")
  assert "concatenate" not in _gradient_hlo("cuda")


def test_dense_module_matches_flax_dense():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7))
  ours, theirs = layers.Dense(4), nn.Dense(4)
  params = ours.init(jax.random.key(1), x)
  assert (jax.tree_util.tree_map(jnp.shape, params)
          == jax.tree_util.tree_map(jnp.shape, theirs.init(jax.random.key(1), x)))
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)
  no_bias = layers.Dense(4, use_bias=False)
  assert set(no_bias.init(jax.random.key(1), x)["params"]) == {"kernel"}


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-8.0, 8.0, 4001)
  x64 = np.asarray(x, np.float64)
  erf = np.vectorize(math.erf)  # float64.
  exact = 0.5 * x64 * (1.0 + erf(x64 / np.sqrt(2.0)))
  np.testing.assert_allclose(layers.gelu(x), exact, atol=2e-6, rtol=1e-6)
  density = np.exp(-0.5 * x64 ** 2) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x),
                             0.5 * (1.0 + erf(x64 / np.sqrt(2.0))) + x64 * density, atol=2e-6)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  assert layers.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
