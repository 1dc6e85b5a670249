"""Mixtures of experts: V-MoE's sparse routing and Soft MoE against NumPy references
written from the papers, the dense limit, the registry's sizes, expert parallelism."""

import json
import math
import os
import re
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from vitjax import models
from vitjax.models import layers, moe
from vitjax.tools import model_table

import cli_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# NumPy references, from the papers' definitions.


def np_softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_mlp(x, w0, b0, w1, b1):
  h = x @ w0 + b0
  return (0.5 * h * (1.0 + special.erf(h / np.sqrt(2.0)))) @ w1 + b1


def np_route(gates, k, capacity, batch_priority):
  """V-MoE's routing of one group, token by token: (experts, kept), each (tokens, k).

  Each token's top-k experts by gate (ties to the lower index). Buffers fill choice by
  choice: every token's first expert before any token's second; within a choice in
  token order or, with batch-prioritised routing, by decreasing top gate. An
  assignment to a full expert is dropped.
  """
  tokens, num_experts = gates.shape
  experts = np.argsort(-gates, axis=1, kind="stable")[:, :k]
  order = (sorted(range(tokens), key=lambda t: -gates[t, experts[t, 0]]) if batch_priority
           else range(tokens))
  kept = np.zeros((tokens, k), bool)
  filled = np.zeros(num_experts, int)
  for j in range(k):
    for t in order:
      kept[t, j] = filled[experts[t, j]] < capacity
      filled[experts[t, j]] += 1
  return experts, kept


def np_sparse_moe(x, params, k, capacity_factor, group_size, batch_priority):
  """A V-MoE layer without noise (evaluation): (output, fraction of assignments dropped)."""
  batch, length, width = x.shape
  num_experts = params["router"]["kernel"].shape[1]
  images = math.gcd(batch, group_size)
  groups = x.reshape(batch // images, images * length, width)
  tokens = groups.shape[1]
  capacity = max(1, math.ceil(k * tokens * capacity_factor / num_experts))
  e = params["Experts_0"]
  out, dropped = np.zeros_like(groups), 0
  for g, group in enumerate(groups):
    gates = np_softmax(group @ params["router"]["kernel"], axis=1)
    experts, kept = np_route(gates, k, capacity, batch_priority)
    dropped += np.sum(~kept)
    for t in range(tokens):
      for j in range(k):
        if kept[t, j]:
          i = experts[t, j]
          out[g, t] += gates[t, i] * np_mlp(group[t], e["Dense_0"]["kernel"][i],
                                            e["Dense_0"]["bias"][i], e["Dense_1"]["kernel"][i],
                                            e["Dense_1"]["bias"][i])
  return out.reshape(batch, length, width), dropped / (groups.shape[0] * tokens * k)


def np_soft_moe(x, params, slots_per_expert):
  """Soft MoE, Algorithm 1 of the paper, one image at a time."""
  phi, scale, e = params["phi"], params["scale"], params["Experts_0"]
  normed_phi = scale * phi / np.sqrt(np.sum(phi**2, axis=0, keepdims=True) + 1e-6)
  out = np.zeros_like(x)
  for b, tokens in enumerate(x):
    normed = tokens / np.sqrt(np.sum(tokens**2, axis=1, keepdims=True) + 1e-6)
    logits = normed @ normed_phi  # (tokens, slots)
    dispatch, combine = np_softmax(logits, axis=0), np_softmax(logits, axis=1)
    slots = dispatch.T @ tokens
    slot_out = np.stack([
        np_mlp(slot, *(e[name][part][i // slots_per_expert] for name in ("Dense_0", "Dense_1")
                       for part in ("kernel", "bias")))
        for i, slot in enumerate(slots)])
    out[b] = combine @ slot_out
  return out


def cv_squared(values):
  return np.var(values, axis=-1) / np.mean(values, axis=-1) ** 2


def as_numpy(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def init(layer, x, seed=0):
  # Jitted: one compilation, not one per random draw; the same values.
  return nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(seed), x)["params"])


# Routing.


@pytest.mark.parametrize("k,capacity,batch_priority", [(1, 3, False), (2, 3, False),
                                                       (2, 4, True), (1, 2, True)])
def test_top_k_routing_matches_the_numpy_reference(k, capacity, batch_priority):
  gates = np_softmax(np.random.RandomState(k + capacity).randn(3, 10, 4) * 2, axis=-1)
  experts, weights, position, kept = moe.top_k_routing(jnp.asarray(gates, jnp.float32), k,
                                                       capacity, batch_priority)
  for g in range(3):
    want_experts, want_kept = np_route(gates[g], k, capacity, batch_priority)
    np.testing.assert_array_equal(experts[g], want_experts)
    np.testing.assert_array_equal(kept[g], want_kept)
    np.testing.assert_allclose(weights[g], np.take_along_axis(gates[g], want_experts, 1),
                               rtol=1e-6)
  # Within a group, kept assignments hold distinct slots of their expert's buffer.
  for g in range(3):
    slots = np.asarray(experts[g] * capacity + position[g])[np.asarray(kept[g])]
    assert len(set(slots.tolist())) == len(slots)


def test_batch_priority_keeps_the_most_confident_tokens():
  # All 6 tokens want expert 0, which has room for 2: BPR keeps the two highest gates.
  top = np.array([0.5, 0.9, 0.6, 0.95, 0.7, 0.55])
  gates = np.stack([top, 1 - top], axis=1)[None]
  _, _, _, kept = moe.top_k_routing(jnp.asarray(gates, jnp.float32), 1, 2, True)
  np.testing.assert_array_equal(kept[0, :, 0], [False, True, False, True, False, False])
  _, _, _, kept = moe.top_k_routing(jnp.asarray(gates, jnp.float32), 1, 2, False)
  np.testing.assert_array_equal(kept[0, :, 0], [True, True, False, False, False, False])


def test_capacity_is_the_papers_rounded_up():
  assert moe.expert_capacity(128, 8, 1, 1.0) == 16
  assert moe.expert_capacity(128, 8, 2, 1.05) == 34  # ceil(33.6)
  assert moe.expert_capacity(10, 8, 1, 0.1) == 1  # At least one slot.


@pytest.mark.parametrize("k,capacity_factor,group_size,batch_priority",
                         [(1, 1.0, 2, False), (2, 1.05, 4, False), (2, 0.5, 4, True),
                          (1, 0.6, 3, True)])
def test_sparse_moe_matches_the_numpy_reference(k, capacity_factor, group_size,
                                                batch_priority):
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 8))
  layer = moe.SparseMoE(num_experts=4, mlp_dim=16, top_k=k, capacity_factor=capacity_factor,
                        group_size=group_size, batch_priority=batch_priority)
  params = init(layer, x)
  params["router"]["kernel"] = params["router"]["kernel"] * 3  # Decisive routing.
  y, losses, report = layer.apply({"params": params}, x)
  want, dropped = np_sparse_moe(np.asarray(x, np.float64), as_numpy(params), k,
                                capacity_factor, group_size, batch_priority)
  np.testing.assert_allclose(y, want, atol=2e-5)
  np.testing.assert_allclose(report["aux_metrics"]["moe_dropped"], dropped, atol=1e-6)
  assert set(losses) == {"moe_importance", "moe_load"}


