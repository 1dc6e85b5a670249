"""vitjax.diffusion against diffusers' schedulers (the oracle) and NumPy references.

diffusers runs in float64 (its tables recomputed in float64 from its own float32 betas,
which our schedule then shares), vitjax in float32; results agree to 1e-6, relative or
absolute (`_close`). The schedules themselves match diffusers' float32 tables to their
float32 rounding.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler)
from diffusers.schedulers import scheduling_ddpm

from vitjax import diffusion

KINDS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
SHAPE = (2, 4, 4, 3)  # NHWC.


def _close(actual, expected, tol=1e-6):
  """|actual - expected| <= tol * (1 + |expected|): 1e-6 absolute near 0, relative above 1."""
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


def _torch(x):
  """NHWC float32 -> NCHW float64 torch tensor."""
  return torch.from_numpy(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2)).copy())


def _numpy(x):
  """NCHW torch -> NHWC float64."""
  return np.transpose(x.double().numpy(), (0, 2, 3, 1))


def _oracle(cls, kind, **config):
  """A diffusers scheduler in float64, and vitjax's schedule of the same (float32) betas."""
  scheduler = cls(**{"beta_schedule": KINDS[kind], "clip_sample": False, **config})
  betas = scheduler.betas.double()
  scheduler.betas = betas
  scheduler.alphas = 1.0 - betas
  scheduler.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
  return scheduler, diffusion.schedule_from_betas(betas.numpy())


def _key(seed):
  """A PRNG key of the 'rbg' implementation: its samplers compile 3x faster than threefry's."""
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_schedules_match_diffusers(kind):
  ours = diffusion.make_schedule(kind, 1000)
  theirs = DDPMScheduler(beta_schedule=KINDS[kind])
  _close(ours.betas, theirs.betas.numpy(), 2e-7)  # float32 rounding.
  # diffusers' betas and cumprod are float32 (cosine's betas up to 0.999, whose 1 - beta keeps
  # 4 digits): its alphas_cumprod is ours to 2e-5 relative.
  np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=2e-5)
  assert ours.betas.max() <= 0.999 and ours.num_timesteps == 1000
  short = diffusion.make_schedule("linear", 10, beta_start=1e-3, beta_end=0.2)
  _close(short.betas, np.linspace(1e-3, 0.2, 10))


