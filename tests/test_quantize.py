"""Post-training quantization (vitjax.quantize): what a user of a quantized model relies on.

Run: python -m pytest -q tests/test_quantize.py
"""

import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models
from vitjax import quantize
from vitjax.evaluate import evaluate_classification
from vitjax.tools import quantize as quantize_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# qwix 0.1.8 checks for flax's removed nnx.VariableState on every parameter lookup.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")
CONFIG = {"name": "vit", "variant": "mu/4", "image_size": 16, "num_classes": 10}


@pytest.fixture(scope="module")
def tiny_vit():
  """A 4-block ViT (width 64) with random weights (a non-zero head) and random images."""
  config = dict(CONFIG)
  model = models.create_model(config.pop("name"), **config)
  images = jax.random.normal(jax.random.key(0), (3, 8, 16, 16, 3))
  params = flax.core.unfreeze(nn.unbox(model.init(jax.random.key(1), images[0])["params"]))
  params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(2), (64, 10))
  return model, params, list(images)


def _relative_error(quantized, reference):
  return float(jnp.linalg.norm(quantized - reference) / jnp.linalg.norm(reference))


def test_every_dense_layer_and_attention_projection_is_quantized(tiny_vit):
  model, params, images = tiny_vit
  _, qparams = quantize.quantize(model, params, images[0], scheme="w8")
  kernels = {name for name in flax.traverse_util.flatten_dict(params, sep="/")
             if name.endswith("/kernel") and name != "embedding/kernel"}
  assert len(kernels) == 4 * 6 + 1  # query, key, value, out, 2 MLP layers per block; head.
  assert set(quantize.quantized_weights(qparams)) == kernels
  assert quantize.model_size_bytes(qparams) < 0.3 * quantize.model_size_bytes(params)


@pytest.mark.parametrize("scheme,tolerance", [("w8", 0.02), ("w8a8", 0.05), ("w4", 0.25),
                                              ("w4a8", 0.25)])
def test_quantized_logits_stay_close_to_float(tiny_vit, scheme, tolerance):
  # int8 rounds each weight by at most 1/254 of its channel's largest magnitude, int4 by
  # 1/14: the logits move by ~1% (int8) and ~10% (int4) of their norm; the bounds are about
  # twice what this model shows, and far below a broken layer's error (~100%).
  model, params, images = tiny_vit
  qmodel, qparams = quantize.quantize(model, params, images[:2], scheme=scheme)
  reference, _ = model.apply({"params": params}, images[2])
  logits, _ = jax.jit(qmodel.apply)({"params": qparams}, images[2])
  assert _relative_error(logits, reference) < tolerance


def test_int8_weights_and_activations_run_an_integer_matmul(tiny_vit):
  model, params, images = tiny_vit
  qmodel, qparams = quantize.quantize(model, params, images[:1], scheme="w8a8")
  hlo = jax.jit(qmodel.apply).lower({"params": qparams}, images[0]).as_text()
  assert "xi8>" in hlo and "dot_general" in hlo


def test_repq_reparameterisation_keeps_the_float_output(tiny_vit):
  model, params, images = tiny_vit
  consumers = quantize.layer_norm_consumers(params, "vit mu/4")
  assert consumers["Transformer/encoderblock_0/LayerNorm_0"] == [
      f"Transformer/encoderblock_0/MultiHeadDotProductAttention_0/{p}"
      for p in ("query", "key", "value")]
  assert consumers["Transformer/encoderblock_3/LayerNorm_1"] == [
      "Transformer/encoderblock_3/MlpBlock_0/Dense_0"]
  ranges = quantize.layer_norm_ranges(model, params, images[:2], consumers)
  reparameterized = quantize.repq_reparameterize(params, ranges, consumers, bits=4)
  before, _ = model.apply({"params": params}, images[2])
  after, _ = model.apply({"params": reparameterized}, images[2])
  np.testing.assert_allclose(after, before, atol=2e-5)
  # Every channel of a reparameterised LayerNorm's output now spans one range.
  low, high = quantize.layer_norm_ranges(model, reparameterized, images[:2], consumers)[
      "Transformer/encoderblock_1/LayerNorm_1"]
  np.testing.assert_allclose(high - low, np.mean(high - low), rtol=1e-3)