def test_auxiliary_losses_match_the_papers_formulas():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 12, 4)
  noise_std = 0.25
  noisy = logits + noise_std * rng.randn(*logits.shape)
  gates = np_softmax(logits, axis=-1)
  want_importance = np.mean(cv_squared(gates.sum(axis=1)))
  for k in (1, 2):
    threshold = np.sort(noisy, axis=-1)[..., -k][..., None]  # The k-th largest noisy logit.
    p = 1 - stats.norm.cdf((threshold - logits) / noise_std)
    want_load = np.mean(cv_squared(p.sum(axis=1)))
    np.testing.assert_allclose(
        moe.load_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(noisy, jnp.float32),
                      noise_std, k), want_load, rtol=1e-4)
  np.testing.assert_allclose(moe.importance_loss(jnp.asarray(gates, jnp.float32)),
                             want_importance, rtol=1e-5)


def test_the_layer_reports_its_weighted_losses_while_training():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 8))
  layer = moe.SparseMoE(num_experts=4, mlp_dim=16, importance_loss_weight=0.5,
                        load_loss_weight=0.0)
  params = init(layer, x)
  _, losses, _ = layer.apply({"params": params}, x, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(2)})
  gates = jax.nn.softmax(x.reshape(1, 20, 8) @ params["router"]["kernel"], axis=-1)
  np.testing.assert_allclose(losses["moe_importance"], 0.5 * moe.importance_loss(gates),
                             rtol=1e-5)
  assert losses["moe_load"] == 0.0
  _, losses, _ = moe.SparseMoE(num_experts=4, mlp_dim=16, noise_std=0.0).apply(
      {"params": params}, x, deterministic=False)  # No noise, no rng needed, no load loss.
  assert set(losses) == {"moe_importance"}


