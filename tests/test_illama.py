"""iLLaMA ("Adapting LLaMA Decoder to Vision Transformer", Wang et al. 2024) on the one ViT.

RMSNorm, SwiGLU, causal attention with 1-D RoPE checked against an independent
NumPy block; the class token after the patches; the soft mask's end points; the
paper's parameter counts.
"""

import math

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import ops
from vitjax.models import count_params, param_shapes, vit
from vitjax.train.tasks.base import Task

WIDTH, HEADS, MLP = 32, 4, 48
TINY = dict(depth=2, width=32, num_heads=4, mlp_dim=48, image_size=16, patch_size=4,
            num_classes=5, head_zeroinit=False)


def _rms_norm(x, p, eps=1e-6):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"]


def _dense(x, p, subscripts):
  y = np.einsum(subscripts, x, p["kernel"])
  return y + p["bias"] if "bias" in p else y


def _rope_1d(x, theta=10_000.0):
  """LLaMA's RoPE: consecutive pairs of (batch, tokens, heads, head_dim) as complex numbers."""
  tokens, head_dim = x.shape[1], x.shape[-1]
  frequencies = theta ** (-np.arange(0, head_dim, 2) / head_dim)
  turns = np.exp(1j * np.outer(np.arange(tokens), frequencies))[None, :, None, :]
  pairs = (x[..., 0::2] + 1j * x[..., 1::2]) * turns
  return np.stack([pairs.real, pairs.imag], axis=-1).reshape(x.shape)


