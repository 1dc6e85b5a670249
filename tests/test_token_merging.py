"""Token merging (ToMe) and pruning (EViT, top-k): vitjax.models.token_merging."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models
from vitjax.models import parts
from vitjax.models import token_merging as tm
from vitjax.models import vit

TINY = dict(variant="mu/4", image_size=16, num_classes=10, head_zeroinit=False)


def _images(batch=3, size=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@functools.lru_cache(maxsize=None)
def _params(name="vit", **options):
  """Random values of the model's shapes (norm scales near 1): no initializer to compile."""
  rng = np.random.default_rng(0)

  def draw(path, shape):
    noise = rng.normal(size=shape.shape).astype(shape.dtype)
    return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(
      draw, models.param_shapes(models.create_model(name, **options)))


def _apply(model, params, images, **kwargs):
  return model.apply({"params": params}, images, **kwargs)


# ------------------------------------------------------- NumPy references, from the papers


def reference_tome(x, sizes, metric, r):
  """ToMe (Bolya et al. 2023, Sec. 3): bipartite soft matching, merged by size-weighted mean.

  Partition the tokens alternately into A and B; for each token of A, its most similar
  token of B (cosine similarity of the keys); keep the r most similar such edges and
  merge each A token into its B token, averaging the features weighted by token size.
  Returns [A's unmerged tokens in order, then B's] and their sizes, one example at a time.
  """
  out_x, out_sizes = [], []
  for xb, sb, mb in zip(np.asarray(x, np.float64), np.asarray(sizes, np.float64),
                        np.asarray(metric, np.float64)):
    mb = mb / np.linalg.norm(mb, axis=-1, keepdims=True)
    a, b = list(range(0, len(xb), 2)), list(range(1, len(xb), 2))
    scores = mb[a] @ mb[b].T
    best, partner = scores.max(axis=1), scores.argmax(axis=1)
    order = sorted(range(len(a)), key=lambda i: (-best[i], i))
    merged = set(order[:r])
    totals = {j: xb[b[j]] * sb[b[j]] for j in range(len(b))}
    weights = {j: sb[b[j]] for j in range(len(b))}
    for i in merged:
      totals[partner[i]] = totals[partner[i]] + xb[a[i]] * sb[a[i]]
      weights[partner[i]] = weights[partner[i]] + sb[a[i]]
    kept = [i for i in range(len(a)) if i not in merged]
    out_x.append([xb[a[i]] for i in kept] + [totals[j] / weights[j] for j in range(len(b))])
    out_sizes.append([sb[a[i]] for i in kept] + [weights[j] for j in range(len(b))])
  return np.array(out_x), np.array(out_sizes)


def reference_evit(x, sizes, attention, keep):
  """EViT (Liang et al. 2022, Sec. 3): keep the top-`keep` tokens by class attention (in
  their order), fuse the others into one token: sum_i a_i x_i over the inattentive ones."""
  out_x, out_sizes = [], []
  for xb, sb, ab in zip(np.asarray(x, np.float64), np.asarray(sizes, np.float64),
                        np.asarray(attention, np.float64)):
    top = sorted(sorted(range(len(ab)), key=lambda i: (-ab[i], i))[:keep])
    rest = [i for i in range(len(ab)) if i not in top]
    fused = sum(ab[i] * xb[i] for i in rest)
    out_x.append([xb[i] for i in top] + [fused])
    out_sizes.append([sb[i] for i in top] + [sum(sb[i] for i in rest)])
  return np.array(out_x), np.array(out_sizes)