@pytest.mark.parametrize("spacing", diffusion.TIMESTEP_SPACINGS)
def test_spaced_timesteps_match_diffusers(spacing):
  for num_steps in (1, 7, 10, 1000):
    scheduler = DDIMScheduler(timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    np.testing.assert_array_equal(diffusion.spaced_timesteps(1000, num_steps, spacing),
                                  scheduler.timesteps.numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_targets_and_conversions_match_diffusers(kind):
  scheduler, schedule = _oracle(DDPMScheduler, kind)
  x0, noise = _normal(0), _normal(1)
  for t in ([0, 999], [1, 500], [10, 10]):
    t_torch = torch.tensor(t)
    x_t = diffusion.add_noise(schedule, x0, noise, jnp.array(t))
    _close(x_t, _numpy(scheduler.add_noise(_torch(x0), _torch(noise), t_torch)))
    v = diffusion.prediction_target(schedule, x0, noise, jnp.array(t), "v")
    _close(v, _numpy(scheduler.get_velocity(_torch(x0), _torch(noise), t_torch)))
    np.testing.assert_array_equal(
        diffusion.prediction_target(schedule, x0, noise, jnp.array(t), "epsilon"), noise)
    for prediction_type, target in (("epsilon", noise), ("v", v)):
      if prediction_type == "epsilon" and max(t) > 500:
        continue  # x0 = (x_t - ...) / sqrt(acp_t): float32 keeps no digits at acp_999 ~ 1e-9.
      x0_back = diffusion.predict_x0(schedule, x_t, target, jnp.array(t), prediction_type)
      noise_back = diffusion.predict_noise(schedule, x_t, target, jnp.array(t), prediction_type)
      _close(x0_back, x0, 2e-5 if prediction_type == "epsilon" else 1e-6)  # / sqrt(acp_500).
      _close(noise_back, noise)


def _ddpm_cases():
  for kind in KINDS:
    for prediction_type in PREDICTIONS:
      for variance_type in diffusion.VARIANCE_TYPES:
        yield kind, prediction_type, variance_type


@pytest.mark.parametrize("kind,prediction_type,variance_type", list(_ddpm_cases()))
def test_ddpm_step_matches_diffusers(kind, prediction_type, variance_type, monkeypatch):
  scheduler, schedule = _oracle(DDPMScheduler, kind, prediction_type=PREDICTIONS[prediction_type],
                                variance_type=variance_type)
  noise = _normal(2)
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: _torch(noise))
  channels = 2 * SHAPE[-1] if variance_type == "learned_range" else SHAPE[-1]
  step = functools.partial(diffusion.ddpm_step, prediction_type=prediction_type,
                           variance_type=variance_type)
  for t in (999, 500, 10, 1, 0):  # The whole chain: t indexes the schedule.
    x_t = _normal(t + 3)
    prediction = _normal(t + 4, SHAPE[:-1] + (channels,))
    if variance_type == "learned_range":
      prediction[..., SHAPE[-1]:] = np.tanh(prediction[..., SHAPE[-1]:])
    expected = scheduler.step(_torch(prediction), t, _torch(x_t))
    _close(step(schedule, x_t, prediction, t, noise), _numpy(expected.prev_sample))
    x0 = diffusion.predict_x0(schedule, x_t, prediction[..., :SHAPE[-1]], t, prediction_type)
    # x0 from eps divides by sqrt(acp_t): float32's error grows by as much.
    tol = 1e-6 / np.sqrt(schedule.alphas_cumprod[t]) if prediction_type == "epsilon" else 1e-6
    np.testing.assert_allclose(x0, _numpy(expected.pred_original_sample), rtol=1e-6, atol=tol)
  # A respaced chain (set_timesteps(10): 900, 800, ..., 0), per-example timesteps, clipping.
  scheduler, _ = _oracle(DDPMScheduler, kind, prediction_type=PREDICTIONS[prediction_type],
                         variance_type=variance_type, clip_sample=True)
  scheduler.set_timesteps(10)
  chain = diffusion.respace(schedule, diffusion.spaced_timesteps(1000, 10))
  np.testing.assert_array_equal(chain.timesteps[::-1], scheduler.timesteps.numpy())
  x_t = _normal(5)
  prediction = np.tanh(_normal(6, SHAPE[:-1] + (channels,)))
  for index in range(10):
    expected = scheduler.step(_torch(prediction), int(chain.timesteps[index]), _torch(x_t))
    ours = step(chain, x_t, prediction, jnp.full((SHAPE[0],), index), noise, clip_x0=1.0)
    _close(ours, _numpy(expected.prev_sample))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(kind, prediction_type, eta):
  scheduler, schedule = _oracle(DDIMScheduler, kind, prediction_type=PREDICTIONS[prediction_type])
  scheduler.set_timesteps(10)
  chain = diffusion.respace(schedule, diffusion.spaced_timesteps(1000, 10))
  noise = _normal(7)
  for index in range(10):
    x_t, prediction = _normal(10 + index), _normal(20 + index)
    timestep = int(chain.timesteps[index])
    expected = scheduler.step(_torch(prediction), timestep, _torch(x_t), eta=eta,
                              variance_noise=_torch(noise) if eta else None)
    ours = diffusion.ddim_step(chain, x_t, prediction, index, noise,
                               prediction_type=prediction_type, eta=eta)
    _close(ours, _numpy(expected.prev_sample))


@jax.jit
def _driver_noise(rng):
  """`sample`'s random numbers (its docstring): x_T and the noise of steps 0..9, NCHW float64."""
  rng_init, rng_steps = jax.random.split(rng)
  steps = [jax.random.normal(jax.random.fold_in(rng_steps, k), SHAPE) for k in range(10)]
  return jax.random.normal(rng_init, SHAPE), steps  # Not vmapped: rbg's bits would differ.


def _torch_driver_noise(rng):
  initial, steps = _driver_noise(rng)
  return _torch(initial), [_torch(noise) for noise in steps]


def _analytic_eps(x_t, t, labels=None):
  """A fixed 'model': eps = 0.1 x + 1e-4 t (any float array type)."""
  return 0.1 * x_t + 1e-4 * t.reshape((-1,) + (1,) * (x_t.ndim - 1))


def test_ddim_sampling_loop_matches_diffusers():
  scheduler, schedule = _oracle(DDIMScheduler, "linear")
  generate = jax.jit(functools.partial(diffusion.sample, _analytic_eps, SHAPE, sampler="ddim",
                                       num_steps=10, schedule=schedule))
  rng = _key(0)
  x, _ = _torch_driver_noise(rng)
  scheduler.set_timesteps(10)
  for t in scheduler.timesteps:
    x = scheduler.step(_analytic_eps(x, t.double().repeat(SHAPE[0])), t, x).prev_sample
  _close(generate(rng), _numpy(x))


def test_ddpm_sampling_loop_learned_variance_matches_diffusers(monkeypatch):
  """10 respaced ancestral steps, v-prediction with a learned variance, the driver's noise."""
  scheduler, schedule = _oracle(DDPMScheduler, "cosine", prediction_type="v_prediction",
                                variance_type="learned_range")

  def denoise(x_t, t, labels=None):
    if isinstance(x_t, torch.Tensor):
      return torch.cat([_analytic_eps(x_t, t), torch.tanh(x_t)], dim=1)
    return jnp.concatenate([_analytic_eps(x_t, t), jnp.tanh(x_t)], axis=-1)

  generate = jax.jit(functools.partial(
      diffusion.sample, denoise, SHAPE, sampler="ddpm", num_steps=10, schedule=schedule,
      prediction_type="v", variance_type="learned_range"))
  rng = _key(1)
  x, step_noise = _torch_driver_noise(rng)
  scheduler.set_timesteps(10)
  for t, noise in zip(scheduler.timesteps, step_noise):
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, noise=noise, **kw: noise)
    x = scheduler.step(denoise(x, t.double().repeat(SHAPE[0])), t, x).prev_sample
  _close(generate(rng), _numpy(x))


