"""MLP-Mixer: published sizes, an independent NumPy forward pass, timm and .npz weights."""

import math

from flax import traverse_util
import jax
import numpy as np
import pytest

import vitjax
from vitjax import models

TINY = dict(hidden_dim=32, depth=2, tokens_mlp_dim=24, channels_mlp_dim=64, patch_size=8,
            image_size=32, num_classes=7, head_zeroinit=False)


@pytest.mark.parametrize("name,expected", [
    ("mixer_s16_224", 18_528_264), ("mixer_s32_224", 19_104_624),
    ("mixer_b16_224", 59_880_472), ("mixer_b32_224", 60_293_428),
    ("mixer_l16_224", 208_196_168), ("mixer_l32_224", 206_939_264)])
def test_parameter_counts_equal_timm(name, expected):
  assert models.count_params(models.param_shapes(vitjax.create_model(name))) == expected


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _mlp(x, p):
  h = _gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def numpy_mixer(params, images, patch):
  """Mixer forward pass from the paper's equations, in float64 NumPy."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  b, h, w, c = images.shape
  patches = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, (h // patch) * (w // patch), patch * patch * c)
  x = patches @ p["stem"]["kernel"].reshape(-1, p["stem"]["kernel"].shape[-1]) + p["stem"]["bias"]
  for i in range(TINY["depth"]):
    block = p[f"MixerBlock_{i}"]
    y = _layer_norm(x, block["LayerNorm_0"]).transpose(0, 2, 1)
    x = x + _mlp(y, block["token_mixing"]).transpose(0, 2, 1)
    x = x + _mlp(_layer_norm(x, block["LayerNorm_1"]), block["channel_mixing"])
  x = _layer_norm(x, p["pre_head_layer_norm"]).mean(1)
  return x @ p["head"]["kernel"] + p["head"]["bias"]


def test_forward_matches_the_numpy_reference():
  model = vitjax.create_model("mixer", **TINY)
  params = vitjax.init_params(model, rng=1)
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3)))
  logits, out = model.apply({"params": params}, images)
  np.testing.assert_allclose(logits, numpy_mixer(params, images.astype(np.float64), 8),
                             atol=1e-4, rtol=1e-4)
  assert out["tokens"].shape == (2, 16, 32) and out["pre_logits"].shape == (2, 32)


def _timm_state_dict(params):
  """The timm MlpMixer names, written out independently of vitjax.convert."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  sd = {"stem.proj.weight": flat["stem/kernel"].transpose(3, 2, 0, 1),
        "stem.proj.bias": flat["stem/bias"],
        "norm.weight": flat["pre_head_layer_norm/scale"], "norm.bias": flat["pre_head_layer_norm/bias"],
        "head.weight": flat["head/kernel"].T, "head.bias": flat["head/bias"]}
  for i in range(TINY["depth"]):
    prefix = f"MixerBlock_{i}/"
    for timm_name, ours in [("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")]:
      sd[f"blocks.{i}.{timm_name}.weight"] = flat[prefix + ours + "/scale"]
      sd[f"blocks.{i}.{timm_name}.bias"] = flat[prefix + ours + "/bias"]
    for timm_name, ours in [("mlp_tokens", "token_mixing"), ("mlp_channels", "channel_mixing")]:
      for fc, dense in [("fc1", "Dense_0"), ("fc2", "Dense_1")]:
        sd[f"blocks.{i}.{timm_name}.{fc}.weight"] = flat[f"{prefix}{ours}/{dense}/kernel"].T
        sd[f"blocks.{i}.{timm_name}.{fc}.bias"] = flat[f"{prefix}{ours}/{dense}/bias"]
  return sd


def test_timm_safetensors_and_big_vision_npz_load(tmp_path):
  from safetensors.numpy import save_file
  model = vitjax.create_model("mixer", **TINY)
  params = vitjax.init_params(model, rng=3)
  save_file({k: np.ascontiguousarray(v) for k, v in _timm_state_dict(params).items()},
            str(tmp_path / "mixer.safetensors"))
  vitjax.save_weights(params, str(tmp_path / "mixer.npz"))
  for path in ("mixer.safetensors", "mixer.npz"):
    loaded = vitjax.load_weights(model, str(tmp_path / path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.device_get(params))


def test_new_classes_need_head_reinit(tmp_path):
  params = vitjax.init_params(vitjax.create_model("mixer", **TINY))
  vitjax.save_weights(params, str(tmp_path / "mixer.npz"))
  ten_classes = vitjax.create_model("mixer", **{**TINY, "num_classes": 10})
  with pytest.raises(vitjax.CheckpointMismatchError, match="head"):
    vitjax.load_weights(ten_classes, str(tmp_path / "mixer.npz"))
  loaded = vitjax.load_weights(ten_classes, str(tmp_path / "mixer.npz"), head="reinit")
  assert loaded["head"]["kernel"].shape == (32, 10)
  np.testing.assert_array_equal(loaded["stem"]["kernel"], params["stem"]["kernel"])
