"""FlexiViT: PI-resize, any patch size at apply, training at drawn sizes, checkpoints.

PI-resize: the paper's invariance, and timm's `resample_patch_embed` pinned.

timm needs torchvision, which is not in the test extras: its outputs for a seeded
kernel are pinned below, computed with timm 1.0.31 (torch 2.14.1) in a separate
virtualenv as

    kernel = np.random.default_rng(0).normal(size=(4, 4, 2, 3)).astype(np.float32)
    ref = timm.layers.resample_patch_embed(torch.tensor(kernel.transpose(3, 2, 0, 1)),
                                           new_size, interpolation, antialias=True)
    ref = ref.numpy().transpose(2, 3, 1, 0)     # back to (h, w, in, out)
    (ref.sum(), abs(ref).sum(), ref[:, 0, 1, 2])
"""

import json
import os

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import config as config_lib
from vitjax import train as train_lib
from vitjax.convert import CheckpointMismatchError
from vitjax.convert import flexi as convert_flexi
from vitjax.models import flexi
from vitjax.models.posemb import resize_posemb
from vitjax.train import __main__ as cli
from vitjax.train import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLEXIVIT_DIGITS = os.path.join(ROOT, "configs", "flexivit_digits.py")
TIMM_PINS = os.path.join(ROOT, "tests", "data", "timm_flexivit_pins.npz")

TIMM_RESAMPLE_PATCH_EMBED = {
    ((6, 6), "bilinear"): (11.276918, 107.570541,
                           [0.217034, 0.103722, 0.074545, 0.41108, 0.66185, 0.828487]),
    ((3, 3), "bilinear"): (11.276926, 96.498550, [0.708027, 0.514937, 1.056794]),
    ((7, 5), "bilinear"): (11.276936, 110.329002, [0.198278, 0.146925, 0.064761, 0.237617,
                                                   0.456305, 0.740789, 0.918591]),
    ((6, 6), "bicubic"): (11.276927, 86.294159,
                          [0.184789, 0.117861, 0.119285, 0.353746, 0.557651, 0.672079]),
}


def embed(images, kernel, patch_size):
  return jax.lax.conv_general_dilated(images, kernel, (patch_size, patch_size), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("new_patch_size", [6, 8])
def test_resized_patches_with_the_pi_resized_kernel_give_the_same_tokens(method, new_patch_size):
  """The FlexiViT paper's invariance: <resize(x), PI-resize(w)> = <x, w> when growing."""
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 8, 12, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 3, 5)), jnp.float32)
  resized_images = flexi.resize_patches(images, 4, new_patch_size, method)
  chex.assert_shape(resized_images, (2, 2 * new_patch_size, 3 * new_patch_size, 3))
  new_kernel = flexi.pi_resize_patch_kernel(kernel, new_patch_size, method)
  chex.assert_shape(new_kernel, (new_patch_size, new_patch_size, 3, 5))
  chex.assert_trees_all_close(embed(resized_images, new_kernel, new_patch_size),
                              embed(images, kernel, 4), atol=2e-5)
  # Resizing the kernel like an image instead does not keep the tokens.
  naive = jax.image.resize(kernel, new_kernel.shape, "linear")
  assert not np.allclose(embed(resized_images, naive, new_patch_size),
                         embed(images, kernel, 4), atol=1e-2)


@pytest.mark.parametrize("new_size,method", sorted(TIMM_RESAMPLE_PATCH_EMBED))
def test_pi_resize_equals_timms_resample_patch_embed(new_size, method):
  kernel = np.random.default_rng(0).normal(size=(4, 4, 2, 3)).astype(np.float32)
  resized = np.asarray(flexi.pi_resize_patch_kernel(jnp.asarray(kernel), new_size, method))
  total, absolute, column = TIMM_RESAMPLE_PATCH_EMBED[(new_size, method)]
  chex.assert_shape(resized, new_size + (2, 3))
  np.testing.assert_allclose(resized.sum(), total, atol=1e-4)
  np.testing.assert_allclose(np.abs(resized).sum(), absolute, rtol=1e-5)
  np.testing.assert_allclose(resized[:, 0, 1, 2], column, atol=1e-5)


