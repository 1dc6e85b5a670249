"""ViT options on the one ViT: registers, LayerScale, ViT-22B's parallel block, QK-norm, no biases.

Checked against an independent NumPy forward pass of the block, written from the papers.
"""

import math

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import vit

WIDTH, HEADS, MLP = 32, 4, 64


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  normed = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * p["scale"]
  return normed + p["bias"] if "bias" in p else normed


def _dense(x, p, subscripts):
  y = np.einsum(subscripts, x, p["kernel"])
  return y + p["bias"] if "bias" in p else y


def numpy_block(p, x, *, parallel, qk_norm, layer_scale):
  """One encoder block in float64: pre-norm, optionally parallel (ViT-22B), QK-LayerNorm."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  attention_p, mlp_p = p["MultiHeadDotProductAttention_0"], p["MlpBlock_0"]

  def attention(y):
    q = _dense(y, attention_p["query"], "btd,dhk->bthk")
    k = _dense(y, attention_p["key"], "btd,dhk->bthk")
    v = _dense(y, attention_p["value"], "btd,dhk->bthk")
    if qk_norm:
      q, k = _layer_norm(q, attention_p["query_norm"]), _layer_norm(k, attention_p["key_norm"])
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return _dense(np.einsum("bhqs,bshk->bqhk", weights, v), attention_p["out"], "bthk,hkd->btd")

  def mlp(y):
    h = _dense(y, mlp_p["Dense_0"], "btd,dm->btm")
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    return _dense(h, mlp_p["Dense_1"], "btm,md->btd")

  scale = lambda branch, i: branch * p[f"LayerScale_{i}"]["scale"] if layer_scale else branch
  if parallel:
    y = _layer_norm(x, p["LayerNorm_0"])
    return x + scale(attention(y), 0) + scale(mlp(y), 1)
  x = x + scale(attention(_layer_norm(x, p["LayerNorm_0"])), 0)
  return x + scale(mlp(_layer_norm(x, p["LayerNorm_1"])), 1)


@pytest.mark.parametrize("parallel,qk_norm,use_bias,layer_scale", [
    (False, False, True, None), (True, True, False, None), (False, True, True, 0.1),
    (True, False, True, 0.5)])
def test_block_matches_numpy(parallel, qk_norm, use_bias, layer_scale):
  block = vit.vit_block(mlp_dim=MLP, num_heads=HEADS, parallel_block=parallel, qk_norm=qk_norm,
                        use_bias=use_bias, layer_scale_init=layer_scale)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, WIDTH))
  params = jax.tree_util.tree_map(  # Perturb the ones/zeros inits so every parameter matters.
      lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape),
      flax.linen.unbox(block.init(jax.random.PRNGKey(1), x)["params"]))
  got, _ = block.apply({"params": params}, x)
  want = numpy_block(params, np.asarray(x, np.float64), parallel=parallel, qk_norm=qk_norm,
                     layer_scale=layer_scale)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  assert ("LayerNorm_1" in params) == (not parallel)
  assert ("bias" in params["MlpBlock_0"]["Dense_0"]) == use_bias


def test_registers_are_extra_tokens_outside_the_patch_tokens():
  options = dict(variant="Ti/8", depth=2, image_size=32, num_classes=3, head_zeroinit=False)
  model = vitjax.create_model("vit", num_registers=4, **options)
  params = vitjax.init_params(model)
  assert params["reg"].shape == (1, 4, 192)
  assert params["pos_embedding"].shape == (1, 1 + 16, 192)  # Registers get no position.
  logits, out = model.apply({"params": params}, jnp.ones((2, 32, 32, 3)))
  assert out["encoded"].shape == (2, 1 + 4 + 16, 192)
  assert out["registers"].shape == (2, 4, 192) and out["tokens"].shape == (2, 16, 192)
  np.testing.assert_array_equal(out["registers"], out["encoded"][:, 1:5])
  # Registers change what the class token sees.
  plain = {k: v for k, v in params.items() if k != "reg"}
  plain_logits, _ = vitjax.create_model("vit", **options).apply({"params": plain},
                                                                 jnp.ones((2, 32, 32, 3)))
  assert not np.allclose(logits, plain_logits)


def test_register_names_are_registered():
  model = vitjax.create_model("vit", variant="S/16", num_registers=4)
  assert model.num_registers == 4 and model.width == 384
  assert "vit_base_patch14_reg4_dinov2" in vitjax.list_models("*reg4*")


def numpy_rope(x, positions, frequencies):
  """Rotates pairs (x[2i], x[2i+1]) by angle position . frequency_i, in float64."""
  angles = np.asarray(positions, np.float64) @ np.asarray(frequencies, np.float64).T  # (t, pairs)
  even, odd = x[..., 0::2], x[..., 1::2]
  cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
  return out


def test_rope_rotation_matches_numpy_and_skips_unpositioned_tokens():
  from vitjax.models import posemb
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 1 + 6, 3, 16)), np.float64)
  positions, rotated = posemb.patch_positions(2, 3, num_prefix_tokens=1)
  frequencies = posemb.rope_axial_frequencies(16)
  got = posemb.apply_rope(jnp.asarray(x, jnp.float32), posemb.rope_angles(positions, frequencies),
                          rotated)
  np.testing.assert_allclose(got[:, 0], x[:, 0], rtol=1e-6)  # The class token is not rotated.
  np.testing.assert_allclose(got[:, 1:], numpy_rope(x[:, 1:], positions[1:], frequencies),
                             atol=1e-5)


@pytest.mark.parametrize("variant", ["axial", "mixed"])
def test_rope_scores_depend_on_relative_positions_only(variant):
  from vitjax.models import posemb
  frequencies = (posemb.rope_axial_frequencies(16) if variant == "axial"
                 else posemb.rope_mixed_init(jax.random.PRNGKey(0), 1, 16)[0])
  q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 1, 1, 16))

  def score(q_position, k_position):
    rotate = lambda v, p: posemb.apply_rope(
        v, posemb.rope_angles(jnp.asarray([p], jnp.float32), frequencies), jnp.ones(1, bool))
    return float(jnp.sum(rotate(q, q_position) * rotate(k, k_position)))

  assert score((3.0, 1.0), (5.0, 4.0)) == pytest.approx(score((0.0, 0.0), (2.0, 3.0)), abs=1e-4)
  assert score((3.0, 1.0), (5.0, 4.0)) != pytest.approx(score((0.0, 0.0), (3.0, 2.0)), abs=1e-3)


@pytest.mark.parametrize("rope,scan", [("axial", False), ("mixed", True)])
def test_rope_vit_runs_at_other_resolutions_and_learns_mixed_frequencies(rope, scan):
  model = vitjax.create_model("vit", variant="Ti/8", depth=2, image_size=32, num_classes=3,
                              rope=rope, posemb="none", scan_layers=scan, head_zeroinit=False)
  params = vitjax.init_params(model)
  assert "pos_embedding" not in params
  for side in (32, 48):
    logits, _ = model.apply({"params": params}, jnp.ones((1, side, side, 3)))
    assert logits.shape == (1, 3)
  if rope == "mixed":
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images)[0] ** 2))(params)
    attention = grads["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]
    assert attention["rope_frequencies"].shape == (2, 3, 32, 2)  # (layers, heads, pairs, x/y)
    assert float(jnp.abs(attention["rope_frequencies"]).sum()) > 0