def numpy_illama_block(p, x):
  """One LLaMA block in float64: RMSNorm, causal attention with RoPE, RMSNorm, SwiGLU."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  attention_p, mlp_p = p["MultiHeadDotProductAttention_0"], p["MlpBlock_0"]
  y = _rms_norm(x, p["LayerNorm_0"])
  q = _rope_1d(_dense(y, attention_p["query"], "btd,dhk->bthk"))
  k = _rope_1d(_dense(y, attention_p["key"], "btd,dhk->bthk"))
  v = _dense(y, attention_p["value"], "btd,dhk->bthk")
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
  tokens = x.shape[1]
  logits = np.where(np.tril(np.ones((tokens, tokens), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  x = x + _dense(np.einsum("bhqs,bshk->bqhk", weights, v), attention_p["out"], "bthk,hkd->btd")
  y = _rms_norm(x, p["LayerNorm_1"])
  gate, linear = y @ mlp_p["Dense_0"]["kernel"], y @ mlp_p["Dense_2"]["kernel"]
  return x + (gate / (1 + np.exp(-gate)) * linear) @ mlp_p["Dense_1"]["kernel"]


def test_block_matches_numpy_llama_block():
  block = vit.vit_block(mlp_dim=MLP, num_heads=HEADS, norm="rmsnorm", mlp="swiglu",
                        mlp_use_bias=False, causal=True, rope="1d")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, WIDTH))
  positions = vitjax.models.posemb.sequence_positions(7)
  noise = np.random.default_rng(0)  # Perturbs the ones/zeros inits so every parameter matters.
  params = jax.tree_util.tree_map(
      lambda a: np.asarray(a) + 0.1 * noise.standard_normal(a.shape, np.float32),
      flax.linen.unbox(jax.jit(lambda rng: block.init(rng, x, {"positions": positions}))(
          jax.random.PRNGKey(1))["params"]))
  got, _ = jax.jit(lambda p: block.apply({"params": p}, x, {"positions": positions}))(params)
  want = numpy_illama_block(params, np.asarray(x, np.float64))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # LLaMA's layout: RMSNorm has a scale only, the SwiGLU no biases, attention keeps them.
  assert set(params["LayerNorm_0"]) == {"scale"}
  assert set(params["MlpBlock_0"]) == {"Dense_0", "Dense_1", "Dense_2"}
  assert "bias" not in params["MlpBlock_0"]["Dense_0"]
  assert "bias" in params["MultiHeadDotProductAttention_0"]["query"]


@pytest.fixture(scope="module")
def tiny_illama():
  model = vitjax.create_model("illama_tiny_patch16_224", soft_mask_steps=100, **TINY)
  return model, vitjax.init_params(model)  # Jitted.


def test_class_token_last_attends_to_every_patch(tiny_illama):
  model, params = tiny_illama
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  changed = images.at[:, 12:, 12:].add(1.0)  # The last patch only.
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  (logits, out), (logits2, out2) = apply(images), apply(changed)
  # Causal: the patches before the last one do not see it; the class token, after it, does.
  np.testing.assert_array_equal(out["tokens"][:, :-1], out2["tokens"][:, :-1])
  assert np.abs(out["tokens"][:, -1] - out2["tokens"][:, -1]).max() > 1e-3
  assert np.abs(logits - logits2).max() > 1e-3
  np.testing.assert_allclose(out["pre_logits"], out["encoded"][:, -1])
  assert out["tokens"].shape == (1, 16, TINY["width"])


def test_soft_mask_goes_from_bidirectional_to_causal(tiny_illama):
  model, params = tiny_illama
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  bidirectional = jax.jit(model.clone(causal=False, soft_mask_steps=0).apply)(
      {"params": params}, images)[0]
  causal = jax.jit(model.apply)({"params": params}, images)[0]  # Evaluation is always causal.
  assert np.abs(bidirectional - causal).max() > 1e-3
  # One compilation for every step: the step is traced.
  train = jax.jit(lambda step: model.apply({"params": params}, images, train=True, step=step)[0])
  np.testing.assert_allclose(train(0), bidirectional, atol=1e-6)
  np.testing.assert_allclose(train(100), causal, atol=1e-6)
  np.testing.assert_allclose(train(10_000), causal, atol=1e-6)
  halfway = train(50)
  assert np.abs(halfway - causal).max() > 1e-4 and np.abs(halfway - bidirectional).max() > 1e-4
  # The trainer's forward pass hands the step to models that declare they use it.
  assert model.uses_training_step and not model.clone(soft_mask_steps=0).uses_training_step
  trainer_forward = jax.jit(lambda step: Task.apply_model(
      model, params, images, rng=jax.random.PRNGKey(0), step=step)[0])
  np.testing.assert_allclose(trainer_forward(0), bidirectional, atol=1e-6)


def test_soft_mask_schedules():
  weights = lambda schedule: [float(vit.soft_mask_weight(s, 10, schedule)) for s in (0, 5, 10, 20)]
  assert weights("linear") == [1.0, 0.5, 0.0, 0.0]
  assert weights("constant") == [1.0, 1.0, 0.0, 0.0]


def test_causal_and_soft_mask_run_through_the_attention_op(tiny_illama, monkeypatch):
  model, params = tiny_illama
  calls = []
  original = ops.dot_product_attention

  def recording(q, k, v, **kwargs):
    calls.append((kwargs.get("causal"), kwargs.get("bias") is not None))
    return original(q, k, v, **kwargs)

  monkeypatch.setattr(ops, "dot_product_attention", recording)
  images = jnp.zeros((1, 16, 16, 3))
  jax.eval_shape(model.apply, {"params": params}, images)  # Traces, computes nothing.
  assert calls == [(True, False)] * TINY["depth"]
  calls.clear()
  jax.eval_shape(lambda: model.apply({"params": params}, images, train=True, step=3))
  assert calls == [(False, True)] * TINY["depth"]


# The paper's table counts what thop sees, nn.Conv2d and nn.Linear: not the position
# embedding, the class token or the RMSNorm scales (the authors' flops_and_params.py).
PAPER_PARAMS = {"tiny": 5_658_280, "small": 21_932_392, "base": 86_331_112,
                "large": 310_192_104}
PAPER_ROUNDED = {"tiny": 5.7, "small": 21.9, "base": 86.3, "large": 310.2}


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_parameter_counts_match_the_paper(size):
  flat = flax.traverse_util.flatten_dict(
      param_shapes(vitjax.create_model(f"illama_{size}_patch16_224")), sep="/")
  dense_and_conv = sum(math.prod(s.shape) for name, s in flat.items()
                       if name not in ("cls", "pos_embedding") and "LayerNorm" not in name
                       and "encoder_norm" not in name)
  assert dense_and_conv == PAPER_PARAMS[size]
  assert round(dense_and_conv / 1e6, 1) == PAPER_ROUNDED[size]
  width = flat["cls"].shape[-1]
  assert count_params(flat) == dense_and_conv + width * (197 + 1 + 2 * len(
      [n for n in flat if n.endswith("LayerNorm_0/scale")]) + 1)


def test_bad_options_name_the_fix():
  images = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match="causal=True"):
    vitjax.create_model("vit", soft_mask_steps=10, **TINY).init(jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match="num_registers=0"):
    vitjax.create_model("vit", class_token_position="last", num_registers=2, **TINY).init(
        jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match="'layernorm', 'rmsnorm'"):
    vitjax.create_model("vit", norm="batchnorm", **TINY).init(jax.random.PRNGKey(0), images)
  # Once silently ignored: the class token cannot go last when there is none.
  with pytest.raises(ValueError, match="pool_type='token' or class_token_position='first'"):
    vitjax.create_model("vit", class_token_position="last", pool_type="gap", **TINY).init(
        jax.random.PRNGKey(0), images)


def test_training_without_the_step_is_an_error_not_a_dropped_soft_mask(tiny_illama):
  model, params = tiny_illama
  images = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match="call it with train=True, step=STEP"):
    model.apply({"params": params}, images, train=True)
  _, out = model.apply({"params": params}, images, train=True, step=10)
  np.testing.assert_allclose(out["soft_mask_weight"], 0.9)
  model.apply({"params": params}, images)  # Evaluation is causal and needs no step.