def test_pi_resize_is_jittable_keeps_the_dtype_and_the_same_size_is_identity():
  kernel = jnp.ones((4, 4, 3, 2), jnp.bfloat16)
  assert flexi.pi_resize_patch_kernel(kernel, 4) is kernel
  resized = jax.jit(lambda k: flexi.pi_resize_patch_kernel(k, (6, 6)))(kernel)
  assert resized.dtype == jnp.bfloat16 and resized.shape == (6, 6, 3, 2)
  with pytest.raises(ValueError, match="method must be one of"):
    flexi.resize_matrix((4, 4), (6, 6), "area")


def test_a_vit_runs_at_any_patch_size_with_its_own_weights():
  """`model.apply(..., patch_size=p)`: PI-resized embedding, position embeddings to the grid."""
  model = vitjax.create_model("vit", variant="mu/4", image_size=16, num_classes=10)
  params = {"params": vitjax.init_params(model)}
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  apply = jax.jit(model.apply, static_argnames="patch_size")
  logits, out = apply(params, images)
  same_logits, same = apply(params, images, patch_size=4)  # The model's own: unchanged.
  chex.assert_trees_all_equal((logits, out["head_input"]), (same_logits, same["head_input"]))
  # Each 4x4 patch resized to 8x8, cut at 8: the same tokens, so the same features.
  _, resized = apply(params, flexi.resize_patches(images, 4, 8), patch_size=8)
  chex.assert_trees_all_close(resized["head_input"], out["head_input"], atol=1e-5)
  _, finer = apply(params, images, patch_size=2)  # An 8x8 grid from the 4x4 model.
  chex.assert_shape(finer["tokens"], (2, 64, model.width))
  assert np.isfinite(np.asarray(finer["head_input"])).all()
  with pytest.raises(ValueError, match="not a whole number of 5x5 patches"):
    model.apply(params, images, patch_size=5)
  with pytest.raises(ValueError, match="patch_size must be a positive int"):
    model.apply(params, images, patch_size=0)


def test_train_patch_size_is_the_default_of_training_calls_only():
  model = vitjax.create_model("vit", variant="mu/4", image_size=16, num_classes=10,
                              drop_path_rate=0.0)
  params = {"params": vitjax.init_params(model)}
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  at_2 = model.clone(train_patch_size=2)
  _, trained = at_2.apply(params, images, train=True)
  _, explicit = model.apply(params, images, train=True, patch_size=2)
  chex.assert_shape(trained["tokens"], (2, 64, model.width))
  chex.assert_trees_all_equal(trained["head_input"], explicit["head_input"])
  _, evaluated = at_2.apply(params, images)  # Evaluation keeps the stored size.
  chex.assert_shape(evaluated["tokens"], (2, 16, model.width))
  for bad in (dict(patch_sizes=(2, 0)), dict(patch_sizes=()), dict(train_patch_size=-1)):
    with pytest.raises(ValueError, match="patch"):
      model.clone(**bad).apply(params, images)
  with pytest.raises(ValueError, match="patch_resize must be one of|Unknown patch_resize"):
    model.clone(patch_resize="area").apply(params, images)


def test_the_drawn_patch_size_depends_on_seed_and_step_only_and_is_uniform():
  sizes = (2, 4, 8)
  draws = [trainer_lib.draw_patch_size(sizes, 0, step) for step in range(1, 3001)]
  assert draws == [trainer_lib.draw_patch_size(sizes, 0, step) for step in range(1, 3001)]
  counts = np.array([draws.count(p) for p in sizes])
  assert np.all(np.abs(counts - 1000) < 100), counts  # 1000 +- 3 sigma.
  assert draws != [trainer_lib.draw_patch_size(sizes, 1, step) for step in range(1, 3001)]