def test_drops_are_counted_and_dropped_tokens_pass_unchanged():
  # A zero router ties every expert: all 20 tokens of the group pick expert 0, which
  # takes ceil(20 / 4) = 5 of them; the 15 others get nothing from the layer.
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 8))
  layer = moe.SparseMoE(num_experts=4, mlp_dim=16, top_k=1, capacity_factor=1.0)
  params = init(layer, x)
  params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
  y, _, report = layer.apply({"params": params}, x)
  assert report["aux_metrics"]["moe_dropped"] == 0.75
  assert report["aux_metrics"]["moe_max_load"] == 1.0
  zero_rows = np.all(np.asarray(y).reshape(20, 8) == 0, axis=1)
  np.testing.assert_array_equal(zero_rows, np.arange(20) >= 5)


def test_one_expert_with_room_is_the_dense_mlp():
  """With one expert the gate is softmax of one logit, 1: the MoE is its MLP exactly."""
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 8))
  layer = moe.SparseMoE(num_experts=1, mlp_dim=16, top_k=1, capacity_factor=1.0)
  params = init(layer, x)
  mlp = layers.MlpBlock(mlp_dim=16)
  dense = jax.tree_util.tree_map(lambda a: a[0], params["Experts_0"])
  want = mlp.apply({"params": dense}, x)
  for train in (False, True):  # With router noise too.
    y, _, report = layer.apply({"params": params}, x, deterministic=not train,
                               rngs={"dropout": jax.random.PRNGKey(3)})
    chex.assert_trees_all_close(y, want, atol=1e-6)
    assert report["aux_metrics"]["moe_dropped"] == 0.0


def test_a_one_expert_vmoe_is_the_vit_with_the_same_weights():
  options = dict(variant="mu/4", num_classes=10, image_size=16, pool_type="gap")
  vmoe = models.create_model("vmoe", num_experts=1, top_k=1, capacity_factor=1.0, **options)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = models.init_params(vmoe)
  dense = jax.tree_util.tree_map(lambda a: a, params)
  for name in ("encoderblock_1", "encoderblock_3"):
    block = dict(dense["Transformer"][name])
    experts = block.pop("MoeBlock_0")["Experts_0"]
    block["MlpBlock_0"] = jax.tree_util.tree_map(lambda a: a[0], experts)
    dense["Transformer"][name] = block
  logits, out = jax.jit(vmoe.apply)({"params": params}, images)
  want, _ = jax.jit(models.create_model("vit", **options).apply)({"params": dense}, images)
  chex.assert_trees_all_close(logits, want, atol=1e-5)
  assert out["aux_metrics"]["moe_dropped"] == 0.0


# Soft MoE.


@pytest.mark.parametrize("num_experts,slots_per_expert", [(4, 1), (2, 3)])
def test_soft_moe_matches_the_numpy_reference(num_experts, slots_per_expert):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 8))
  layer = moe.SoftMoE(num_experts=num_experts, mlp_dim=16, slots_per_expert=slots_per_expert)
  params = init(layer, x)
  params["scale"] = jnp.asarray(3.0)  # A learned scale other than its start.
  y = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, np_soft_moe(np.asarray(x, np.float64), as_numpy(params),
                                            slots_per_expert), atol=2e-5)


def own_token_gradients(apply, image):
  """Per token t of `image` (tokens, width): max |d y_t / d x_t| of `apply` on the image."""
  jacobian = np.asarray(jax.jit(jax.jacfwd(lambda tokens: apply(tokens[None])[0]))(image))
  tokens = np.arange(image.shape[0])
  return np.abs(jacobian[tokens, :, tokens, :]).max(axis=(1, 2))


def test_soft_moe_is_per_image_and_drops_nothing():
  """Each image's slots mix its own tokens only: another image in the batch changes nothing.
  And no token is dropped: every token's output changes with its own input."""
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 8))
  layer = moe.SoftMoE(num_experts=4, mlp_dim=16)
  params = init(layer, x)
  together = layer.apply({"params": params}, x)
  alone = layer.apply({"params": params}, x[1:2])
  chex.assert_trees_all_close(together[1:2], alone, atol=1e-6)
  assert np.all(own_token_gradients(lambda y: layer.apply({"params": params}, y), x[1]) > 1e-3)
  # The check sees drops: a sparse layer with 4 slots for 7 tokens leaves some unchanged.
  sparse = moe.SparseMoE(num_experts=4, mlp_dim=16, top_k=1, capacity_factor=0.25)
  sparse_params = init(sparse, x)
  gradients = own_token_gradients(lambda y: sparse.apply({"params": sparse_params}, y)[0], x[1])
  assert np.sum(gradients == 0) >= 3


