"""Memory switches: `remat_policy` and `scan_layers` change memory, never the numbers.

Scanned and unscanned models agree given converted params (scan_params /
unscan_params), every remat policy gives the same loss and gradients, and
load_weights reads either block layout into a model of either.
Run: python -m pytest -q tests/test_scan_remat.py
"""

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.convert import CheckpointMismatchError, scan_params, unscan_params
from vitjax.convert import files
from vitjax.models import param_shapes
from vitjax.models.vit import REMAT_POLICIES

TINY = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8, image_size=16,
            num_classes=5)
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def tiny_model(**overrides):
  return vitjax.create_model("vit", **{**TINY, **overrides})


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def assert_trees_close(a, b, exact=False):
  a, b = flat(a), flat(b)
  assert sorted(a) == sorted(b)
  for name in a:
    assert np.shape(a[name]) == np.shape(b[name]), name
    if exact:
      np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    else:
      np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), err_msg=name,
                                 **TOLERANCE)


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)


def random_params(model, seed=0):
  """Random values of the model's shapes: nothing to compile, and no zero head or bias."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                      param_shapes(model))


@pytest.fixture(scope="module")
def params():
  """Unscanned params."""
  return random_params(tiny_model())


def loss_and_grads(model, params, images):
  def loss(params):
    logits, _ = model.apply({"params": params}, images)
    return jnp.mean(jnp.square(logits))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def reference(params, images):
  """Loss and gradients of the plain model: no scan, no remat."""
  return loss_and_grads(tiny_model(), params, images)


# --- Scan ----------------------------------------------------------------------------------

def test_scanned_params_use_big_vision_layout(params):
  shapes = param_shapes(tiny_model(scan_layers=True))
  assert set(shapes["Transformer"]) == {"encoderblock", "encoder_norm"}
  block = shapes["Transformer"]["encoderblock"]
  assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (3, 32, 64)
  assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (3, 32, 2, 16)
  assert block["LayerNorm_0"]["scale"].shape == (3, 32)
  # scan_params gives exactly the tree a scanned model has.
  scanned = scan_params(params, depth=3)
  assert jax.tree.structure(scanned) == jax.tree.structure(shapes)
  assert jax.tree.map(np.shape, scanned) == jax.tree.map(lambda s: s.shape, shapes)


def test_scan_params_round_trip_exact(params):
  scanned = scan_params(params, depth=3)
  np.testing.assert_array_equal(
      scanned["Transformer"]["encoderblock"]["LayerNorm_1"]["bias"][2],
      params["Transformer"]["encoderblock_2"]["LayerNorm_1"]["bias"])
  assert_trees_close(unscan_params(scanned), params, exact=True)
  # Each is a no-op on params already in its layout.
  assert_trees_close(scan_params(scanned, depth=3), scanned, exact=True)
  assert_trees_close(unscan_params(params), params, exact=True)
  with pytest.raises(ValueError, match="depth=4, but the params have 3 blocks"):
    scan_params(params, depth=4)
  broken = unscan_params(scanned)
  del broken["Transformer"]["encoderblock_1"]["LayerNorm_0"]
  with pytest.raises(ValueError, match=r"encoderblock_\{i\}/LayerNorm_0/bias' is missing "
                                       r"for i in \[1\]"):
    scan_params(broken)


def test_scanned_outputs_equal_unscanned(params, images):
  logits, out = jax.jit(tiny_model().apply)({"params": params}, images)
  scanned_logits, scanned_out = jax.jit(tiny_model(scan_layers=True).apply)(
      {"params": scan_params(params, depth=3)}, images)
  np.testing.assert_allclose(scanned_logits, logits, **TOLERANCE)
  np.testing.assert_allclose(scanned_out["encoded"], out["encoded"], **TOLERANCE)
  np.testing.assert_allclose(scanned_out["encoder"]["pre_norm"], out["encoder"]["pre_norm"],
                             **TOLERANCE)
  # Per-block outputs are kept only without scan.
  assert set(out["encoder"]) == {"block00", "block01", "block02", "pre_norm"}
  assert set(scanned_out["encoder"]) == {"pre_norm"}


def test_scanned_gradients_equal_unscanned(params, images, reference):
  loss, grads = loss_and_grads(tiny_model(scan_layers=True), scan_params(params, 3), images)
  np.testing.assert_allclose(loss, reference[0], **TOLERANCE)
  assert_trees_close(unscan_params(grads), reference[1])


def test_scan_train_mode_dropout_and_drop_path(params, images):
  model = tiny_model(scan_layers=True, remat_policy="full", dropout=0.1, drop_path_rate=0.2)
  scanned = scan_params(params, 3)

  @jax.jit
  def train_step(params, rng):
    def loss(params):
      logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
      return jnp.mean(jnp.square(logits)), logits
    return jax.grad(loss, has_aux=True)(params)

  grads, logits = train_step(scanned, jax.random.PRNGKey(1))
  _, logits_again = train_step(scanned, jax.random.PRNGKey(1))
  _, logits_other = train_step(scanned, jax.random.PRNGKey(2))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(logits, logits_again)  # Same rng, same masks.
  assert not np.allclose(logits, logits_other)


def test_scan_drop_path_rate_rises_with_depth(images):
  # drop_path_rate=1 at depth 2: the first block is always kept (rate 0), the last
  # always dropped (rate 1), so training is deterministic and scan must match the loop.
  model = tiny_model(depth=2, drop_path_rate=1.0)
  params = random_params(model)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  apply = lambda model, params: jax.jit(lambda p: model.apply(
      {"params": p}, images, train=True, rngs=rngs))(params)
  logits, out = apply(model, params)
  np.testing.assert_array_equal(out["encoder"]["block01"], out["encoder"]["block00"])
  scanned_logits, _ = apply(tiny_model(depth=2, drop_path_rate=1.0, scan_layers=True),
                            scan_params(params, 2))
  np.testing.assert_allclose(scanned_logits, logits, **TOLERANCE)


def test_scanned_params_carry_the_layers_axis_name():
  boxed = param_shapes(tiny_model(scan_layers=True), boxed=True)
  specs = nn.get_partition_spec(boxed)
  block = specs["Transformer"]["encoderblock"]
  assert tuple(block["MlpBlock_0"]["Dense_0"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(block["MultiHeadDotProductAttention_0"]["out"]["kernel"]) == (
      "layers", "heads", "kv", "embed")
  assert tuple(block["LayerNorm_0"]["scale"]) == ("layers", "embed")
  assert tuple(specs["embedding"]["kernel"]) == (None, None, None, "embed")
  # Unsharded by default: no preset rules table names `layers`.
  assert nn.logical_to_mesh_axes(("layers", "embed"), (("embed", "fsdp"),))[0] is None


# --- Remat ---------------------------------------------------------------------------------

# checkpoint_dots* are jax's other names for dots_saveable* (the same functions).
@pytest.mark.parametrize("policy", [name for name in REMAT_POLICIES
                                    if not name.startswith("checkpoint_dots")])
def test_remat_policy_same_loss_and_gradients(policy, params, images, reference):
  loss, grads = loss_and_grads(tiny_model(remat_policy=policy), params, images)
  np.testing.assert_allclose(loss, reference[0], **TOLERANCE)
  assert_trees_close(grads, reference[1])


def test_remat_under_scan_same_loss_and_gradients(params, images, reference):
  # 'full' under scan runs in test_scan_train_mode_dropout_and_drop_path.
  model = tiny_model(remat_policy="dots_with_no_batch_dims_saveable", scan_layers=True)
  loss, grads = loss_and_grads(model, scan_params(params, 3), images)
  np.testing.assert_allclose(loss, reference[0], **TOLERANCE)
  assert_trees_close(unscan_params(grads), reference[1])


def test_unknown_remat_policy_is_a_clear_error():
  with pytest.raises(ValueError, match=r"Unknown remat_policy 'dots'; use one of: none, full, "
                                       r"nothing_saveable, .*dots_saveable"):
    param_shapes(tiny_model(remat_policy="dots"))


# --- Loading across layouts ----------------------------------------------------------------

def test_unscanned_checkpoint_into_scanned_model_and_back(params, tmp_path):
  vitjax.save_weights(params, tmp_path / "unscanned.npz")
  loaded = vitjax.load_weights(tiny_model(scan_layers=True), tmp_path / "unscanned.npz")
  assert_trees_close(loaded, scan_params(params, 3), exact=True)

  # A scanned model's params are saved stacked, as big_vision's scan=True writes them.
  vitjax.save_weights(loaded, tmp_path / "scanned.npz")
  arrays, _ = files.read_arrays(tmp_path / "scanned.npz")
  assert arrays["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (3, 32, 64)
  assert not any(name.startswith("Transformer/encoderblock_") for name in arrays)
  assert_trees_close(vitjax.load_weights(tiny_model(), tmp_path / "scanned.npz"), params,
                     exact=True)
  assert_trees_close(vitjax.load_weights(tiny_model(scan_layers=True), tmp_path / "scanned.npz"),
                     loaded, exact=True)


def test_scanned_model_mismatch_message(params, tmp_path):
  vitjax.save_weights(params, tmp_path / "depth3.npz")
  with pytest.raises(CheckpointMismatchError) as error:
    vitjax.load_weights(tiny_model(depth=4, scan_layers=True), tmp_path / "depth3.npz")
  message = str(error.value)
  assert "Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel (32, 64)" in message
  assert "The checkpoint has 3 blocks, the model depth=4." in message
  assert "scan_layers=True" in message


def test_scanned_params_export_to_timm(params, tmp_path):
  import safetensors  # pylint: disable=unused-import
  vitjax.save_weights(params, tmp_path / "unscanned.safetensors", format="timm")
  vitjax.save_weights(scan_params(params, 3), tmp_path / "scanned.safetensors", format="timm")
  expected, _ = files.read_arrays(tmp_path / "unscanned.safetensors")
  actual, _ = files.read_arrays(tmp_path / "scanned.safetensors")
  assert sorted(actual) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name])