@pytest.mark.parametrize("count,r", [(16, 1), (16, 8), (17, 5), (9, 4)])
def test_merge_agrees_with_numpy_reference(count, r):
  rng = np.random.default_rng(count + r)
  x = rng.normal(size=(2, count, 6)).astype(np.float32)
  metric = rng.normal(size=(2, count, 4)).astype(np.float32)
  sizes = rng.integers(1, 4, size=(2, count)).astype(np.float32)
  merged, new_sizes, slots = tm.merge(jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(metric), r)
  want_x, want_sizes = reference_tome(x, sizes, metric, r)
  chex.assert_shape(merged, (2, count - r, 6))
  chex.assert_trees_all_close(merged, want_x.astype(np.float32), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(new_sizes, want_sizes.astype(np.float32))
  # Each input token's slot holds a token whose size counts it.
  for b in range(2):
    counts = np.bincount(np.asarray(slots[b]), weights=sizes[b], minlength=count - r)
    np.testing.assert_allclose(counts, np.asarray(new_sizes[b]))


def test_evit_agrees_with_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 5)).astype(np.float32)
  attention = rng.dirichlet(np.ones(12), size=2).astype(np.float32)
  sizes = rng.integers(1, 3, size=(2, 12)).astype(np.float32)
  merged, new_sizes, slots = tm.fuse_inattentive(jnp.asarray(x), jnp.asarray(sizes),
                                                 jnp.asarray(attention), 8)
  want_x, want_sizes = reference_evit(x, sizes, attention, 8)
  chex.assert_trees_all_close(merged, want_x.astype(np.float32), atol=1e-6)
  chex.assert_trees_all_close(new_sizes, want_sizes.astype(np.float32))
  assert set(np.asarray(slots).ravel()) == set(range(9))


def test_prune_by_norm_keeps_the_largest_tokens_in_order():
  x = jnp.asarray([[[3.0], [1.0], [5.0], [2.0], [4.0]]])
  kept, sizes, slots = tm.prune_by_norm(x, jnp.ones((1, 5)), 3)
  np.testing.assert_array_equal(np.asarray(kept)[0, :, 0], [3.0, 5.0, 4.0])
  np.testing.assert_array_equal(np.asarray(slots)[0], [0, -1, 1, -1, 2])
  np.testing.assert_array_equal(np.asarray(tm.unmerge(kept, slots))[0, :, 0],
                                [3.0, 0.0, 5.0, 0.0, 4.0])


def test_schedules_follow_tome():
  assert tm.schedule_r(8, 4) == (8, 8, 8, 8)
  assert tm.schedule_r(8, 5, "decreasing") == (16, 12, 8, 4, 0)
  assert tm.schedule_r(8, 5, "increasing") == (0, 4, 8, 12, 16)
  assert tm.evit_layers(12) == (3, 6, 9)
  spec = tm.parse(dict(method="evit", keep_rate=0.7), 12)
  assert spec.per_layer(12) == (0, 0, 0, 0.7, 0, 0, 0.7, 0, 0, 0.7, 0, 0)
  assert tm.parse(dict(r=4, layers=(1, 2)), 4).per_layer(4) == (0, 4, 4, 0)


# ------------------------------------------------------------------------- the model switch


def test_r_zero_is_bitwise_the_model_without_merging():
  params = _params(**TINY)
  images = _images()
  plain, plain_out = _apply(models.create_model("vit", **TINY), params, images)
  for spec in (0, dict(method="tome", r=0, keep_rate=None), dict(r=(0, 0, 0, 0))):
    assert tm.parse(spec, 4) is None  # Builds the model without merging.
  for spec in (dict(r=0), None):
    logits, out = _apply(models.create_model("vit", **TINY, token_merging=spec), params, images)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(plain_out["tokens"]))
    assert "token_sizes" not in out