# The family, training, sizes.


def test_moe_layers_place_the_experts():
  assert moe.moe_layer_indices("every2", 12) == (1, 3, 5, 7, 9, 11)
  assert moe.moe_layer_indices("last2", 12) == (10, 11)
  assert moe.moe_layer_indices("last_half", 12) == (6, 7, 8, 9, 10, 11)
  assert moe.moe_layer_indices((0, 5), 12) == (0, 5)
  model = models.create_model("vmoe_small_patch32_224_e8_last2")
  blocks = models.param_shapes(model)["Transformer"]
  assert [name for name in sorted(blocks) if "MoeBlock_0" in blocks[name]] == [
      "encoderblock_5", "encoderblock_7"]  # V-MoE's last two odd blocks of 8.


@pytest.mark.parametrize("options,match", [
    (dict(moe_type="hard"), "Unknown moe_type 'hard'; use one of: 'sparse', 'soft'"),
    (dict(top_k=9), "top_k=9: each token picks 1 to num_experts=8 experts"),
    (dict(num_experts=0), "num_experts=0: must be a positive integer"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0: must be > 0"),
    (dict(moe_layers="every0"), "moe_layers='every0' for depth 4: N must be in [1, 4]"),
    (dict(moe_layers="odd"), "Unknown moe_layers 'odd': use 'every2'"),
    (dict(moe_layers="last_half", moe_type="soft", group_size=0),
     "group_size=0: must be a positive integer"),
    (dict(moe_layers=(1, 7)), "moe_layers=(1, 7): give distinct block indices in [0, 3]"),
])
def test_bad_moe_options_are_errors_that_say_what_to_give(options, match):
  model = models.create_model("vmoe", variant="mu/4", image_size=16, num_classes=10, **options)
  with pytest.raises(ValueError, match=re.escape(match)):
    models.param_shapes(model)


def test_scanned_layers_and_training_gradients():
  model = models.create_model("vmoe", variant="mu/4", width=32, mlp_dim=64, num_heads=2,
                              image_size=8, num_classes=10, num_experts=4, scan_layers=True)
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 3))
  params = models.init_params(model)

  def loss(params):
    logits, out = model.apply({"params": params}, images, train=True,
                              rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.mean(logits ** 2) + sum(out["aux_loss"].values()), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)  # Jitted: half the time of eager.
  assert set(out["aux_loss"]) == {"moe_importance", "moe_load"}
  assert 0 <= out["aux_metrics"]["moe_dropped"] < 1
  block = grads["Transformer"]["encoderblock"]["block_1"]["MoeBlock_0"]  # (2 units, ...)
  for leaf in jax.tree_util.tree_leaves(block):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)  # Router and every expert learn.


def _millions(model, **overrides):
  model = models.create_model(model, **overrides)
  return model.parameter_counts(models.param_shapes(model))["total"] / 1e6


@pytest.mark.parametrize("variant,moe_layers,printed", [
    ("S/32", "every2", 296.9), ("B/16", "every2", 979.0), ("L/16", "every2", 3446.0),
    ("H/14", (23, 25, 27, 29, 31), 2688.6)])
def test_vmoe_sizes_are_the_papers(variant, moe_layers, printed):
  """V-MoE's Table 7 (E=32): counted with its JFT head (18,291 classes) and pre-logits."""
  width = moe.decode_vmoe_variant(variant)["width"]
  total = _millions("vmoe", variant=variant, num_experts=32, moe_layers=moe_layers,
                    num_classes=18291, representation_size=width)
  assert round(total, 1) == printed


