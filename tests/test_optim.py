"""Optimizer from config: schedules, the weight-decay mask, clipping, SGD."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import vitjax
from vitjax.train import optim


def make_config(**optimizer):
  defaults = dict(name="adamw", learning_rate=1.0, weight_decay=0.1, b1=0.9, b2=0.999,
                  momentum=0.9, grad_clip_norm=0.0, schedule="cosine", warmup_steps=10,
                  end_learning_rate=0.0)
  return ml_collections.ConfigDict(dict(total_steps=110, optimizer={**defaults, **optimizer}))


def test_warmup_then_cosine_reaches_the_end_value():
  schedule = optim.make_schedule(make_config(end_learning_rate=0.01))
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(0.01)


def test_linear_and_constant_schedules():
  linear = optim.make_schedule(make_config(schedule="linear"))
  assert float(linear(60)) == pytest.approx(0.5)
  constant = optim.make_schedule(make_config(schedule="constant", warmup_steps=0))
  assert float(constant(0)) == float(constant(100)) == 1.0
  with pytest.raises(ValueError, match="Unknown schedule"):
    optim.make_schedule(make_config(schedule="cosin"))


def test_weight_decay_skips_norms_biases_and_embeddings():
  model = vitjax.create_model("vit", variant="Ti/16", depth=1, num_classes=3, image_size=32,
                              distilled=True)
  mask = optim.decay_mask(vitjax.models.param_shapes(model))
  flat = {optim.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, m in flat.items() if m)
  assert decayed == sorted([
      "embedding/kernel", "head/kernel", "head_dist/kernel",
      "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel",
      "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/value/kernel"])


def test_learned_rope_frequencies_get_no_weight_decay():
  model = vitjax.create_model("vit", variant="mu/4", depth=1, num_classes=3, image_size=8,
                              rope="mixed")
  mask = optim.decay_mask(vitjax.models.param_shapes(model))
  flat = {optim.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  rope = [name for name in flat if name.endswith("/rope_frequencies")]
  assert rope and not any(flat[name] for name in rope)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_decay_applies_only_to_masked_parameters(name):
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  tx, _ = optim.make_optimizer(make_config(name=name, warmup_steps=0, schedule="constant",
                                           momentum=0.0), params)
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(2))


def test_gradient_clipping_bounds_the_sgd_step():
  params = {"w": jnp.zeros((4,))}
  tx, _ = optim.make_optimizer(make_config(name="sgd", momentum=0.0, weight_decay=0.0,
                                           grad_clip_norm=1.0, warmup_steps=0,
                                           schedule="constant"), params)
  updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
  assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(1.0, rel=1e-5)


def test_unknown_optimizer_is_an_error():
  with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
    optim.make_optimizer(make_config(name="adam"), {"w": jnp.zeros(1)})


def _tiny_vit_params():
  model = vitjax.create_model("vit", variant="mu/4", depth=1, num_classes=3, image_size=8)
  return vitjax.init_params(model)


def _one_update(config, params):
  tx, _ = optim.make_optimizer(config, params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return {optim.path_str(path): np.asarray(u)
          for path, u in jax.tree_util.tree_leaves_with_path(updates)}


def test_frozen_parameters_never_change_and_hold_no_optimizer_state():
  params = _tiny_vit_params()
  config = make_config(freeze=r"^(embedding|Transformer)/", warmup_steps=0, schedule="constant")
  updates = _one_update(config, params)
  for name, update in updates.items():
    frozen = name.startswith(("embedding/", "Transformer/"))
    assert np.all(update == 0) == frozen, name
  tx, _ = optim.make_optimizer(config, params)
  state_bytes = sum(x.size for x in jax.tree_util.tree_leaves(tx.init(params)))
  trained = sum(p.size for n, p in updates.items() if not n.startswith(("embedding/", "Transf")))
  assert state_bytes <= 2 * trained + 8  # Adam's two moments of the trained parameters only.


def test_lr_multipliers_scale_updates_first_match_wins():
  params = _tiny_vit_params()
  base = _one_update(make_config(warmup_steps=0, schedule="constant", weight_decay=0.0), params)
  scaled = _one_update(make_config(warmup_steps=0, schedule="constant", weight_decay=0.0,
                                   lr_multipliers=((r"^head/", 10.0), (r"head|cls", 0.5))),
                       params)
  for name in base:
    factor = 10.0 if name.startswith("head/") else 0.5 if "cls" in name else 1.0
    np.testing.assert_allclose(scaled[name], factor * base[name], rtol=1e-6, err_msg=name)


def test_patterns_that_match_nothing_are_errors():
  params = _tiny_vit_params()
  with pytest.raises(ValueError, match="freeze pattern 'encoder_block' matches no parameter"):
    optim.make_optimizer(make_config(freeze="encoder_block"), params)
  with pytest.raises(ValueError, match="lr_multipliers pattern"):
    optim.make_optimizer(make_config(lr_multipliers=(("nope", 2.0),)), params)
  with pytest.raises(ValueError, match="freezes every parameter"):
    optim.make_optimizer(make_config(freeze="."), params)
