"""ViT / DeiT: names, published parameter counts, outputs, train mode."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import models
from vitjax.models import posemb, vit

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32,
            num_classes=5)


@pytest.mark.parametrize("name,expected", [
    ("vit_base_patch16_224", 86_567_656),
    ("deit_small_distilled_patch16_224", 22_436_432),
    ("vit_tiny_patch16_224", 5_717_416),
    ("vit_small_patch16_224", 22_050_664),
    ("vit_base_patch32_224", 88_224_232),
    ("vit_large_patch16_224", 304_326_632),
    ("vit_huge_patch14_224", 630_764_800),
    ("deit_tiny_patch16_224", 5_717_416),
    ("deit_tiny_distilled_patch16_224", 5_910_800),
    ("deit_base_distilled_patch16_224", 87_338_192),
])
def test_parameter_counts_equal_published(name, expected):
  assert models.count_params(models.param_shapes(vitjax.create_model(name))) == expected


def test_timm_defaults_and_big_vision_style_agree():
  timm_style = vitjax.create_model("vit_base_patch16_224")
  assert timm_style.num_classes == 1000 and timm_style.image_size == 224
  big_vision_style = vitjax.create_model("vit", variant="B/16", num_classes=1000, image_size=224)
  # The same model: every parameter has the same name, shape and dtype.
  chex.assert_trees_all_equal_shapes_and_dtypes(models.param_shapes(timm_style),
                                                models.param_shapes(big_vision_style))
  assert big_vision_style.width == 768 and big_vision_style.patch_size == 16


def test_explicit_fields_override_the_variant():
  model = vitjax.create_model("vit", variant="S/16", depth=3, num_classes=7)
  assert (model.width, model.depth, model.num_classes) == (384, 3, 7)


def test_list_models_filters_by_pattern():
  deits = vitjax.list_models("deit_*distilled*")
  assert "deit_small_distilled_patch16_224" in deits
  assert all(n.startswith("deit_") and "distilled" in n for n in deits)
  for required in ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                   "vit_base_patch32_224", "vit_large_patch16_224", "vit_huge_patch14_224",
                   "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                   "deit_tiny_distilled_patch16_224", "deit_base_distilled_patch16_224"]:
    assert required in vitjax.list_models()


def test_unknown_model_lists_closest_names():
  with pytest.raises(vitjax.UnknownModelError, match="vit_base_patch16_224"):
    vitjax.create_model("vit_bse_patch16_224")


def test_unknown_option_suggests_the_field():
  with pytest.raises(TypeError, match="did you mean 'num_heads'"):
    vitjax.create_model("vit", variant="Ti/16", num_head=3)


def test_bad_variant_is_explained():
  with pytest.raises(ValueError, match="SIZE/PATCH"):
    vitjax.create_model("vit", variant="X/16")


@pytest.mark.parametrize("pool_type", ["token", "gap", "map", "none"])
@pytest.mark.parametrize("posemb_type", ["learn", "sincos2d"])
def test_forward_shapes_and_named_outputs(pool_type, posemb_type):
  model = vitjax.create_model("vit", pool_type=pool_type, posemb=posemb_type, **TINY)
  params = vitjax.init_params(model)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  logits, out = model.apply({"params": params}, images)
  # 'none' keeps every token: per-token logits for dense heads.
  per_example = (3, 16) if pool_type == "none" else (3,)
  assert logits.shape == per_example + (5,)
  assert out["pre_logits"].shape == per_example + (32,)
  assert out["tokens"].shape == (3, 16, 32)
  assert out["encoded"].shape == (3, 16 + model.num_prefix_tokens, 32)
  np.testing.assert_array_equal(out["logits"], logits)
  assert ("pos_embedding" in params) == (posemb_type == "learn")


def test_representation_size_adds_tanh_pre_logits():
  model = vitjax.create_model("vit", representation_size=12, **TINY)
  params = vitjax.init_params(model)
  _, out = model.apply({"params": params}, jnp.ones((2, 32, 32, 3)))
  assert params["pre_logits"]["kernel"].shape == (32, 12)
  assert out["pre_logits"].shape == (2, 12) and jnp.all(jnp.abs(out["pre_logits"]) <= 1)


def test_deit_inference_averages_the_two_heads():
  model = vitjax.create_model("vit", distilled=True, head_zeroinit=False, **TINY)
  params = vitjax.init_params(model)
  logits, out = model.apply({"params": params}, jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3)))
  assert model.num_prefix_tokens == 2 and params["pos_embedding"].shape == (1, 18, 32)
  assert not np.allclose(out["logits_cls"], out["logits_dist"])
  np.testing.assert_allclose(logits, (out["logits_cls"] + out["logits_dist"]) / 2, rtol=1e-6)


def test_inference_is_deterministic_and_training_uses_dropout_rng():
  model = vitjax.create_model("vit", dropout=0.2, drop_path_rate=0.2, head_zeroinit=False, **TINY)
  params = vitjax.init_params(model)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  a, _ = model.apply({"params": params}, images)
  b, _ = model.apply({"params": params}, images)
  np.testing.assert_array_equal(a, b)
  t1, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  t2, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(t1, t2) and not np.allclose(t1, a)
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, images, train=True)


def test_drop_path_rate_zero_is_identity_in_training():
  model = vitjax.create_model("vit", head_zeroinit=False, **TINY)
  params = vitjax.init_params(model)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  a, _ = model.apply({"params": params}, images)
  b, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  model = vitjax.create_model("vit", dtype=jnp.bfloat16, head_zeroinit=False, **TINY)
  params = vitjax.init_params(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  # A head with unit-variance outputs (the initial one gives logits below 0.25), so that
  # the tolerance below is small next to the logits.
  head = params["head"]["kernel"]
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), head.shape) / np.sqrt(
      head.shape[0])
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  logits, out = model.apply({"params": params}, images)
  assert out["encoded"].dtype == jnp.bfloat16
  reference, _ = vitjax.create_model("vit", head_zeroinit=False, **TINY).apply(
      {"params": params}, images)
  scale = float(np.std(reference))
  assert scale > 0.5
  # bfloat16 keeps 8 bits of mantissa: through this model, about 2% of the logits' spread.
  np.testing.assert_allclose(logits.astype(jnp.float32), reference, atol=0.05 * scale)


def test_other_resolution_resizes_position_embeddings():
  model = vitjax.create_model("vit", head_zeroinit=False, **TINY)
  params = vitjax.init_params(model)
  logits, out = model.apply({"params": params}, jnp.ones((1, 48, 48, 3)))
  assert out["tokens"].shape == (1, 36, 32) and logits.shape == (1, 5)


def test_sincos_2d_is_the_closed_form():
  table = np.asarray(posemb.sincos_2d(3, 5, 8))[0]
  # Row y*5+x: [sin(x w), cos(x w), sin(y w), cos(y w)] with w = 1/10000**(i/(d/4-1)).
  omega = 1.0 / 10_000 ** (np.arange(2) / 1)
  y, x = 2, 3
  expected = np.concatenate([np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)])
  np.testing.assert_allclose(table[y * 5 + x], expected, rtol=1e-6)


def test_resize_posemb_keeps_prefix_and_is_identity_at_same_grid():
  table = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 16, 8))
  np.testing.assert_array_equal(posemb.resize_posemb(table, 4, 1), table)
  resized = posemb.resize_posemb(table, 8, 1)
  assert resized.shape == (1, 65, 8)
  np.testing.assert_array_equal(resized[:, :1], table[:, :1])
  constant = jnp.ones((1, 16, 8))
  np.testing.assert_allclose(posemb.resize_posemb(constant, 6), jnp.ones((1, 36, 8)), rtol=1e-6)


def test_variant_decoding_matches_the_size_table():
  assert vit.decode_variant("L/14") == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=14)


def test_model_table_tool_lists_published_counts_and_macs(capsys):
  from vitjax.tools import model_table
  rows = model_table.main(["vit_base_patch16_*", "--markdown"])
  printed = capsys.readouterr().out
  assert "| `vit_base_patch16_224` | 86,567,656 | 224 | 17.56 |" in printed
  assert "vit_base_patch16_384" in printed and "deit" not in printed
  # The papers' numbers, rounded as they round them: ViT-B/16 17.6, DeiT-S 4.6, Mixer-B/16 12.6.
  assert round(rows[0]["gmacs"], 1) == 17.6
  assert round(model_table.model_row("deit_small_patch16_224")["gmacs"], 1) == 4.6
  assert round(model_table.model_row("mixer_b16_224")["gmacs"], 1) == 12.6
  # XLA's cost analysis also counts element-wise work: a little over 2 FLOPs per MAC.
  assert 2.0 < rows[0]["xla_gflops"] / rows[0]["gmacs"] < 2.2
  # A two-tower model's image-only forward returns no logits; its image tower still counts.
  clip = model_table.model_row("clip_vit_base_patch16")
  assert round(clip["gmacs"], 1) == 17.6 and 2.0 < clip["xla_gflops"] / clip["gmacs"] < 2.2


def test_model_table_without_a_match_is_an_error():
  result = subprocess.run([sys.executable, "-m", "vitjax.tools.model_table", "*nonsense*"],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2 and not result.stdout  # Not an empty table that reads as success.
  assert "error: no registered model matches '*nonsense*'" in result.stderr
  assert "'vit_*'" in result.stderr and "Traceback" not in result.stderr
  from vitjax.tools import model_table
  assert "closest: vit_base_patch16_224" in model_table.no_match_message("vit_base_patch16_225*")
  assert "only names a family" in model_table.no_match_message("vit")


def test_mac_counter_counts_matmuls_and_convolutions():
  from vitjax.tools import model_table
  matmul = lambda a, b: a @ b
  assert model_table.count_macs(matmul, jnp.ones((3, 4)), jnp.ones((4, 5))) == 60
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Output 1x3x3x8, each from a 2x2x4 window: 72 outputs x 16 MACs.
  assert model_table.count_macs(conv, jnp.ones((1, 4, 4, 4)), jnp.ones((2, 2, 4, 8))) == 72 * 16