def _velocity(x_t, t, labels=None):
  """A fixed flow 'model': v = 0.5 x - 0.2 t."""
  return 0.5 * x_t - 0.2 * t.reshape((-1,) + (1,) * (x_t.ndim - 1))


@pytest.mark.parametrize("sampler,cls", [("euler", FlowMatchEulerDiscreteScheduler),
                                         ("heun", FlowMatchHeunDiscreteScheduler)])
def test_flow_sampling_matches_diffusers(sampler, cls):
  num_steps = 6
  scheduler = cls(shift=1.0)
  scheduler.set_timesteps(num_steps)
  sigmas = diffusion.flow_sigmas(num_steps)
  _close(sigmas, np.unique(scheduler.sigmas.numpy())[::-1])
  generate = jax.jit(functools.partial(diffusion.sample, _velocity, SHAPE, sampler=sampler,
                                       num_steps=num_steps))
  rng = _key(2)
  x, _ = _torch_driver_noise(rng)
  for t in scheduler.timesteps:  # The model's time is diffusers' timestep / 1000.
    x = scheduler.step(_velocity(x, (t.double() / 1000).repeat(SHAPE[0])), t, x).prev_sample
  _close(generate(rng), _numpy(x))
  # One Euler step by hand; and shift 3, whose last sigma diffusers shifts twice.
  x_t, v = _normal(8), _normal(9)
  _close(diffusion.flow_euler_step(x_t, v, 0.6, 0.4), x_t - 0.2 * v)
  shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
  shifted.set_timesteps(num_steps)
  _close(diffusion.flow_sigmas(num_steps, shift=3.0, sigma_min=shifted.sigma_min),
         shifted.sigmas.numpy())


def test_flow_forward_process_and_loss():
  x0, noise = _normal(10), _normal(11)
  t = np.array([0.25, 0.9], np.float32)
  scheduler = FlowMatchEulerDiscreteScheduler()
  scheduler.set_timesteps(sigmas=[0.25, 0.9])  # scale_noise at these sigmas.
  expected = [_numpy(scheduler.scale_noise(_torch(x0[i:i + 1]), timestep[None],
                                           _torch(noise[i:i + 1])))[0]
              for i, timestep in enumerate(scheduler.timesteps[:2])]
  _close(diffusion.flow_interpolate(x0, noise, t), np.stack(expected))
  prediction = _normal(12)
  loss, metrics = diffusion.flow_loss(prediction, x0, noise)
  _close(loss, np.mean((noise.astype(np.float64) - x0 - prediction) ** 2))
  assert metrics["mse"] == loss
  rng = _key(3)
  for distribution in diffusion.schedules.FLOW_TIME_DISTRIBUTIONS:
    times = diffusion.sample_flow_times(rng, 4096, distribution=distribution)
    assert times.shape == (4096,) and 0 < times.min() and times.max() < 1
    assert abs(float(times.mean()) - 0.5) < 0.02
  assert float(jnp.std(diffusion.sample_flow_times(rng, 4096, distribution="logit_normal"))) < 0.25


