"""config.task='diffusion': training a DiT (DDPM with learned variance, or flow matching),
sampling from its EMA with guidance, and the generation evaluator's metrics and grids."""

import json
import os

import diffusers  # The oracle: a failed import fails the test.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cli_checks
import vitjax
from vitjax import config as config_lib
from vitjax import diffusion
from vitjax.evaluate import generation
from vitjax.train import trainer as train_lib
from vitjax.train.tasks import diffusion as diffusion_task


def _tiny(spec="configs/diffusion_digits.py", **model):
  config = config_lib.load_config(spec)
  config.unlock()
  config.model.update(width=32, depth=1, num_heads=2, **model)
  config.update(batch_size=16, eval_batch_size=32, total_steps=2, log_every=1, eval_every=0,
                checkpoint_every=0)
  config.optimizer.warmup_steps = 1
  config.evaluators.generation.update(num_steps=3, num_samples=40)
  return config


def test_ddpm_dit_trains_and_its_ema_samples_with_guidance(tmp_path):
  config = _tiny()
  workdir = str(tmp_path / "dit")
  result = train_lib.train(config, workdir, progress=False)
  with open(result["metrics"]) as f:
    logged = [json.loads(line) for line in f]
  train_rows = [r for r in logged if "train/loss" in r]
  # The hybrid loss: the MSE of the noise and the VLB term of the learned variance.
  assert all(np.isfinite(r["train/mse"]) and r["train/vb"] > 0 for r in train_rows)
  for weights in ("eval", "eval_ema"):
    assert np.isfinite(result[f"{weights}/fd_pixels"])
    assert os.path.getsize(os.path.join(workdir, f"samples_{weights}_2.png")) > 0


def test_flow_matching_dit_trains(tmp_path):
  config = _tiny("configs/diffusion_digits.py:objective=flow")
  assert config.model.learn_sigma is False
  result = train_lib.train(config, str(tmp_path / "flow"), progress=False)
  assert np.isfinite(result["eval_ema/fd_pixels"])


def test_latent_diffusion_trains_on_vae_latents(tmp_path):
  """config.diffusion.vae: a (random, tiny) diffusers AutoencoderKL's latents are the data and
  the samples are decoded by it."""
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                latent_channels=4, norm_num_groups=4, sample_size=8)
  vae.save_pretrained(tmp_path / "vae")
  config = _tiny(in_channels=4, image_size=4)
  config.diffusion.vae = str(tmp_path / "vae")
  config.ema.decay = None
  result = train_lib.train(config, str(tmp_path / "latent"), progress=False)
  assert np.isfinite(result["eval/fd_pixels"])
  config.model.in_channels = 1
  with pytest.raises(ValueError, match="latents have 4 channels"):
    train_lib.train(config, str(tmp_path / "wrong"), progress=False)


def test_generation_scores_samples_with_a_feature_model():
  """fd and conditional_accuracy from a (model, params) classifier; the same seed gives the
  same samples, and guidance scale 1 is no guidance."""
  model = vitjax.create_model("dit", width=32, depth=1, num_heads=2, patch_size=2,
                              image_size=8, in_channels=1, num_classes=10)
  params = jax.tree.map(lambda p: 0.05 * jax.random.normal(jax.random.PRNGKey(0), p.shape),
                        vitjax.models.init_params(model))
  labels = np.arange(20) % 10
  options = dict(num_samples=20, batch_size=10, num_steps=4, seed=3,
                 diffusion=dict(objective="ddpm"))
  first = generation.generate_samples(model, params, labels, **options)
  again = generation.generate_samples(model, params, labels, **options)
  np.testing.assert_array_equal(first, again)
  guided = generation.generate_samples(model, params, labels, guidance_scale=3.0, **options)
  assert np.abs(guided - first).max() > 1e-4

  classifier = vitjax.create_model("vit", width=16, depth=1, num_heads=1, mlp_dim=16,
                                   patch_size=4, image_size=8, num_classes=10)
  classifier_params = vitjax.models.init_params(classifier)

  class Split:  # The evaluation split a Dataset gives, in the pipeline's normalisation.
    def eval_iter(self, batch_size, **_):
      images = np.random.default_rng(0).uniform(-1, 1, (40, 8, 8, 1)).astype(np.float32)
      for start in range(0, 40, batch_size):
        yield {"image": images[start:start + batch_size],
               "label": np.arange(start, start + batch_size) % 10,
               "mask": np.ones(batch_size, bool)}

  metrics = generation.generation(model, params, Split(), batch_size=20, num_steps=3,
                                  guidance_scale=2.0, diffusion=dict(objective="ddpm"),
                                  feature_model=(classifier, classifier_params))
  assert set(metrics) == {"fd", "conditional_accuracy", "sample_seconds"}
  assert metrics["fd"] > 0 and 0 <= metrics["conditional_accuracy"] <= 1


def test_flow_sampler_reaches_the_data_of_an_exact_velocity():
  """With the exact velocity field of a point mass at x0 (v = (x_t - x0) / t), Euler and
  Heun land on x0: the task's time scaling and the flow sampler agree."""
  x0 = jnp.full((2, 4, 4, 1), 0.3)

  def velocity(x_t, t, labels):
    del labels
    t = (t / diffusion_task.FLOW_TIME_SCALE)[:, None, None, None]
    return (x_t - x0) / t

  for sampler in ("euler", "heun"):
    samples = diffusion.sample(
        lambda x, t, y: velocity(x, t * diffusion_task.FLOW_TIME_SCALE, y), x0.shape,
        jax.random.PRNGKey(0), sampler=sampler, num_steps=5)
    np.testing.assert_allclose(samples, x0, atol=1e-4)


def test_to_unit_range_inverts_the_input_normalisation():
  images = jnp.linspace(-2, 2, 12).reshape(1, 2, 2, 3)
  input_config = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
  pixels = diffusion_task.to_unit_range(images, input_config)
  np.testing.assert_allclose(diffusion_task.from_unit_range(pixels, input_config), images,
                             atol=1e-6)
  np.testing.assert_allclose(diffusion_task.to_unit_range(jnp.zeros((1, 1, 1, 1)),
                                                          {"mean": (0.5,), "std": (0.5,)}), 0.0)


def test_bad_diffusion_settings_are_config_errors(tmp_path):
  config = _tiny()
  config.diffusion.schedul = "cosine"
  with pytest.raises(ValueError, match="config.diffusion has no key\\(s\\) 'schedul'"):
    diffusion_task.DiffusionOptions.from_config(config)
  cli_checks.assert_train_rejects(
      "configs/diffusion_digits.py", "diffusion.objective=flw", tmp_path / "run",
      contains="config.diffusion.objective='flw': use one of 'ddpm', 'flow'")
