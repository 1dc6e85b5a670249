"""U-ViT: shapes, the paper's sizes and parameter counts, long skips, conditioning tokens."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import models
from vitjax.models import uvit

# A toy U-ViT: an in-block, the mid block and an out-block on 8x8 images (16 patches).
TINY = dict(image_size=8, patch_size=2, in_channels=3, width=32, depth=3, mlp_dim=64,
            num_heads=4, num_classes=10, class_dropout_prob=0.5, mlp_time_embed=True,
            learn_sigma=True)

# The paper's Table 1 ("Configurations of U-ViT"): layers, hidden size, MLP size, heads.
PAPER_SIZES = {"S": (13, 512, 2048, 8), "S-deep": (17, 512, 2048, 8),
               "M": (17, 768, 3072, 12), "L": (21, 1024, 4096, 16), "H": (29, 1152, 4608, 16)}
# Parameters in millions, as the paper rounds them (Table 1 and its result tables), of
# each registered model: U-ViT-S 44M, S (Deep) 58M, M 131M, L 287M, H 501M; S/2 on
# MS-COCO 45M (its 77 text tokens' embedding and position embeddings).
PAPER_PARAMS_M = {
    "uvit_small_patch2_32": 44, "uvit_small_patch4_64": 44, "uvit_mid_patch4_64": 131,
    "uvit_large_patch4_64": 287, "uvit_large_patch2_256": 287, "uvit_huge_patch2_256": 501,
    "uvit_large_patch4_512": 287, "uvit_huge_patch4_512": 501,
    "uvit_t2i_small_patch2_256": 45, "uvit_t2i_small_deep_patch2_256": 58,
}


def _random_params(model, seed=0):
  """Parameters of `model`'s shapes, drawn in NumPy: XLA:CPU takes seconds to compile init.

  The shapes come from `model.init` on the registry's dummy input (no timesteps, no
  labels), traced by jax.eval_shape. LayerNorm scales are near 1, everything else
  near 0, so each part of the model shows in the output.
  """
  rng = np.random.RandomState(seed)
  def draw(path, shape):
    centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(centre + 0.1 * rng.randn(*shape.shape), shape.dtype)
  return jax.tree_util.tree_map_with_path(draw, models.param_shapes(model))


def _inputs(batch=4, size=8, channels=3, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(batch, size, size, channels),
                     jnp.float32)


@pytest.fixture(scope="module")
def tiny():
  """(model, params, forward): `forward(params, x, timesteps, labels, force_drop)`, jitted.

  One compiled step serves every test: a batch of 4, float timesteps.
  """
  model = vitjax.create_model("uvit", **TINY)
  jitted = jax.jit(lambda p, x, t, y, drop: model.apply(  # As the diffusion task calls it.
      {"params": p}, x, t, y, force_drop=drop))
  forward = lambda p, x, t, y, drop=NO_DROP: jitted(
      p, x, jnp.asarray(t, jnp.float32), jnp.asarray(y, jnp.int32), drop)
  return model, _random_params(model), forward


NO_DROP = jnp.zeros((4,), bool)
T, Y = [3, 500, 0.25, 999.5], [1, 7, 0, 9]  # Timesteps: ints or floats (continuous time).


def test_shapes_and_interface_of_a_class_conditional_model(tiny):
  model, params, forward = tiny
  assert model.out_channels == 6 and model.null_class == 10
  prediction, out = forward(params, _inputs(), T, Y)
  assert prediction.shape == (4, 8, 8, 6)  # learn_sigma: noise and variance, 2 x 3 channels.
  assert np.all(np.isfinite(prediction))
  assert out["encoded"].shape == (4, 18, 32)  # [class, time, 16 patches].
  assert out["tokens"].shape == (4, 16, 32)
  assert out["patches"].shape == (4, 16, 2 * 2 * 6)
  assert params["label_emb"]["embedding_table"].shape == (11, 32)  # 10 classes + null.
  assert params["pos_embedding"].shape == (1, 18, 32)
  assert params["time_embed_0"]["kernel"].shape == (32, 128)  # mlp_time_embed: 4 x width.
  assert params["skip_linear_0"]["kernel"].shape == (64, 32)  # concat[x, skip] -> width.
  assert params["final_layer"]["kernel"].shape == (3, 3, 6, 6)
  assert sorted(k for k in params if "block" in k) == ["in_block_0", "mid_block", "out_block_0"]


def test_unconditional_model_with_text_tokens():
  model = vitjax.create_model("uvit", **{**TINY, "num_classes": 0, "conv": False,
                                         "context_dim": 12, "num_context_tokens": 5})
  params = _random_params(model)
  assert "label_emb" not in params and "final_layer" not in params
  assert params["pos_embedding"].shape == (1, 1 + 5 + 16, 32)  # [time, text, patches].
  # Int timesteps; labels are ignored (no class token).
  forward = jax.jit(lambda p, c: model.apply({"params": p}, _inputs(), timesteps=jnp.array(
      [1, 2, 3, 4]), labels=jnp.array(Y), context=c))
  with_text, out = forward(params, jnp.asarray(np.random.RandomState(3).randn(4, 5, 12),
                                               jnp.float32))
  assert with_text.shape == (4, 8, 8, 6) and out["tokens"].shape == (4, 16, 32)
  without_text, _ = forward(params, jnp.zeros((4, 5, 12)))
  assert np.max(np.abs(with_text - without_text)) > 1e-3


def test_sizes_are_the_papers():
  for size, (depth, width, mlp_dim, heads) in PAPER_SIZES.items():
    assert uvit.decode_variant(f"{size}/2") == dict(width=width, depth=depth, mlp_dim=mlp_dim,
                                                    num_heads=heads, patch_size=2)
  model = vitjax.create_model("uvit", variant="H/4")
  assert (model.width, model.depth, model.patch_size) == (1152, 29, 4)
  assert models.family_default("uvit", variant="M/4")[0] == "M/4"
  with pytest.raises(ValueError, match="Unknown U-ViT variant 'B/2'"):
    uvit.decode_variant("B/2")


def test_registered_models_have_the_papers_parameter_counts():
  assert sorted(models.list_models("uvit_*")) == sorted(PAPER_PARAMS_M)
  for name, millions in PAPER_PARAMS_M.items():
    model = vitjax.create_model(name)
    count = models.count_params(models.param_shapes(model))  # jax.eval_shape: no arrays.
    assert round(count / 1e6) == millions, (name, count)
  # Class-conditional ImageNet latents: 1000 classes and the null class in the table.
  huge = vitjax.create_model("uvit_huge_patch2_256")
  assert (huge.image_size, huge.in_channels, huge.num_classes, huge.null_class) == (
      32, 4, 1000, 1000)
  assert not huge.conv and not huge.mlp_time_embed
  assert vitjax.create_model("uvit_large_patch4_64").null_class is None  # Trained without.


def test_the_long_skip_reaches_the_output(tiny):
  _, params, forward = tiny
  reference, _ = forward(params, _inputs(), T, Y)
  # Zero the half of the skip Dense that reads the in-block's tokens: the skip is cut.
  skip = params["skip_linear_0"]
  cut = {**params, "skip_linear_0": {**skip, "kernel": skip["kernel"].at[32:].set(0.0)}}
  changed, _ = forward(cut, _inputs(), T, Y)
  assert np.max(np.abs(changed - reference)) > 1e-3


def test_time_and_class_tokens_condition_the_output(tiny):
  model, params, forward = tiny
  apply = lambda t, y, drop=NO_DROP: np.asarray(forward(params, _inputs(), t, y, drop)[0])
  differs = lambda a, b: np.min(np.max(np.abs(a - b), axis=(1, 2, 3))) > 1e-3  # Each example.
  base = apply([10] * 4, [3] * 4)
  assert differs(base, apply([900] * 4, [3] * 4))
  assert differs(base, apply([10] * 4, [4] * 4))
  # Forced drops and no labels at all are the null class, the unconditional input.
  null = apply([10] * 4, [10] * 4)
  forced = apply([10] * 4, [3] * 4, jnp.array([True, False, True, False]))
  np.testing.assert_array_equal(forced[::2], null[::2])
  np.testing.assert_array_equal(forced[1::2], base[1::2])
  no_labels, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, timesteps=jnp.full(
      (4,), 10.0)))(params, _inputs())
  np.testing.assert_allclose(no_labels, null, atol=1e-5)


@pytest.fixture(scope="module")
def training_step(tiny):
  """(predictions, gradients) of a training step (label dropout on): one compilation."""
  model, params, _ = tiny
  x = _inputs()

  def loss(p, rng):
    prediction, _ = model.apply({"params": p}, x, timesteps=jnp.array(T), labels=jnp.array(Y),
                                train=True, rngs={"dropout": rng})
    error = jnp.mean((prediction[..., :3] - x) ** 2 + prediction[..., 3:] ** 2)
    return error, prediction

  grads, prediction = jax.jit(jax.grad(loss, has_aux=True))(params, jax.random.PRNGKey(0))
  return prediction, grads


def test_label_dropout_while_training_uses_the_null_row(tiny, training_step):
  _, params, forward = tiny
  labelled, _ = forward(params, _inputs(), T, Y)
  null, _ = forward(params, _inputs(), T, [10] * 4)
  trained, _ = training_step
  trained, null, labelled = map(np.asarray, (trained, null, labelled))
  dropped = [np.allclose(trained[i], null[i], atol=1e-5) for i in range(4)]
  kept = [np.allclose(trained[i], labelled[i], atol=1e-5) for i in range(4)]
  assert all(d != k for d, k in zip(dropped, kept)), (dropped, kept)
  assert any(dropped) and any(kept), dropped  # Half dropped, at random: this key drops some.


def test_gradients_reach_every_parameter(training_step):
  _, grads = training_step
  for path, grad in jax.tree_util.tree_leaves_with_path(jax.device_get(grads)):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(grad)), name
    assert np.max(np.abs(grad)) > 0, name


def test_jitted_forward_of_a_tiny_model_is_fast(tiny):
  _, params, forward = tiny
  jax.block_until_ready(forward(params, _inputs(), T, Y))  # Compiled (or found) here.
  start = time.perf_counter()
  jax.block_until_ready(forward(params, _inputs(), T, Y))
  assert time.perf_counter() - start < 1.0  # A few milliseconds on a CPU core.


def test_configuration_errors_say_what_to_change(tiny):
  with pytest.raises(ValueError, match="odd number.*depth=12 is depth=13"):
    models.param_shapes(vitjax.create_model("uvit", **{**TINY, "depth": 12}))
  with pytest.raises(ValueError, match="num_context_tokens"):
    models.param_shapes(vitjax.create_model("uvit", **{**TINY, "context_dim": 8}))
  model, params, _ = tiny
  with pytest.raises(ValueError, match="takes 8x8 images"):
    model.apply({"params": params}, _inputs(size=16))