def _phi(z):
  """The standard normal CDF, float64."""
  return 0.5 * np.vectorize(math.erfc)(-np.asarray(z) / math.sqrt(2))


def _reference_vlb_bits(betas, x0, x_t, t, eps, variance_values):
  """Improved DDPM's L_t in bits per dimension, from the formulas, in float64 NumPy."""
  acp = np.cumprod(1 - betas)
  acp_prev = np.append(1.0, acp[:-1])
  posterior_variance = betas * (1 - acp_prev) / (1 - acp)
  log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  bits = []
  for b, step in enumerate(t):
    coef_x0 = betas[step] * np.sqrt(acp_prev[step]) / (1 - acp[step])
    coef_xt = (1 - acp_prev[step]) * np.sqrt(1 - betas[step]) / (1 - acp[step])
    x0_prediction = (x_t[b] - np.sqrt(1 - acp[step]) * eps[b]) / np.sqrt(acp[step])
    true_mean = coef_x0 * x0[b] + coef_xt * x_t[b]
    model_mean = coef_x0 * x0_prediction + coef_xt * x_t[b]
    fraction = (variance_values[b] + 1) / 2
    model_log_variance = (fraction * np.log(betas[step])
                          + (1 - fraction) * log_variance_clipped[step])
    if step > 0:
      true_log_variance = log_variance_clipped[step]
      nats = 0.5 * (-1 + model_log_variance - true_log_variance
                    + np.exp(true_log_variance - model_log_variance)
                    + (true_mean - model_mean) ** 2 * np.exp(-model_log_variance))
    else:  # The discretised decoder: the bin of x0, the edge bins open-ended.
      std = np.exp(0.5 * model_log_variance)
      upper = _phi((x0[b] - model_mean + 1 / 255) / std)
      lower = _phi((x0[b] - model_mean - 1 / 255) / std)
      probability = np.where(x0[b] < -0.999, upper, np.where(x0[b] > 0.999, 1 - lower,
                                                             upper - lower))
      nats = -np.log(probability)
    bits.append(nats.mean() / np.log(2))
  return np.array(bits)


def test_hybrid_loss_matches_numpy_reference():
  schedule = diffusion.make_schedule("cosine", 1000)
  batch = 4
  rng = np.random.default_rng(12)
  # Quantised data in [-1, 1], both edges included (the decoder's open-ended bins).
  x0 = (rng.integers(0, 256, (batch,) + SHAPE[1:]) / 127.5 - 1).astype(np.float32)
  x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0
  noise = _normal(13, x0.shape)
  t = np.array([0, 1, 400, 999])
  eps = (noise + 0.3 * _normal(14, x0.shape)).astype(np.float32)
  variance_values = np.tanh(_normal(15, x0.shape))
  prediction = np.concatenate([eps, variance_values], axis=-1)

  @jax.jit
  def ours(prediction):
    """L_t, the loss and its metrics, and the gradients of the loss and of its VLB term."""
    x_t = diffusion.add_noise(schedule, x0, noise, t)
    x0_prediction = diffusion.predict_x0(schedule, x_t, prediction[..., :3], t)
    log_variance = diffusion.learned_log_variance(schedule, prediction[..., 3:], t)
    vb = diffusion.vlb_terms(schedule, x0, x_t, t, x0_prediction, log_variance)
    loss_fn = functools.partial(diffusion.diffusion_loss, schedule, x0=x0, noise=noise, t=t)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(prediction)
    vb_grad = jax.grad(lambda p: loss_fn(p)[1]["vb"])(prediction)
    return x_t, vb, loss, metrics, grad, vb_grad

  x_t, vb, loss, metrics, grad, vb_grad = ours(prediction)
  expected = _reference_vlb_bits(schedule.betas, x0, np.asarray(x_t, np.float64), t, eps,
                                 variance_values)
  assert np.all(expected > 0)
  np.testing.assert_allclose(vb, expected, rtol=1e-5, atol=1e-6)  # Bits/dim, float32.
  mse = np.mean((eps.astype(np.float64) - noise) ** 2, axis=(1, 2, 3))
  _close(metrics["mse"], mse.mean())
  np.testing.assert_allclose(metrics["vb"], expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(mse + expected), rtol=1e-5)  # T / 1000 = 1.
  # L_vlb trains only the variance channels, L_simple only the prediction.
  _close(grad[..., :3], 2 * (eps - noise) / eps.size)
  assert np.all(vb_grad[..., :3] == 0) and np.any(vb_grad[..., 3:] != 0)
  assert np.all(np.isfinite(grad))