def test_soft_moe_sizes_and_flops_are_the_papers():
  """Soft MoE's Tables 1 and 8 (JFT head of 29,593 classes): S/16 933M, B/16 3.7B
  parameters; S/16 8.6 GFLOPs per image at evaluation against ViT-S/16's 9.2 (two
  FLOPs a multiply-add)."""
  assert math.floor(_millions("soft_moe_small_patch16_224_e128", num_classes=29593)) == 933
  assert round(_millions("soft_moe_base_patch16_224_e128", num_classes=29593) / 1e3, 1) == 3.7
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  for name, options, printed in (("soft_moe_small_patch16_224_e128", {}, 8.6),
                                 ("vit", dict(variant="S/16", pool_type="gap"), 9.2)):
    model = models.create_model(name, num_classes=29593, **options)
    macs = model_table.count_macs(lambda p, x, model=model: model.apply({"params": p}, x),
                                  models.param_shapes(model), images)
    assert round(2 * macs / 1e9, 1) == printed, name
  row = model_table.model_row("soft_moe_small_patch16_224_e128", macs=False)
  assert row["active_params"] == row["params"]  # Every expert reaches every token.


def test_model_table_counts_active_parameters_of_sparse_models():
  row = model_table.model_row("vmoe_small_patch32_224_e8_every2", macs=False)
  model = models.create_model("vmoe_small_patch32_224_e8_every2")
  per_expert = 2 * 512 * 2048 + 2048 + 512
  moe_layers = 4  # Blocks 1, 3, 5, 7 of 8.
  assert row["params"] - row["active_params"] == moe_layers * (8 - 2) * per_expert
  assert model.top_k == 2


# Expert parallelism: one subprocess with 8 CPU devices.


@pytest.fixture(scope="module")
def multidevice():
  # LLVM's optimisations would be most of the time: every run here is compiled alike.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "moe_multidevice.py")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_expert_parallel_training_equals_one_device(multidevice):
  for kind in ("sparse", "soft"):
    single = multidevice[f"{kind}/one_device"]
    assert len(single["losses"]) == 3
    for name, run in multidevice.items():
      if not name.startswith(kind + "/") or run is single:
        continue
      np.testing.assert_allclose(run["losses"], single["losses"], atol=1e-5, err_msg=name)
      np.testing.assert_allclose(run["grad_norms"], single["grad_norms"], atol=1e-5,
                                 err_msg=name)
      np.testing.assert_allclose(run["dropped"], single["dropped"], atol=1e-6, err_msg=name)
      for param, values in single["params"].items():
        np.testing.assert_allclose(run["params"][param], values, atol=1e-4,
                                   err_msg=f"{name} {param}")
  assert any(d > 0 for d in multidevice["sparse/one_device"]["dropped"])  # Capacity bites.


def test_each_device_holds_its_share_of_the_experts(multidevice):
  """Experts (and their Adam moments) split 8 ways: 1/8 each; 4 ways beside fsdp=2: 1/8."""
  for name in ("sparse/expert8", "soft/expert8", "sparse/fsdp2_expert4"):
    memory = multidevice[name]["memory"]
    assert len(memory["per_device"]) == 8
    for device, nbytes in memory["per_device"].items():
      assert nbytes <= memory["total"] / 8 * 1.05, (name, device, nbytes, memory["total"])
  memory = multidevice["sparse/data8"]["memory"]  # Without the expert axis: replicated.
  assert all(n == memory["total"] for n in memory["per_device"].values())


def test_expert_parallel_steps_move_tokens_with_all_to_all(multidevice):
  assert multidevice["sparse/expert8"]["all_to_all"] >= 2  # To the experts and back.
  assert multidevice["soft/expert8"]["all_to_all"] >= 2
  assert multidevice["sparse/one_device"]["all_to_all"] == 0


# What a user sees from the command line.


def test_cli_bad_moe_value_exits_2_and_writes_nothing(tmp_path):
  cli_checks.assert_train_rejects(
      "configs/moe_digits.py", "model.top_k=9", tmp_path / "w",
      starts_with="error: config.model: top_k=9: each token picks 1 to num_experts=8 experts")


def test_an_expert_axis_that_does_not_divide_the_experts_is_a_config_error(tmp_path):
  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vitjax.train import validation  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(ROOT, "configs", "moe_digits.py:experts=6"))
  config_lib.apply_overrides(config, ["mesh.data=2", "mesh.expert=4"])
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "splits the 'expert' axis of parameter Transformer/encoderblock_1/MoeBlock_0/Experts_0/"
      "Dense_0/bias (size 6, dimension 0 of (6, 256)) 4 ways over expert, and 4 does not "
      "divide 6: choose config.mesh.expert among the divisors of 6")):
    validation.validate(config, str(tmp_path / "run"), devices=jax.devices()[:1] * 8)
  assert not (tmp_path / "run").exists()
