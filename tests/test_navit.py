"""NaViT on packed sequences: packing changes nothing, and SigLIP 2 / timm NaFlexVit weights load.

The oracles: each image's own forward (packing), torch's F.interpolate and
jax.image.resize (the position-embedding resize), transformers' Siglip2VisionModel
(built here, random weights), and timm 1.0.31's NaFlexVit (pinned in
tests/data/naflexvit_*.npz; tests/data/make_naflexvit_pins.py made them).
"""

import functools
import json
import os

import chex
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.convert import CheckpointMismatchError, files
from vitjax.models import count_params, navit, param_shapes

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY = dict(num_classes=5, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=4, max_grid=6)
# (rows, cols) patch grids: smaller than, equal to and larger than the 6 x 6 grid.
GRIDS = ((2, 5), (6, 6), (7, 3))


def random_images(grids=GRIDS, patch_size=4, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(r * patch_size, c * patch_size, 3)).astype(np.float32)
          for r, c in grids]


def init(model, inputs, seed=0):
  """Random parameters of `model`'s shapes: norms near 1, the rest N(0, 0.2), no compile."""
  shapes = jax.eval_shape(lambda: flax.linen.unbox(model.init(jax.random.PRNGKey(0), inputs)))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    noise = rng.normal(size=shape.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.2 * noise

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@functools.lru_cache(maxsize=None)
def apply_fn(model):
  return jax.jit(lambda params, inputs: model.apply({"params": params}, inputs))


def test_patchify_is_the_conv_kernel_layout():
  """patches @ kernel.reshape(p*p*C, width) is the ViT's patch conv (and HF Siglip2's layout)."""
  image = random_images([(2, 3)])[0]
  patches, coords, grid = navit.patchify(image, 4)
  assert grid == (2, 3)
  np.testing.assert_array_equal(coords, [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
  kernel = np.random.default_rng(1).normal(size=(4, 4, 3, 8)).astype(np.float32)
  conv = jax.lax.conv_general_dilated(image[None], kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(patches @ kernel.reshape(-1, 8), np.asarray(conv).reshape(6, 8),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="whole number"):
    navit.patchify(image[:7], 4)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("out_size", [1, 3, 4, 6, 9, 13])
def test_resize_weights_match_torch_and_jax(method, out_size):
  """The per-sample weights are F.interpolate(antialias=True) and jax.image.resize."""
  torch = pytest.importorskip("torch")
  size = 6
  weights = np.asarray(navit.resize_weights(np.arange(out_size), out_size, size, method))
  basis = np.eye(size, dtype=np.float32)
  # Each basis vector as a (1, size) image, resized to (1, out_size). (Not (size, 1): torch
  # 2.13's antialiased CPU kernel gives every output row the first one's weights there.)
  reference = torch.nn.functional.interpolate(
      torch.from_numpy(basis)[:, None, None, :], size=(1, out_size), mode=method,
      align_corners=False, antialias=True)[:, 0, 0, :].numpy().T
  np.testing.assert_allclose(weights, reference, atol=1e-6)
  jax_method = {"bilinear": "linear", "bicubic": "cubic"}[method]
  resized = jax.vmap(lambda x: jax.image.resize(x, (out_size,), jax_method, antialias=True))(
      jnp.asarray(basis))
  np.testing.assert_allclose(weights, np.asarray(resized).T, atol=1e-6)
  if method == "bilinear":  # Without antialias: torch's plain (linear) interpolation.
    plain = torch.nn.functional.interpolate(torch.from_numpy(basis)[:, None], size=out_size,
                                            mode="linear", align_corners=False)[:, 0].numpy().T
    np.testing.assert_allclose(
        navit.resize_weights(np.arange(out_size), out_size, size, method, antialias=False),
        plain, atol=1e-6)


def test_learned_grid_is_the_resized_grid():
  """A token's embedding is F.interpolate's (bicubic, antialiased) of the grid at its cell."""
  torch = pytest.importorskip("torch")
  model = navit.NaViT(**{**TINY, "depth": 0}, posemb="learned_grid", posemb_resize="bicubic")
  images = random_images(((3, 8),))
  inputs = navit.pack(images, 4, length=24, max_images=1)
  params = init(model, inputs)
  _, out = apply_fn(model)(params, inputs)
  table = np.asarray(params["pos_embedding"])
  resized = torch.nn.functional.interpolate(
      torch.from_numpy(table).permute(2, 0, 1)[None], size=(3, 8), mode="bicubic",
      align_corners=False, antialias=True)[0].permute(1, 2, 0).reshape(24, -1).numpy()
  stem = navit.pack(images, 4, length=24, max_images=1)["patches"][0] @ np.asarray(
      params["embedding"]["kernel"]).reshape(48, -1) + np.asarray(params["embedding"]["bias"])
  np.testing.assert_allclose(np.asarray(out["stem"][0]) - stem, resized, atol=2e-5)


# Every position embedding with MAP pooling; GAP (with per-image registers and fc_norm) once.
PACKING_CASES = [(posemb, "map") for posemb in navit.POSEMBS] + [("learned_grid", "gap")]


@pytest.mark.parametrize("posemb,pool_type", PACKING_CASES)
def test_packed_forward_equals_each_images_own(posemb, pool_type):
  """Three images of different sizes in one sequence, padding and an empty slot after them,
  against each image alone in a sequence of its own (one batch of three)."""
  registers = 1 if pool_type == "gap" else 0
  model = navit.NaViT(**{**TINY, "depth": 1}, posemb=posemb, pool_type=pool_type,
                      num_registers=registers, fc_norm=pool_type == "gap",
                      posemb_keep_aspect=posemb == "factorized_grid",
                      posemb_resize="bicubic" if posemb == "learned_grid" else "bilinear")
  images = random_images()
  packed = navit.pack(images, 4, length=72, max_images=4)  # 10 + 36 + 21 tokens, 5 padding.
  params = init(model, packed)
  logits, out = apply_fn(model)(params, packed)
  chex.assert_shape(logits, (1, 4, 5))
  chex.assert_shape(out["tokens"], (1, 72, 32))
  chex.assert_shape(out["pre_logits"], (1, 4, 32))
  np.testing.assert_array_equal(out["image_mask"], [[True, True, True, False]])
  np.testing.assert_array_equal(out["pre_logits"][0, 3], 0.0)
  if registers:
    chex.assert_shape(out["registers"], (1, 4, 1, 32))
  alone = navit.pack(images, 4, length=36, max_images=1)
  assert alone["segment_ids"].shape == (3, 36)
  own_logits, own = apply_fn(model)(params, alone)
  start = 0
  for k, n in enumerate(np.sum(alone["segment_ids"] > 0, axis=1)):
    np.testing.assert_allclose(out["tokens"][0, start:start + n], own["tokens"][k, :n],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pre_logits"][0, k], own["pre_logits"][k, 0],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[0, k], own_logits[k, 0], atol=1e-5, rtol=1e-5)
    start += n


def test_dropped_tokens():
  """An image with tokens dropped: its kept tokens' position embeddings are the full image's
  (the grid, not the kept coords, sets the resize), and packing still changes nothing."""
  model = navit.NaViT(**{**TINY, "depth": 1}, posemb="learned_grid")
  image = random_images(((5, 4),))[0]
  patches, coords, grid = navit.patchify(image, 4)
  keep = np.random.default_rng(3).permutation(20)[:9]  # Drops the last row and column too.
  dropped = (patches[keep], coords[keep], grid)
  other = random_images(((3, 3),), seed=1)[0]
  packed = navit.pack([other, dropped], 4, length=24, max_images=3)
  full = navit.pack([image], 4, length=20, max_images=1)
  params = init(model, packed)
  _, out = apply_fn(model)(params, packed)
  _, out_full = apply_fn(model)(params, full)
  np.testing.assert_allclose(out["stem"][0, 9:18], out_full["stem"][0, keep], atol=1e-5)
  _, own = apply_fn(model)(params, navit.pack([dropped], 4, length=9, max_images=1))
  np.testing.assert_allclose(out["pre_logits"][0, 1], own["pre_logits"][0, 0], atol=1e-5,
                             rtol=1e-5)


def test_pallas_attention_equals_xla():
  """The packed encoder and the per-image MAP head through the Pallas kernels (interpreted)."""
  options = dict(TINY, depth=1, posemb="factorized", pool_type="map")
  packed = navit.pack(random_images(((2, 3), (3, 2), (2, 2))), 4, length=20, max_images=3,
                      num_sequences=2)
  model = navit.NaViT(**options, attention_impl="xla")
  params = init(model, packed)
  logits, out = apply_fn(model)(params, packed)
  logits_pallas, out_pallas = apply_fn(navit.NaViT(**options, attention_impl="pallas"))(
      params, packed)
  valid = packed["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(out_pallas["tokens"])[valid],
                             np.asarray(out["tokens"])[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits_pallas, logits, atol=1e-5, rtol=1e-5)


def test_images_and_padded_batches():
  """NHWC images are sequences of one image; from_padded reads HF's padded layout."""
  model = navit.NaViT(**TINY)
  images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  params = init(model, images)
  logits, _ = apply_fn(model)(params, images)
  chex.assert_shape(logits, (2, 1, 5))
  padded = np.zeros((2, 8, 48), np.float32)
  for i, image in enumerate(images):
    padded[i, :6] = navit.patchify(image, 4)[0]
  inputs = navit.from_padded(padded, np.arange(8) < np.array([[6], [6]]), np.array([[2, 3]] * 2))
  np.testing.assert_array_equal(inputs["coords"][0, :7], [[0, 0], [0, 1], [0, 2], [1, 0],
                                                          [1, 1], [1, 2], [0, 0]])
  np.testing.assert_allclose(apply_fn(model)(params, inputs)[0], logits, atol=1e-5)


def test_siglip2_matches_transformers(tmp_path):
  """A random Siglip2VisionModel (transformers) on a padded batch of four image shapes."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.Siglip2VisionConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
      patch_size=4, num_patches=16, num_channels=3)
  torch.manual_seed(0)
  hf_model = transformers.Siglip2VisionModel(config).eval()
  with torch.no_grad():
    for name, p in hf_model.named_parameters():  # Every parameter random: each mapping counts.
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
              else 0.2 * torch.randn_like(p) if "position" not in name
              else 0.5 * torch.randn_like(p))
  shapes = np.array([[2, 6], [5, 3], [4, 4], [3, 2]])  # 12, 15, 16 and 6 of 16 tokens.
  rng = np.random.default_rng(0)
  pixel_values = rng.normal(size=(4, 16, 48)).astype(np.float32)
  mask = np.arange(16)[None] < shapes.prod(1)[:, None]
  pixel_values[~mask] = 0.0
  with torch.no_grad():
    expected = hf_model(pixel_values=torch.from_numpy(pixel_values),
                        pixel_attention_mask=torch.from_numpy(mask.astype(np.int64)),
                        spatial_shapes=torch.from_numpy(shapes))
  path = str(tmp_path / "model.safetensors")
  files.write_safetensors({k: v.numpy() for k, v in hf_model.state_dict().items()}, path)
  model = vitjax.convert.naflex.model_from_hf_config(hf_model.config)
  params = vitjax.load_weights(model, path)
  pooled, out = apply_fn(model)(params, navit.from_padded(pixel_values, mask, shapes))
  np.testing.assert_allclose(np.asarray(out["tokens"])[mask],
                             expected.last_hidden_state.numpy()[mask], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled[:, 0], expected.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


# vitjax options of each timm pin (tests/data/make_naflexvit_pins.py has timm's).
TIMM_PINS = {
    "gap": dict(posemb_resize="bicubic", layer_scale_init=1e-5, pool_type="gap",
                num_registers=2, fc_norm=True),
    "map": dict(posemb_resize="bicubic", layer_scale_init=1e-5, pool_type="map",
                num_registers=1),
    "siglip": dict(posemb_resize="bilinear", pool_type="map", gelu_approximate=True),
    "parfac": dict(posemb="factorized_grid", posemb_keep_aspect=True, layer_scale_init=1e-5,
                   pool_type="gap", num_registers=2, fc_norm=True),
}


def load_pin(name, tmp_path):
  data = np.load(os.path.join(DATA, f"naflexvit_{name}.npz"), allow_pickle=False)
  path = str(tmp_path / f"{name}.npz")
  files.write_npz({k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")},
                  path)
  return data, path


@pytest.mark.parametrize("name", sorted(TIMM_PINS))
def test_timm_naflexvit_pins(name, tmp_path):
  data, path = load_pin(name, tmp_path)
  timm_config = json.loads(str(data["timm_config"]))
  assert timm_config["timm"] == "1.0.31"
  model = navit.NaViT(**{**TINY, "num_classes": 7, "posemb": "learned_grid", **TIMM_PINS[name]})
  params = vitjax.load_weights(model, path)
  valid = data["input/patch_valid"]
  inputs = navit.from_padded(data["input/patches"], valid, coords=data["input/patch_coord"])
  logits, out = apply_fn(model)(params, inputs)
  np.testing.assert_allclose(np.asarray(out["tokens"])[valid], data["output/tokens"][valid],
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out["pre_logits"][:, 0], data["output/pre_logits"], atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(logits[:, 0], data["output/logits"], atol=1e-4, rtol=1e-4)


def test_loading_errors_and_layouts(tmp_path):
  """A mismatch names what differs; head='reinit'; scan_layers; vitjax's own .npz round trip."""
  data, path = load_pin("map", tmp_path)
  options = {**TINY, "num_classes": 7, "posemb": "learned_grid", **TIMM_PINS["map"]}
  with pytest.raises(CheckpointMismatchError, match="head/kernel"):
    vitjax.load_weights(navit.NaViT(**{**options, "num_classes": 3}), path)
  with pytest.raises(CheckpointMismatchError, match="pool_type"):
    vitjax.load_weights(navit.NaViT(**{**options, "pool_type": "gap"}), path)
  fresh = vitjax.load_weights(navit.NaViT(**{**options, "num_classes": 3}), path, head="reinit")
  assert fresh["head"]["kernel"].shape == (32, 3)
  params = vitjax.load_weights(navit.NaViT(**options), path)
  scanned = vitjax.load_weights(navit.NaViT(**options, scan_layers=True), path)
  assert scanned["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
  vitjax.save_weights(params, str(tmp_path / "vitjax.npz"))
  again = vitjax.load_weights(navit.NaViT(**options), str(tmp_path / "vitjax.npz"))
  chex.assert_trees_all_equal(again, params)
  inputs = navit.from_padded(data["input/patches"], data["input/patch_valid"],
                             coords=data["input/patch_coord"])
  np.testing.assert_allclose(
      apply_fn(navit.NaViT(**options, scan_layers=True))(scanned, inputs)[0],
      data["output/logits"][:, None], atol=1e-4, rtol=1e-4)


# Parameter counts of transformers' Siglip2VisionModel (patch 16, num_patches 256), counted on
# the meta device; timm's naflexvit_* names are pinned in tests/test_timm_names.py.
PARAM_COUNTS = {
    "siglip2_naflex_base_patch16": 92_930_304,  # hidden 768, 12 layers, 12 heads, MLP 3072.
    "siglip2_naflex_so400m_patch16": 427_888_064,  # hidden 1152, 27 layers, 16 heads, 4304.
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
  model = vitjax.create_model(name, scan_layers=True)  # The same count, traced faster.
  assert count_params(param_shapes(model)) == PARAM_COUNTS[name]


def test_family_and_errors():
  model = vitjax.create_model("navit", variant="S/16", num_classes=10)
  assert (model.width, model.depth, model.patch_size) == (384, 12, 16)
  with pytest.raises(ValueError, match="posemb"):
    navit.NaViT(**TINY, posemb="learn").init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="lacks"):
    navit.NaViT(**TINY).init(jax.random.PRNGKey(0), {"patches": np.zeros((1, 4, 48))})