def tiny_flexivit_config(**overrides):
  config = config_lib.load_config(
      FLEXIVIT_DIGITS + ":image_size=8,patch_sizes=2-4,eval_patch_sizes=2-4,steps=6")
  config_lib.apply_overrides(config, [
      "batch_size=16", "eval_batch_size=120", "log_every=1", "eval_every=6",
      "checkpoint_every=6", "optimizer.warmup_steps=2"]
      + [f"{k}={v}" for k, v in overrides.items()])
  with config.unlocked():
    config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  return config


def test_flexivit_trains_at_drawn_patch_sizes_with_one_compiled_step_per_size(
    tmp_path, monkeypatch):
  traced = []  # The train_patch_size of every trace of the train step.
  original = trainer_lib._train_step

  def counting_train_step(model, *args, **kwargs):
    traced.append(model.train_patch_size)
    return original(model, *args, **kwargs)

  monkeypatch.setattr(trainer_lib, "_train_step", counting_train_step)
  config = tiny_flexivit_config()
  result = train_lib.train(config, str(tmp_path / "run"), progress=False)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  logged = {row["step"]: row["train/patch_size"] for row in rows if "train/patch_size" in row}
  expected = {step: trainer_lib.draw_patch_size((2, 4), config.seed, step) for step in logged}
  assert sorted(logged) == list(range(1, 7)) and logged == expected
  assert set(logged.values()) == {2, 4}  # Both drawn, ...
  assert sorted(traced) == [2, 4]  # ... and each compiled once.
  for name in ("eval/top1", "eval/top1@p2", "eval/top1@p4", "eval/top5@p2"):
    assert 0.0 <= result[name] <= 1.0, name
  assert result["eval/top1"] == result["eval/top1@p4"]  # mu/4: the stored size is 4.


@pytest.mark.parametrize("patch_sizes,message", [
    ("(3,4)", "[3] do not divide the training images' side (16 px)"),
    ("(0,4)", "must be a non-empty tuple of positive ints"),
])
def test_bad_patch_sizes_exit_2(tmp_path, capsys, patch_sizes, message):
  code = cli.main(["--config", FLEXIVIT_DIGITS, "--workdir", str(tmp_path / "run"),
                   f"--config.model.patch_sizes={patch_sizes}", "--no_progress"])
  assert code == 2
  error = capsys.readouterr().err
  assert error.startswith("error: config.model.patch_sizes=") and message in error, error
  assert not (tmp_path / "run").exists()


# big_vision's FlexiViT layout (big_vision/models/proj/flexi/vit.py): a 32x32 kernel,
# position embeddings of a 7x7 grid of patches only, a class token without one.
TINY_FLEXI = dict(width=8, depth=1, mlp_dim=16, num_heads=2, num_classes=5, pool_type="token")


def big_vision_flexivit_npz(path):
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.5
  width, mlp = TINY_FLEXI["width"], TINY_FLEXI["mlp_dim"]
  heads, head_dim = 2, width // 2
  block = "Transformer/encoderblock_0/"
  arrays = {"embedding/kernel": normal(32, 32, 3, width) * 0.1, "embedding/bias": normal(width),
            "pos_embedding": normal(1, 49, width), "cls": normal(1, 1, width),
            "Transformer/encoder_norm/scale": 1 + normal(width),
            "Transformer/encoder_norm/bias": normal(width),
            "head/kernel": normal(width, 5), "head/bias": normal(5)}
  for norm in ("LayerNorm_0", "LayerNorm_1"):
    arrays.update({f"{block}{norm}/scale": 1 + normal(width), f"{block}{norm}/bias": normal(width)})
  for name in ("query", "key", "value"):
    arrays.update({f"{block}MultiHeadDotProductAttention_0/{name}/kernel": normal(width, heads,
                                                                                 head_dim),
                   f"{block}MultiHeadDotProductAttention_0/{name}/bias": normal(heads, head_dim)})
  arrays.update({f"{block}MultiHeadDotProductAttention_0/out/kernel": normal(heads, head_dim, width),
                 f"{block}MultiHeadDotProductAttention_0/out/bias": normal(width),
                 f"{block}MlpBlock_0/Dense_0/kernel": normal(width, mlp),
                 f"{block}MlpBlock_0/Dense_0/bias": normal(mlp),
                 f"{block}MlpBlock_0/Dense_1/kernel": normal(mlp, width),
                 f"{block}MlpBlock_0/Dense_1/bias": normal(width)})
  np.savez(path, **arrays)
  return arrays


