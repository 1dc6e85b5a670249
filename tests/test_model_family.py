"""Adding a model family without touching vitjax/models: PoolFormer-style parts, here only.

The parts (a pooling token mixer, a gated channel mixer) and the registration
live in this file, which is also the config of the run it tests:

    python -m vitjax.train --config tests/test_model_family.py --workdir workdirs/poolformer

CONTRIBUTING.md ("How to add a model family") walks through the same example.
"""

import functools
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import vitjax
from vitjax import config as config_lib
from vitjax.models import parts
from vitjax.models.vit import VisionTransformer

NAME = "poolformer_mu_patch4"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AveragePooling(nn.Module):
  """PoolFormer's token mixer ("MetaFormer Is Actually What You Need for Vision",
  Yu et al. 2022): average pooling over the patch grid, minus the input.

  Follows the part protocol (vitjax.models.parts): `(x, deterministic, token_state)`
  in, mixed tokens out. Every token is a patch here (pool_type='gap').
  """
  pool_size: int = 3

  @nn.compact
  def __call__(self, x, deterministic=True, token_state=None):
    batch, tokens, width = x.shape
    side = int(round(tokens ** 0.5))
    grid = x.reshape(batch, side, side, width)
    pooled = nn.avg_pool(grid, (self.pool_size, self.pool_size), strides=(1, 1),
                         padding="SAME", count_include_pad=False)
    return (pooled - grid).reshape(batch, tokens, width)


class GatedMlp(nn.Module):
  """A channel mixer: Dense, a sigmoid-gated linear unit, Dense."""
  hidden: int = 64

  @nn.compact
  def __call__(self, x, deterministic=True, token_state=None):
    value, gate = jnp.split(nn.Dense(2 * self.hidden, name="fc1")(x), 2, axis=-1)
    return nn.Dense(x.shape[-1], name="fc2")(value * nn.sigmoid(gate))


def register():
  """Registers the family's model once per process (the CLI runs this file as a config)."""
  if NAME in vitjax.list_models():
    return
  vitjax.models.register(
      NAME, VisionTransformer,
      paper="MetaFormer Is Actually What You Need for Vision (Yu et al., 2022); a toy size",
      token_mixer=functools.partial(AveragePooling, pool_size=3),
      channel_mixer=functools.partial(GatedMlp, hidden=64),
      # MetaFormer's later stages use attention: the last block gets the default one.
      layers=parts.last(1, dict(token_mixer=None), depth=3),
      image_size=16, patch_size=4, width=32, depth=3, num_heads=4, pool_type="gap",
      posemb="none", num_classes=10)


register()


def get_config(arg=None):
  """The quickstart's digits run with this family's model."""
  config = config_lib.load_config(os.path.join(ROOT, "configs", "quickstart.py"))
  config.unlock()
  config.model = dict(name=NAME, num_classes=10, image_size=16, drop_path_rate=0.0)
  config.total_steps = int(arg or 3)
  config.batch_size = 32
  config.log_every = config.eval_every = config.checkpoint_every = config.total_steps
  config.optimizer.warmup_steps = 1
  config.lock()
  return config


def test_the_family_is_built_from_its_parts():
  model = vitjax.create_model(NAME)
  params = vitjax.init_params(model)
  blocks = params["Transformer"]
  # The attention of the last block replaced the pooling (which has no parameters).
  assert "MultiHeadDotProductAttention_0" in blocks["encoderblock_2"]
  assert "MultiHeadDotProductAttention_0" not in blocks["encoderblock_0"]
  chex.assert_shape(blocks["encoderblock_1"]["GatedMlp_0"]["fc1"]["kernel"], (32, 128))
  logits, out = model.apply({"params": params}, jnp.ones((2, 16, 16, 3)))
  chex.assert_shape(logits, (2, 10))
  chex.assert_shape(out["tokens"], (2, 16, 32))


def test_train_three_steps_through_the_cli_then_load_and_save(tmp_path):
  workdir = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, "-m", "vitjax.train", "--config", os.path.abspath(__file__),
       "--workdir", str(workdir)],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert run.returncode == 0, run.stderr[-3000:]
  assert (workdir / "checkpoints" / "3").is_dir()

  model = vitjax.create_model(NAME)
  params = vitjax.load_weights(model, str(workdir))  # The workdir's final checkpoint.
  initial = vitjax.init_params(model)
  chex.assert_trees_all_equal_shapes(params, initial)
  assert not np.allclose(params["head"]["kernel"], initial["head"]["kernel"])  # Trained.

  path = str(tmp_path / "poolformer.npz")
  vitjax.convert.save_weights(params, path)
  chex.assert_trees_all_equal(vitjax.load_weights(model, path), params)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  logits, _ = model.apply({"params": params}, images)
  assert np.all(np.isfinite(logits))