def test_repq_refuses_a_model_without_vit_blocks():
  params = {"MlpBlock_0": {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
            "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
  with pytest.raises(ValueError, match="mixer_b16 has none"):
    quantize.layer_norm_consumers(params, "mixer_b16")


def test_log2_quantizer_levels():
  x = jnp.array([1.0, 0.5, 0.25, 2.0 ** -6, 0.0, 3.0, 0.72, 2.0 ** -20], jnp.float32)
  np.testing.assert_array_equal(
      quantize.log2_quantize(x, bits=4),
      # Powers of two are levels; 0 stays 0; 3 clips to the scale 1; 0.72 is above 2^-0.5,
      # the middle of [2^-1, 2^0] in the log domain; 2^-20 is below 4 bits' last level 2^-14.
      [1.0, 0.5, 0.25, 2.0 ** -6, 0.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(quantize.log2_quantize(x, bits=8)[-1], 2.0 ** -20)
  np.testing.assert_allclose(quantize.log2_quantize(jnp.array([0.7, 0.35]), 4, "sqrt2"),
                             [2 ** -0.5, 2 ** -1.5], rtol=1e-6)
  np.testing.assert_array_equal(quantize.log2_quantize(jnp.array([0.5]), 4, scale=2.0), 0.5)


def test_vit_quantizers_run_and_are_refused_where_they_do_not_apply(tiny_vit):
  model, params, images = tiny_vit
  qmodel, qparams = quantize.quantize(model, params, images[:2], scheme="w8a8",
                                      vit_quantizers=True, log2_base="sqrt2")
  reference, _ = model.apply({"params": params}, images[2])
  logits, _ = jax.jit(qmodel.apply)({"params": qparams}, images[2])
  # Random weights attend almost uniformly (weights near 1/17), where log levels √2 apart
  # round by up to 19% and 8-bit uniform levels by 3%: a looser bound than plain w8a8's.
  assert _relative_error(logits, reference) < 0.3
  with pytest.raises(ValueError, match="keeps them in float"):
    quantize.quantize(model, params, images[0], scheme="w8", vit_quantizers=True)
  with pytest.raises(ValueError, match="w8, w4, w8a8, w4a8, w4a4"):
    quantize.quantize(model, params, images[0], scheme="int8")
  fused = models.create_model("vit", variant="mu/4", image_size=16, attention_impl="pallas")
  with pytest.raises(ValueError, match="attention_impl='pallas'"):
    quantize.quantize(fused, params, images[0], scheme="w8a8")


def test_save_and_load_round_trip_bitwise(tiny_vit, tmp_path):
  model, params, images = tiny_vit
  qmodel, qparams = quantize.quantize(model, params, images[:2], scheme="w4a4",
                                      vit_quantizers=True)
  path = str(tmp_path / "w4a4.npz")
  quantize.save_quantized(path, qparams, scheme="w4a4", vit_quantizers=True,
                          input_shape=images[0].shape, model_config=CONFIG)
  loaded_model, loaded = quantize.load_quantized(path)
  leaves = lambda tree: jax.tree_util.tree_leaves_with_path(tree)
  assert [p for p, _ in leaves(loaded)] == [p for p, _ in leaves(qparams)]
  for (_, a), (_, b) in zip(leaves(loaded), leaves(qparams)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert any(leaf.dtype == jnp.int4 for _, leaf in leaves(loaded))
  np.testing.assert_array_equal(loaded_model.apply({"params": loaded}, images[2])[0],
                                qmodel.apply({"params": qparams}, images[2])[0])
  with np.load(path, allow_pickle=False) as f:
    assert f["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel.qvalue"].dtype == np.int8
  # A file of another model, and a file that is not one, are one clear error each.
  other = models.create_model("vit", variant="mu/4", image_size=16, num_classes=7)
  with pytest.raises(quantize.QuantizedFileError, match="head/kernel.qvalue"):
    quantize.load_quantized(path, other)
  broken = tmp_path / "broken.npz"
  broken.write_bytes(b"not a zip")
  with pytest.raises(quantize.QuantizedFileError, match="cannot be read"):
    quantize.load_quantized(str(broken), model)


def test_quantized_model_runs_through_the_classification_evaluator(tiny_vit):
  model, params, images = tiny_vit
  qmodel, qparams = quantize.quantize(model, params, images[:2], scheme="w8a8")
  labels = np.argmax(model.apply({"params": params}, images[2])[0], -1)
  batches = [{"image": np.asarray(images[2]), "label": labels}]
  metrics = evaluate_classification(qmodel, qparams, batches)
  assert metrics["top1"] >= 0.75  # Agreement with the float model's own predictions.


@pytest.mark.parametrize("argv,message", [
    (["--scheme", "w8a8", "--calibration_batches", "0"], "--calibration_batches"),
    (["--scheme", "w8a8", "--out", "/nonexistent/dir/q.npz"], "/nonexistent/dir"),
    (["--scheme", "w8a8,w4a4", "--out", "q.npz"], "one scheme"),
])
def test_cli_rejects_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
  assert quantize_cli.main([str(tmp_path)] + argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
  assert os.listdir(tmp_path) == []


def test_cli_exits_2_in_one_line_on_an_unknown_scheme_or_workdir(tmp_path):
  out = tmp_path / "q.npz"
  result = subprocess.run(
      [sys.executable, "-m", "vitjax.tools.quantize", str(tmp_path / "missing"),
       "--scheme", "w3a3", "--out", str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error:") and "w8, w4, w8a8" in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not out.exists()