def test_simple_loss_is_mse_on_the_target():
  schedule = diffusion.make_schedule("cosine", 100)
  x0, noise, prediction = _normal(16), _normal(17), _normal(18)
  t = jnp.array([3, 70])
  for prediction_type in diffusion.PREDICTION_TYPES:
    target = diffusion.prediction_target(schedule, x0, noise, t, prediction_type)
    loss, metrics = diffusion.diffusion_loss(schedule, prediction, x0, noise, t,
                                             prediction_type=prediction_type)
    _close(loss, np.mean((np.asarray(target, np.float64) - prediction) ** 2))
    assert metrics["vb"] == 0
  with pytest.raises(ValueError, match="channels"):
    diffusion.diffusion_loss(schedule, prediction[..., :2], x0, noise, t)


def _labelled_eps(x_t, t, labels):
  """eps = 0.1 x + 0.01 label, and a variance channel per channel that reads the label too."""
  shift = 0.01 * labels.astype(jnp.float32).reshape((-1, 1, 1, 1))
  return jnp.concatenate([0.1 * x_t + shift, jnp.zeros_like(x_t) + shift], axis=-1)


def test_classifier_free_guidance():
  x_t, t = jnp.asarray(_normal(19)), jnp.array([5, 5])
  labels, null = jnp.array([3, 7]), 10
  calls = []

  def counted(x, t, labels):
    calls.append(x.shape[0])
    return _labelled_eps(x, t, labels)

  plain = _labelled_eps(x_t, t, labels)
  np.testing.assert_array_equal(diffusion.guided_prediction(counted, x_t, t, labels), plain)
  assert calls == [2]
  scale = 4.0
  guided = diffusion.guided_prediction(counted, x_t, t, labels, guidance_scale=scale,
                                       null_label=null)
  assert calls == [2, 4]  # One doubled batch.
  uncond = _labelled_eps(x_t, t, jnp.full((2,), null))
  _close(guided[..., :3], uncond[..., :3] + scale * (plain[..., :3] - uncond[..., :3]))
  np.testing.assert_array_equal(guided[..., 3:], plain[..., 3:])  # The conditional variance.
  with pytest.raises(ValueError, match="null_label"):
    diffusion.guided_prediction(counted, x_t, t, labels, guidance_scale=scale)

  # Through the sampler: eps is linear in the label, so guidance is the label null + s (y - null).
  run = functools.partial(diffusion.sample, _labelled_eps, SHAPE, sampler="ddim", num_steps=3,
                          schedule=diffusion.make_schedule("linear", 1000), null_label=null)
  guided = jax.jit(functools.partial(run, guidance_scale=scale))
  plain = jax.jit(run)
  rng = _key(4)
  _close(guided(rng, labels=labels), plain(rng, labels=null + scale * (labels - null)))


def test_argument_errors():
  schedule = diffusion.make_schedule("linear", 10)
  with pytest.raises(ValueError, match="sampler"):
    diffusion.sample(_analytic_eps, SHAPE, _key(0), sampler="euler_a")
  with pytest.raises(ValueError, match="schedule"):
    diffusion.sample(_analytic_eps, SHAPE, _key(0), sampler="ddim")
  with pytest.raises(ValueError, match="learned_range"):
    diffusion.ddpm_step(schedule, _normal(0), _normal(1), 3, _normal(2),
                        variance_type="learned_range")
  with pytest.raises(ValueError, match="kind"):
    diffusion.make_schedule("sigmoid")
  with pytest.raises(ValueError, match="prediction_type"):
    diffusion.predict_x0(schedule, _normal(0), _normal(1), 3, "v_prediction")