@pytest.mark.parametrize("spec,last_tokens", [
    (dict(r=2), 17 - 8),  # 16 patches + class token, 2 merged in each of 4 blocks.
    (dict(r=3, schedule="decreasing"), 17 - (6 + 4 + 2 + 0)),
    # EViT's blocks at depth 4: 1, 2, 3; 16 -> 8 + 1 fused -> 5 + 1 -> 3 + 1, + class.
    (dict(method="evit", keep_rate=0.5), 1 + 3 + 1),
    (dict(method="topk", r=3, layers=(0, 2)), 17 - 6),
])
def test_token_counts_sizes_and_unmerge(spec, last_tokens):
  options = dict(TINY, pool_type="token")
  params = _params(**options)
  model = models.create_model("vit", **options, token_merging=spec)
  _, out = jax.jit(lambda p, x: _apply(model, p, x))(params, _images())
  chex.assert_shape(out["encoded"], (3, last_tokens, 64))
  chex.assert_shape(out["tokens"], (3, 16, 64))  # Unmerged: one per patch.
  sizes, index = np.asarray(out["token_sizes"]), np.asarray(out["token_index"])
  assert index[:, 0].tolist() == [0, 0, 0]  # The class token stays first, alone.
  if spec.get("method") == "topk":
    np.testing.assert_array_equal(sizes.sum(-1), [last_tokens] * 3)
  else:  # Sizes always sum to the input length, and count the input tokens of each token.
    np.testing.assert_array_equal(sizes.sum(-1), [17] * 3)
    for b in range(3):
      np.testing.assert_array_equal(np.bincount(index[b], minlength=last_tokens), sizes[b])
  # The unmerged tokens are the final tokens their patches went into.
  encoded = np.asarray(out["encoded"])
  for b in range(3):
    for patch in range(16):
      want = encoded[b, index[b, 1 + patch]] if index[b, 1 + patch] >= 0 else 0.0
      np.testing.assert_array_equal(np.asarray(out["tokens"])[b, patch], want)


def test_duplicated_tokens_merge_losslessly_under_proportional_attention():
  """Merging exact duplicates with proportional attention changes nothing: the merged
  sequence (each token once, its size the count of its copies) gives the output of the
  sequence with the duplicates, token for token."""
  block, _ = vit.VisionTransformer(**vit.decode_variant("mu/4")).layer_pattern()
  depth = 3
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 64)).astype(np.float32)
  x[:, 1::2][:, :4] = x[:, 0::2][:, :4]  # Tokens 1, 3, 5, 7 copy 0, 2, 4, 6.
  x = jnp.asarray(x)
  plain = parts.Encoder(block=block, depth=depth)
  spec = tm.parse(dict(r=4, layers=(0,)), depth)  # Merge 4 pairs after the first attention.
  merging = parts.Encoder(block=block, depth=depth, layers=tm.apply(
      spec, (block,) * depth, num_protected=0))
  params = jax.jit(plain.init)(jax.random.key(0), x)["params"]
  want, _, _ = plain.apply({"params": params}, x)
  got, state, _ = merging.apply({"params": params}, x)
  chex.assert_shape(got, (2, 8, 64))
  np.testing.assert_array_equal(np.asarray(state["token_sizes"]).max(-1), [2.0, 2.0])
  chex.assert_trees_all_close(tm.unmerge(got, state["token_index"]), want, atol=2e-5, rtol=2e-5)
  # Without proportional attention the merged tokens count once: not the same output.
  unweighted = parts.Encoder(block=block, depth=depth, layers=tm.apply(
      tm.parse(dict(r=4, layers=(0,), proportional_attention=False), depth), (block,) * depth,
      num_protected=0))
  other, state, _ = unweighted.apply({"params": params}, x)
  assert np.abs(np.asarray(tm.unmerge(other, state["token_index"]) - want)).max() > 1e-3


@pytest.mark.parametrize("options", [
    dict(distilled=True, num_registers=2, layer_scale_init=1e-5),
    dict(pool_type="map", parallel_block=True, qk_norm=True)])
def test_merging_vits_keeps_the_prefix(options):
  """DeiT (class + distillation token) with registers and LayerScale (DINOv2's block);
  MAP pooling with ViT-22B's parallel block and QK norm."""
  options = {**TINY, "pool_type": "token", **options}
  params = _params(**options)
  model = models.create_model("vit", **options, token_merging=dict(r=3))
  logits, out = jax.jit(lambda p, x: _apply(model, p, x))(params, _images(batch=2))
  chex.assert_shape(logits, (2, 10))
  prefix = (int(options["pool_type"] == "token") + int(options.get("distilled", False))
            + options.get("num_registers", 0))
  np.testing.assert_array_equal(np.asarray(out["token_index"])[:, :prefix],
                                np.tile(np.arange(prefix), (2, 1)))
  assert np.isfinite(np.asarray(logits)).all()


