"""Parts: layer patterns (and their scan), blocks that change the token count, aux losses."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.models import parts

TINY = dict(variant="mu/4", depth=4, width=32, num_heads=4, mlp_dim=48, image_size=16,
            num_classes=3, head_zeroinit=False)
IMAGES = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))


def stacked(unscanned, segments):
  """Scanned parameters of an encoder from its unscanned ones, for `parts.scan_segments`."""
  blocks, scanned = unscanned["Transformer"], {}
  for k, (unit, repeats, first) in enumerate(segments):
    name = "encoderblock" if len(segments) == 1 else f"encoderblock_run{k}"
    layer = lambda r, j: blocks[f"encoderblock_{first + r * len(unit) + j}"]
    stack = lambda j: jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                             *[layer(r, j) for r in range(repeats)])
    scanned[name] = stack(0) if len(unit) == 1 else {
        f"block_{j}": stack(j) for j in range(len(unit))}
  scanned["encoder_norm"] = blocks["encoder_norm"]
  return {**unscanned, "Transformer": scanned}


@pytest.mark.parametrize("pattern,segments", [
    (parts.every(2, dict(layer_scale_init=0.5)), [(2, 2)]),  # A repeating unit of two.
    (parts.last(1, dict(parallel=True), depth=4), [(1, 3), (1, 1)]),  # Two runs.
])
def test_layer_pattern_places_blocks_and_scan_runs_its_unit(pattern, segments):
  model = vitjax.create_model("vit", layers=pattern, **TINY)
  params = vitjax.init_params(model)
  blocks = params["Transformer"]
  if segments == [(2, 2)]:
    assert [("LayerScale_0" in blocks[f"encoderblock_{i}"]) for i in range(4)] == [
        False, True, False, True]
  else:
    assert [("LayerNorm_1" in blocks[f"encoderblock_{i}"]) for i in range(4)] == [
        True, True, True, False]
  block, layers = model.layer_pattern()
  found = parts.scan_segments(parts.layer_factories(block, layers, 4))
  assert [(len(unit), repeats) for unit, repeats, _ in found] == segments

  scanned_model = model.clone(scan_layers=True)
  scanned_params = stacked(params, found)
  chex.assert_trees_all_equal_shapes(scanned_params, vitjax.models.param_shapes(scanned_model))
  logits, _ = model.apply({"params": params}, IMAGES)
  scanned_logits, _ = scanned_model.apply({"params": scanned_params}, IMAGES)
  chex.assert_trees_all_close(scanned_logits, logits, atol=1e-5, rtol=1e-5)
  if len(found) > 1:
    return  # Remat is checked once, on the scanned unit of two blocks (a compile each).
  # Remat wraps each block of the unit; the gradient is the same.
  loss = lambda m, p: jnp.sum(m.apply({"params": p}, IMAGES, train=True,
                                      rngs={"dropout": jax.random.PRNGKey(1)})[0] ** 2)
  remat_model = scanned_model.clone(remat_policy="full", drop_path_rate=0.0)
  grad = lambda m: jax.jit(jax.grad(functools.partial(loss, m)))(scanned_params)
  chex.assert_trees_all_close(grad(remat_model), grad(scanned_model), atol=1e-5, rtol=1e-4)


def test_a_pattern_that_does_not_tile_the_depth_is_an_error():
  with pytest.raises(ValueError, match="does not tile depth=4"):
    vitjax.init_params(vitjax.create_model("vit", layers=(None, None, None), **TINY))


class MergeLastTwo(parts.Block):
  """A block that, after its mixers, merges the last two tokens (a size-weighted mean)."""

  @nn.compact
  def __call__(self, x, token_state=None, deterministic=True, drop_path=None):
    x, token_state = super().__call__(x, token_state, deterministic, drop_path)
    sizes = token_state.get("token_sizes", jnp.ones(x.shape[:2], jnp.float32))
    weights = sizes[:, -2:, None]
    merged = jnp.sum(x[:, -2:] * weights, axis=1, keepdims=True) / jnp.sum(weights, axis=1,
                                                                            keepdims=True)
    return (jnp.concatenate([x[:, :-2], merged], axis=1),
            {**token_state, "token_sizes": jnp.concatenate(
                [sizes[:, :-2], jnp.sum(sizes[:, -2:], axis=1, keepdims=True)], axis=1)})


def test_blocks_that_merge_tokens_keep_tokens_and_pooling_right():
  model = vitjax.create_model("vit", block=MergeLastTwo, pool_type="gap", num_registers=2,
                              **TINY)
  params = vitjax.init_params(model)
  _, out = model.apply({"params": params}, IMAGES)
  # 16 patches, 4 merges; the registers stay out of the tokens and the pooling.
  chex.assert_shape(out["tokens"], (2, 12, 32))
  chex.assert_shape(out["registers"], (2, 2, 32))
  sizes = np.array([1.0] * 11 + [5.0])  # The last token stands for the last five patches.
  want = np.sum(np.asarray(out["tokens"]) * sizes[:, None], axis=1) / sizes.sum()
  np.testing.assert_allclose(out["head_input"], want, rtol=1e-5, atol=1e-6)


def test_gap_over_merged_tokens_is_the_mean_over_the_patches():
  patches = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 4))
  merged = jnp.concatenate([patches[:, :3], patches[:, 3:].mean(axis=1, keepdims=True)], 1)
  sizes = jnp.array([[1.0, 1.0, 1.0, 3.0]] * 2)
  chex.assert_trees_all_close(parts.pool("gap", merged, first_patch=0, token_sizes=sizes),
                              patches.mean(axis=1), rtol=1e-6)


class SquareLoss(nn.Module):
  """A channel mixer that reports an auxiliary loss, as an MoE's load balancing does."""

  @nn.compact
  def __call__(self, x, deterministic=True, token_state=None):
    y = nn.Dense(x.shape[-1])(x)
    return y, {"square": jnp.mean(jnp.square(y))}


def test_aux_losses_of_the_blocks_are_summed_into_out_with_and_without_scan():
  model = vitjax.create_model("vit", layers=parts.every(2, dict(channel_mixer=SquareLoss)),
                              **TINY)
  params = vitjax.init_params(model)
  (_, out), state = model.apply({"params": params}, IMAGES, capture_intermediates=True,
                                mutable=["intermediates"])
  # Each reporting block's loss, recomputed from its mixer's output.
  blocks = state["intermediates"]["Transformer"]
  want = sum(jnp.mean(jnp.square(blocks[f"encoderblock_{i}"]["SquareLoss_0"]["__call__"][0][0]))
             for i in (1, 3))
  np.testing.assert_allclose(out["aux_loss"]["square"], want, rtol=1e-5)

  block, layers = model.layer_pattern()
  segments = parts.scan_segments(parts.layer_factories(block, layers, 4))
  _, scanned_out = model.clone(scan_layers=True).apply(
      {"params": stacked(params, segments)}, IMAGES)
  np.testing.assert_allclose(scanned_out["aux_loss"]["square"], want, rtol=1e-5)