def test_big_vision_flexivit_npz_loads_as_it_is_and_runs_at_patch_16(tmp_path):
  arrays = big_vision_flexivit_npz(tmp_path / "flexi.npz")
  model = vitjax.create_model("vit", **TINY_FLEXI, **convert_flexi.BIG_VISION_FLEXIVIT)
  params = vitjax.load_weights(model, str(tmp_path / "flexi.npz"))
  flat = traverse_util.flatten_dict(params, sep="/")
  assert set(flat) == set(arrays)
  for name, value in arrays.items():  # Nothing converted.
    np.testing.assert_array_equal(flat[name], value, err_msg=name)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 240, 240, 3)), jnp.float32)
  logits, _ = model.apply({"params": params}, images, patch_size=16)

  # By hand: the kernel PI-resized as big_vision does (tf.image.resize: bilinear, no
  # antialiasing), the 7x7 position embeddings resized to 15x15, into a model stored at 16.
  at_16 = dict(flat)
  at_16["embedding/kernel"] = flexi.pi_resize_patch_kernel(
      jnp.asarray(arrays["embedding/kernel"]), 16, "bilinear", antialias=False)
  at_16["pos_embedding"] = resize_posemb(jnp.asarray(arrays["pos_embedding"]), 15, 0, "bilinear")
  model_16 = model.clone(patch_size=16, image_size=240)
  expected, _ = model_16.apply({"params": traverse_util.unflatten_dict(at_16, sep="/")}, images)
  chex.assert_trees_all_close(logits, expected, atol=1e-5)

  # load_weights converts the same way into a model stored at 16 (flexivit_* at 240 px).
  converted = vitjax.load_weights(model_16, str(tmp_path / "flexi.npz"))
  assert converted["embedding"]["kernel"].shape == (16, 16, 3, 8)
  chex.assert_trees_all_close(model_16.apply({"params": converted}, images)[0], expected,
                              atol=1e-5)

  # What does not fit is still an error, listing the differences.
  with pytest.raises(CheckpointMismatchError, match="embedding/kernel: checkpoint"):
    vitjax.load_weights(model.clone(width=16, num_heads=2), str(tmp_path / "flexi.npz"))
  with pytest.raises(CheckpointMismatchError, match="embedding/kernel: checkpoint"):
    vitjax.load_weights(model.clone(in_channels=1), str(tmp_path / "flexi.npz"))


def test_timm_flexivit_logits_at_patch_8_and_pi_resized_to_4_and_16(tmp_path):
  """A tiny timm FlexiViT (tests/data/make_timm_flexivit_pins.py): its logits at its own
  patch 8, and at 4 and 16 as timm loads its state dict into a model of that patch size
  (bicubic, antialiased resizes of the kernel and the position embeddings)."""
  with np.load(TIMM_PINS, allow_pickle=False) as pins:
    pins = dict(pins)
  state_dict = {name[len("state_dict/"):]: value for name, value in pins.items()
                if name.startswith("state_dict/")}
  np.savez(tmp_path / "timm.npz", **state_dict)
  model = vitjax.create_model("vit", num_classes=10, image_size=32, patch_size=8, width=32,
                              depth=2, mlp_dim=64, num_heads=2, class_posemb=False,
                              posemb_resize="bicubic", patch_resize="bicubic")
  params = {"params": vitjax.load_weights(model, str(tmp_path / "timm.npz"))}
  images = jnp.asarray(pins["images"].transpose(0, 2, 3, 1))
  for patch_size in (8, 4, 16):
    logits, _ = model.apply(params, images, patch_size=patch_size)
    np.testing.assert_allclose(logits, pins[f"logits_p{patch_size}"], atol=1e-5,
                               err_msg=f"patch {patch_size}")
