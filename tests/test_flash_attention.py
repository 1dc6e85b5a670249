"""vitjax's Pallas flash attention (interpret mode on the CPU) against the 'xla' reference.

Outputs and gradients for q, k, v and the bias, over lengths that are and are
not multiples of the block size, several head dims and head counts, with masks,
segment ids, causal masking and biases. The same kernels are also lowered for
GPUs (Triton) and TPUs (Mosaic) from the CPU, so a change the accelerators'
Pallas front ends reject fails here, not on the first accelerator run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import ops

TOLERANCE = {jnp.float32: 5e-5, jnp.bfloat16: 4e-2, jnp.float16: 5e-3}


def make_inputs(batch, q_len, k_len, heads, head_dim, *, dtype=jnp.float32, bias=False,
                mask=False, segments=False, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, k_len, heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, k_len, heads, head_dim), dtype)
  kwargs = {}
  if bias:  # Per head, shared over the batch: Swin's relative position bias.
    kwargs["bias"] = jax.random.normal(keys[3], (1, heads, q_len, k_len), jnp.float32)
  if mask:  # Key padding: the last keys of each example are padding.
    valid = jnp.array([max(1, k_len - 3 * b - 1) for b in range(batch)])
    kwargs["mask"] = (jnp.arange(k_len)[None, :] < valid[:, None])[:, None, None, :]
  if segments:  # Packed sequences: examples of random lengths back to back.
    assert q_len == k_len
    boundaries = jax.random.randint(keys[4], (batch, 3), 0, q_len)
    kwargs["segment_ids"] = jnp.sum(jnp.arange(q_len)[None, :, None] >= boundaries[:, None, :],
                                    axis=-1)
  return q, k, v, kwargs, jax.random.normal(keys[5], (batch, q_len, heads, head_dim), dtype)


def assert_matches_reference(q, k, v, kwargs, cotangent, causal=False, **pallas_options):
  tolerance = TOLERANCE[q.dtype.type]
  differentiable = {"bias": kwargs["bias"]} if "bias" in kwargs else {}
  fixed = {name: value for name, value in kwargs.items() if name != "bias"}

  def loss(implementation, q, k, v, differentiable):
    if implementation == "pallas" and pallas_options:
      out = ops.flash_attention(q, k, v, causal=causal, **pallas_options, **fixed,
                                **differentiable)
    else:
      out = ops.dot_product_attention(q, k, v, causal=causal, implementation=implementation,
                                      **fixed, **differentiable)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  results = {}
  for implementation in ("xla", "pallas"):
    grad_fn = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    (_, out), grads = grad_fn(implementation, q, k, v, differentiable)
    results[implementation] = (out, grads)
  (out_ref, grads_ref), (out, grads) = results["xla"], results["pallas"]
  assert out.shape == q.shape and out.dtype == q.dtype
  scale = lambda x: 1.0 + float(jnp.max(jnp.abs(x.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32),
                             atol=tolerance * scale(out_ref), err_msg="output")
  names = ["dq", "dk", "dv"] + [f"d{n}" for n in differentiable]
  flat, flat_ref = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)
  for name, grad, grad_ref in zip(names, flat, flat_ref):
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(grad_ref, np.float32),
                               atol=tolerance * scale(grad_ref), err_msg=name)


# (batch, q_len, k_len, heads, head_dim, options): lengths 1, 7, 64, 197, 577, q_len != k_len,
# head dims 32 / 64 / 128, heads 1 to 12; plain, masks, segment ids, causal, bias.
CASES = [
    (2, 1, 1, 1, 32, {}),
    (2, 7, 7, 3, 32, {}),
    (1, 64, 64, 12, 64, {}),
    (2, 197, 197, 3, 64, {}),
    (1, 577, 577, 1, 64, {}),
    (1, 1, 64, 2, 32, {}),
    (2, 7, 197, 2, 64, {}),
    (1, 197, 64, 2, 128, {}),
    (2, 64, 64, 2, 128, dict(mask=True)),
    (3, 197, 197, 2, 32, dict(mask=True)),
    (2, 64, 64, 4, 32, dict(segments=True)),
    (2, 197, 197, 2, 64, dict(segments=True)),
    (2, 64, 64, 2, 64, dict(causal=True)),
    (1, 197, 197, 3, 32, dict(causal=True)),
    (1, 7, 64, 2, 32, dict(causal=True)),   # Decoding the last 7 positions.
    (1, 64, 7, 2, 32, dict(causal=True)),   # Early queries see no key: zeros.
    (1, 1, 1, 1, 128, dict(bias=True)),
    (2, 49, 49, 3, 32, dict(bias=True)),    # A Swin window.
    (1, 197, 197, 12, 64, dict(bias=True)),
    (1, 64, 197, 2, 128, dict(bias=True, mask=True)),
    (2, 197, 197, 2, 64, dict(bias=True, mask=True, causal=True)),
    (2, 64, 64, 2, 32, dict(bias=True, segments=True, causal=True)),
]


@pytest.mark.parametrize("batch,q_len,k_len,heads,head_dim,options", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}-{'-'.join(c[5]) or 'plain'}"
                              for c in CASES])
def test_pallas_matches_xla_float32(batch, q_len, k_len, heads, head_dim, options):
  options = dict(options)
  causal = options.pop("causal", False)
  q, k, v, kwargs, cotangent = make_inputs(batch, q_len, k_len, heads, head_dim, **options)
  assert_matches_reference(q, k, v, kwargs, cotangent, causal=causal)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_pallas_half_precision(dtype):
  q, k, v, kwargs, cotangent = make_inputs(2, 197, 197, 3, 64, dtype=dtype, mask=True, bias=True)
  assert_matches_reference(q, k, v, kwargs, cotangent, causal=True)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_accelerator_tiles_match_xla(platform):
  """The GPU and TPU default tiles (larger, unequal forward/backward); interpreted
  except on their own platform."""
  blocks = ops.BlockSizes.default(128, platform)
  assert blocks != ops.BlockSizes.default(128, "cpu")
  q, k, v, kwargs, cotangent = make_inputs(1, 577, 577, 2, 128, bias=True, mask=True)
  assert_matches_reference(q, k, v, kwargs, cotangent, causal=True, block_sizes=blocks,
                           interpret=platform != jax.default_backend())


def test_fully_masked_rows_are_zero_with_zero_gradients():
  q, k, v, _, cotangent = make_inputs(1, 20, 20, 2, 32)
  mask = jnp.ones((1, 1, 20, 20), bool).at[:, :, 3].set(False)
  assert_matches_reference(q, k, v, {"mask": mask}, cotangent)
  out = ops.dot_product_attention(q, k, v, mask=mask, implementation="pallas")
  np.testing.assert_array_equal(out[:, 3], 0.0)


def test_explicit_block_sizes_give_the_same_result():
  q, k, v, kwargs, _ = make_inputs(2, 100, 100, 2, 64, bias=True, mask=True)
  reference = ops.flash_attention(q, k, v, causal=True, **kwargs)
  for blocks in (ops.BlockSizes(16, 32, 32, 16), ops.BlockSizes(64, 16, 16, 64)):
    np.testing.assert_allclose(ops.flash_attention(q, k, v, causal=True, block_sizes=blocks,
                                                   **kwargs), reference, atol=2e-6)


def test_non_power_of_two_head_dim_is_padded_inside():
  q, k, v, kwargs, cotangent = make_inputs(1, 50, 50, 2, 80, bias=True)  # ViT-H/14: 1280 / 16.
  assert_matches_reference(q, k, v, kwargs, cotangent)


def test_jit_and_vmap_compose():
  # vmap over a leading axis of independent attention problems (an ensemble, say),
  # each with its own bias, under jit; checked problem by problem against 'xla'.
  q, k, v, _, _ = make_inputs(2, 33, 33, 2, 32)
  stack = lambda x: jnp.stack([x, 0.5 * x[:, ::-1], -x])
  bias = jax.random.normal(jax.random.PRNGKey(4), (3, 1, 2, 33, 33))
  attend = lambda q, k, v, bias, impl: ops.dot_product_attention(q, k, v, bias=bias,
                                                                 implementation=impl)
  batched = jax.jit(jax.vmap(lambda q, k, v, bias: attend(q, k, v, bias, "pallas")))
  got = batched(stack(q), stack(k), stack(v), bias)
  assert got.shape == (3,) + q.shape
  for i in range(3):
    want = attend(stack(q)[i], stack(k)[i], stack(v)[i], bias[i], "xla")
    np.testing.assert_allclose(got[i], want, atol=2e-6)


@pytest.mark.parametrize("bias_shape", ["1x1xTqxTk", "Bx1xTqxTk", "BxHxTqxTk"])
def test_bias_gradient_has_the_bias_shape(bias_shape):
  """A broadcast bias gets its gradient summed over the broadcast dimensions, in its own shape."""
  batch, q_len, k_len, heads = 2, 40, 50, 3
  q, k, v, _, cotangent = make_inputs(batch, q_len, k_len, heads, 32)
  shape = {"1x1xTqxTk": (1, 1, q_len, k_len), "Bx1xTqxTk": (batch, 1, q_len, k_len),
           "BxHxTqxTk": (batch, heads, q_len, k_len)}[bias_shape]
  bias = jax.random.normal(jax.random.PRNGKey(5), shape)
  assert_matches_reference(q, k, v, {"bias": bias}, cotangent)
  d_bias = jax.grad(lambda b: jnp.sum(ops.flash_attention(q, k, v, bias=b) * cotangent))(bias)
  assert d_bias.shape == shape


def _kernel_outputs(fn, *args):
  """{kernel name: [output shapes]} of every vitjax Pallas kernel in fn's jaxpr."""
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call" and str(eqn.params.get("name", "")) in KERNELS:
        found.setdefault(str(eqn.params["name"]), []).extend(
            tuple(var.aval.shape) for var in eqn.outvars)
      for param in eqn.params.values():  # Nested jaxprs: pjit, custom_vjp, loops, conds.
        for sub in (param if isinstance(param, (tuple, list)) else (param,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_constant_bias_gets_no_gradient_kernel_output():
  """A bias nobody differentiates (Swin's shift mask, iLLaMA's soft mask, a stop_gradient)
  costs no (batch, heads, q_len, k_len) dS in the backward pass."""
  batch, seq, heads, head_dim = 2, 50, 2, 32  # Padded inside to 64 x 64; head_dim stays 32.
  q, k, v, _, cotangent = make_inputs(batch, seq, seq, heads, head_dim)
  bias = jax.random.normal(jax.random.PRNGKey(6), (1, 1, seq, seq))
  loss = lambda q, bias: jnp.sum(ops.flash_attention(q, k, v, bias=bias) * cotangent)
  scores_shape = (batch, heads, 64, 64)

  as_constant = _kernel_outputs(jax.grad(loss), q, bias)  # d/dq only.
  stopped = _kernel_outputs(jax.grad(lambda q, b: loss(q, jax.lax.stop_gradient(b)),
                                     argnums=(0, 1)), q, bias)
  differentiated = _kernel_outputs(jax.grad(loss, argnums=(0, 1)), q, bias)
  for outputs in (as_constant, stopped):
    assert outputs["vitjax_flash_backward_dq"] == [(batch, heads, 64, head_dim)]
    assert scores_shape not in sum(outputs.values(), [])
  assert scores_shape in differentiated["vitjax_flash_backward_dq"]
  # And the gradients that are computed do not change.
  np.testing.assert_allclose(jax.grad(loss)(q, bias),
                             jax.grad(loss, argnums=(0, 1))(q, bias)[0], atol=1e-6)


def test_bad_bias_shape_is_explained():
  q, k, v, _, _ = make_inputs(1, 8, 8, 2, 32)
  with pytest.raises(ValueError, match="does not broadcast"):
    ops.flash_attention(q, k, v, bias=jnp.zeros((3, 8, 8)))


def test_vit_forward_and_backward_with_pallas_equal_xla():
  options = dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8, image_size=40,
                 num_classes=10, head_zeroinit=False)
  model_xla = vitjax.create_model("vit", attention_impl="xla", **options)
  model_pallas = vitjax.create_model("vit", attention_impl="pallas", **options)
  params = vitjax.init_params(model_xla)
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 40, 40, 3))  # 26 tokens: padded inside.
  labels = jnp.array([1, 7])

  def loss(model, params):
    logits, _ = model.apply({"params": params}, images)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  loss_xla, grads_xla = jax.value_and_grad(lambda p: loss(model_xla, p))(params)
  loss_pallas, grads_pallas = jax.value_and_grad(lambda p: loss(model_pallas, p))(params)
  np.testing.assert_allclose(loss_pallas, loss_xla, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
                         grads_pallas, grads_xla)