def test_merging_in_mae_and_two_tower_image_encoders():
  """Shapes only (traced, not compiled): the switch reaches these encoders."""
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  # MAE's encoder: the decoder sees one token per visible patch again.
  mae = models.create_model("mae_vit_mu_patch4", token_merging=dict(r=2))
  noise = jnp.linspace(0.0, 1.0, 16)[None].repeat(2, 0)
  predictions, out = jax.eval_shape(lambda p, x: _apply(mae, p, x, noise=noise),
                                    models.param_shapes(mae), images)
  chex.assert_shape(predictions, (2, 16, 48))
  chex.assert_shape(out["encoded"], (2, 5, 64))  # Class + 4 visible, unmerged.
  chex.assert_shape(out["token_sizes"], (2, 2))  # 5 -> 3 -> 2 tokens (r capped at half).
  # A CLIP / SigLIP-style two-tower model merges in its image tower.
  towers = dict(image_model="vit", image=dict(variant="mu/4", image_size=16, pool_type="map"),
                text=dict(width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=50,
                          max_length=8), embed_dim=16)
  two = models.create_model("two_towers", **towers, token_merging=dict(r=3))
  _, out = jax.eval_shape(lambda p, x: two.apply({"params": p}, x, jnp.zeros((2, 8), jnp.int32)),
                          models.param_shapes(two), images)
  chex.assert_shape(out["img/encoded"], (2, 4, 64))  # 16 patches, 3 merged in 4 blocks.


def test_pallas_attention_takes_the_proportional_bias():
  options = dict(TINY, pool_type="token")
  params = _params(**options)
  images = _images(batch=2)
  outputs = []
  for impl in ("xla", "pallas"):
    model = models.create_model("vit", **options, attention_impl=impl, token_merging=dict(r=2))
    outputs.append(jax.jit(lambda p, x, m=model: _apply(m, p, x)[0])(params, images))
  chex.assert_trees_all_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_training_with_merging_has_gradients():
  options = dict(TINY, pool_type="gap", drop_path_rate=0.1)
  params = _params(**options)
  for spec in (dict(r=2),):  # EViT and top-k train in experiments/token_merging.sh.
    model = models.create_model("vit", **options, token_merging=spec)

    def loss(p):
      logits, out = model.apply({"params": p}, _images(batch=2), train=True,
                                rngs={"dropout": jax.random.key(0)})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), out
    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
    norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).sum()), grads))
    assert all(np.isfinite(norms)) and sum(norms) > 0
    # The gradients flowed through merged tokens: r=2 in each of the 4 blocks, 8 fewer.
    _, plain_out = _apply(models.create_model("vit", **options), params, _images(batch=2))
    plain_tokens = plain_out["encoded"].shape[1]
    chex.assert_shape(out["encoded"], (2, plain_tokens - 8, 64))
    chex.assert_shape(out["token_sizes"], (2, plain_tokens - 8))


@pytest.mark.parametrize("spec,message", [
    (dict(rr=2), "Unknown token_merging key"),
    (dict(r=-1), "must be an int >= 0"),
    (dict(method="tomee", r=2), "Unknown token_merging method"),
    (dict(r=2, schedule="linear"), "Unknown token_merging schedule"),
    (dict(method="evit", keep_rate=1.5), "keep_rate=1.5"),
    (dict(keep_rate=0.5), "keep_rate is for the pruning methods"),
    (dict(r=2, layers=(7,)), "not block indices"),
    (dict(r=(1, 2)), "gives 2 values for 4 blocks"),
    ("r=8", "give a dict"),
    (dict(method="evit"), "prunes nothing: give keep_rate"),
])
def test_bad_specs_name_the_problem(spec, message):
  with pytest.raises(ValueError, match=message):
    models.param_shapes(models.create_model("vit", **TINY, token_merging=spec))


@pytest.mark.parametrize("options,message", [
    (dict(scan_layers=True), "scan_layers"),
    (dict(rope="axial", posemb="none"), "RoPE"),
    (dict(causal=True), "causal"),
])
def test_models_that_cannot_merge_say_why(options, message):
  with pytest.raises(ValueError, match=message):
    models.param_shapes(models.create_model("vit", **TINY, **options, token_merging=dict(r=2)))