KERNELS = ("vitjax_flash_forward", "vitjax_flash_backward_dkdv", "vitjax_flash_backward_dq")
LOWERING_CASES = [  # (q_len, k_len, head_dim, dtype, options)
    (197, 197, 64, jnp.bfloat16, dict(bias=True, mask=True, segments=True, causal=True)),
    (7, 64, 128, jnp.float32, dict(mask=True, causal=True)),  # q_len < k_len: decoding.
    (577, 577, 32, jnp.float16, dict(segments=True)),
    (1025, 1025, 128, jnp.bfloat16, dict(bias=True)),
    (50, 50, 80, jnp.float32, dict()),  # Head dim padded to 128.
]


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_forward_and_backward_lower_for_accelerators(platform, lowering):
  for q_len, k_len, head_dim, dtype, options in LOWERING_CASES:
    options = dict(options)
    causal = options.pop("causal", False)
    q, k, v, kwargs, _ = make_inputs(2, q_len, k_len, 3, head_dim, dtype=dtype, **options)
    differentiable = {"bias": kwargs.pop("bias")} if "bias" in kwargs else {}

    def loss(q, k, v, differentiable):
      out = ops.flash_attention(q, k, v, causal=causal, platform=platform, **kwargs,
                                **differentiable)
      return jnp.sum(out.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    args = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  (q, k, v, differentiable))
    text = jax.jit(grad).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
    for kernel in KERNELS:
      assert kernel in text, (kernel, q_len, k_len, head_dim, options)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what the CPU refuses")
def test_kernels_run_only_interpreted_on_the_cpu():
  q, k, v, _, _ = make_inputs(1, 8, 8, 1, 32)
  with pytest.raises(ValueError, match="interpret=True"):
    ops.flash_attention(q, k, v, interpret=False)
  with pytest.raises(ValueError, match="not 'metal'"):
    ops.flash_attention(q, k, v, platform="metal")
