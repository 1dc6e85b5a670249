"""Samplers: pure functions that step arrays, and `sample`, one jittable driver for all.

DDPM ancestral (Ho et al. 2020; Improved DDPM's learned variance) and DDIM (Song et al.
2021) step a (respaced) `Schedule` from index t to t - 1; Euler and Heun integrate the
rectified flow dx/dt = v(x, t) from t = 1 to 0. They follow diffusers' DDPMScheduler,
DDIMScheduler (defaults: 'leading' spacing, steps_offset=0, set_alpha_to_one=True,
use_clipped_model_output=False; clip_sample off unless `clip_x0` is given),
FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler; `tests/test_diffusion.py`
checks them against these.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.diffusion import schedules

SAMPLERS = ("ddpm", "ddim", "euler", "heun")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def _x0_and_clip(schedule, x_t, prediction, t, prediction_type, clip_x0):
  x0 = schedules.predict_x0(schedule, x_t, prediction, t, prediction_type)
  return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def ddpm_step(schedule, x_t, prediction, t, noise, *, prediction_type="epsilon",
              variance_type="fixed_small", clip_x0=None):
  """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (DDPM, Improved DDPM).

  The mean is q's posterior mean at the predicted x0; the variance is beta~_t
  ('fixed_small'), beta_t ('fixed_large'), or the model's interpolation of their logs
  ('learned_range': `prediction` has 2C channels, the last C the values in [-1, 1]).
  No noise is added at t = 0.

  Args:
    schedule: the `Schedule`; `respace` it for a shorter chain (t then indexes it).
    x_t: (B, ..., C) the current sample.
    prediction: the model's output at (x_t, schedule.timesteps[t]): C channels (2C with
      'learned_range'; with a fixed variance extra channels are ignored).
    t: a scalar or (B,) integer index into the schedule.
    noise: standard normal noise of x_t's shape.
    prediction_type: 'epsilon' or 'v'.
    variance_type: 'fixed_small', 'fixed_large' or 'learned_range'.
    clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] (pixels in [-1, 1]: 1.0); None: off.

  Returns:
    x_{t-1}, float32.
  """
  channels = x_t.shape[-1]
  if variance_type == "learned_range":
    if prediction.shape[-1] != 2 * channels:
      raise ValueError(f"variance_type='learned_range' needs {2 * channels} prediction channels "
                       f"(prediction and variance values); got {prediction.shape[-1]}.")
    log_variance = schedules.learned_log_variance(schedule, prediction[..., channels:], t)
    std = jnp.exp(0.5 * log_variance)
  elif variance_type in ("fixed_small", "fixed_large"):
    variance = (schedule.posterior_variance if variance_type == "fixed_small"
                else schedule.betas)
    std = schedules.gather(np.sqrt(variance), t, x_t.ndim)
  else:
    raise ValueError(f"Unknown variance_type {variance_type!r}; use one of {VARIANCE_TYPES}.")
  x0 = _x0_and_clip(schedule, x_t, prediction[..., :channels], t, prediction_type, clip_x0)
  mean = schedules.posterior_mean(schedule, x0, x_t, t)
  t = jnp.asarray(t)
  noisy = (t > 0).reshape(t.shape + (1,) * (x_t.ndim - t.ndim)) if t.ndim else t > 0
  return mean + jnp.where(noisy, std * noise, 0.0)


def ddim_step(schedule, x_t, prediction, t, noise=None, *, prediction_type="epsilon", eta=0.0,
              clip_x0=None):
  """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12).

  x_{t-1} = sqrt(acp_{t-1}) x0 + sqrt(1 - acp_{t-1} - sigma_t^2) eps + sigma_t noise, with
  sigma_t = eta * sqrt(beta~_t) (eta = 0: deterministic; eta = 1: DDPM's fixed_small) and
  acp_{-1} = 1. eps comes from the unclipped prediction (diffusers'
  use_clipped_model_output=False).

  Args:
    schedule: the `Schedule`; `respace` it for a shorter chain (t then indexes it).
    x_t: (B, ..., C) the current sample.
    prediction: the model's output at (x_t, schedule.timesteps[t]), C channels (extra
      channels, a learned variance, are ignored).
    t: a scalar or (B,) integer index into the schedule.
    noise: standard normal noise of x_t's shape; unused (may be None) when eta = 0.
    prediction_type: 'epsilon' or 'v'.
    eta: the noise scale, a Python float.
    clip_x0: clip the predicted x0 to [-clip_x0, clip_x0]; None: off.

  Returns:
    x_{t-1}, float32.
  """
  prediction = prediction[..., :x_t.shape[-1]]
  x0 = _x0_and_clip(schedule, x_t, prediction, t, prediction_type, clip_x0)
  eps = schedules.predict_noise(schedule, x_t, prediction, t, prediction_type)
  sigma_squared = eta ** 2 * schedule.posterior_variance
  direction = np.sqrt(np.maximum(schedule.one_minus_alphas_cumprod_prev - sigma_squared, 0.0))
  x_prev = (schedules.gather(np.sqrt(schedule.alphas_cumprod_prev), t, x_t.ndim) * x0
            + schedules.gather(direction, t, x_t.ndim) * eps)
  if eta > 0:
    x_prev = x_prev + schedules.gather(np.sqrt(sigma_squared), t, x_t.ndim) * noise
  return x_prev


def flow_euler_step(x, velocity, sigma, sigma_next):
  """One Euler step of the flow ODE from time sigma to sigma_next: x + (sigma_next - sigma) v."""
  return x + (sigma_next - sigma) * velocity


def flow_heun_step(velocity_fn, x, sigma, sigma_next):
  """One Heun step (Euler, then the trapezoid rule) of the flow ODE from sigma to sigma_next.

  Args:
    velocity_fn: (x, time) -> velocity, time a scalar.
    x: the sample at time sigma.
    sigma: the current time.
    sigma_next: the next time (> 0: at 0 take an Euler step, as diffusers does).

  Returns:
    The sample at sigma_next.
  """
  velocity = velocity_fn(x, sigma)
  x_euler = flow_euler_step(x, velocity, sigma, sigma_next)
  return flow_euler_step(x, 0.5 * (velocity + velocity_fn(x_euler, sigma_next)), sigma,
                         sigma_next)


def guided_prediction(denoise_fn, x_t, t, labels=None, *, guidance_scale=1.0, null_label=None):
  """The model's prediction, with classifier-free guidance (Ho & Salimans 2022) if scale != 1.

  With guidance, the conditional and unconditional inputs (`labels` replaced by
  `null_label`) run as one doubled batch, and the first C channels (C = x_t's) are
  uncond + guidance_scale * (cond - uncond); further channels (a learned variance) are
  the conditional half's, as DiT.

  Args:
    denoise_fn: (x_t, t, labels) -> prediction, NHWC, C or 2C channels.
    x_t: (B, ..., C) the noisy input.
    t: (B,) timesteps.
    labels: (B, ...) conditions, or None.
    guidance_scale: s, a Python float (1: no guidance, one call).
    null_label: the unconditional label (DiT: num_classes), broadcast to labels' shape.

  Returns:
    The prediction, (B, ..., C or 2C).
  """
  if guidance_scale == 1.0:
    return denoise_fn(x_t, t, labels)
  if labels is None or null_label is None:
    raise ValueError("Classifier-free guidance (guidance_scale != 1) needs labels and "
                     "null_label.")
  labels = jnp.asarray(labels)
  null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
  both = denoise_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, null]))
  cond, uncond = jnp.split(both, 2)
  channels = x_t.shape[-1]
  guided = uncond[..., :channels] + guidance_scale * (cond[..., :channels]
                                                      - uncond[..., :channels])
  return jnp.concatenate([guided, cond[..., channels:]], axis=-1)


def sample(denoise_fn, shape, rng, *, sampler="ddim", num_steps=None, schedule=None,
           prediction_type="epsilon", variance_type="fixed_small", eta=0.0,
           timestep_spacing="leading", clip_x0=None, flow_shift=1.0, flow_sigma_min=1e-3,
           guidance_scale=1.0, labels=None, null_label=None):
  """Samples from a diffusion or flow model: noise, then `num_steps` steps of `sampler`.

  Pure and jittable: every argument but `rng`, `labels` (and what `denoise_fn` closes over)
  is static, so wrap it as `jax.jit(functools.partial(sample, denoise_fn, shape, ...))`.
  The steps run in a `lax.fori_loop`. The random numbers: rng_init, rng_steps =
  split(rng); x_T = normal(rng_init, shape); step k (k = 0 first) draws
  normal(fold_in(rng_steps, k), shape) when the sampler is stochastic.

  Args:
    denoise_fn: (x_t, t, labels) -> prediction. x_t (B, H, W, C) float32; t (B,) int32
      timesteps ('ddpm', 'ddim') or float32 times in [0, 1] ('euler', 'heun'); the
      prediction has C channels (epsilon, v, or the flow's velocity) or 2C (and the
      learned variance values).
    shape: (B, H, W, C) of the samples.
    rng: a PRNG key.
    sampler: 'ddpm' (ancestral), 'ddim', 'euler' or 'heun' (flow ODE).
    num_steps: steps of the chain (DDPM/DDIM: None = all of the schedule's timesteps, fewer
      are chosen by `timestep_spacing`; flow: required).
    schedule: the training `Schedule` (DDPM and DDIM).
    prediction_type: 'epsilon' or 'v' (DDPM and DDIM).
    variance_type: 'fixed_small', 'fixed_large' or 'learned_range' (DDPM).
    eta: DDIM's noise scale.
    timestep_spacing: 'leading' (diffusers' default), 'trailing' or 'linspace'.
    clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] (DDPM, DDIM); None: off (as DiT).
    flow_shift: the flow's time shift (`schedules.flow_sigmas`).
    flow_sigma_min: the flow's last nonzero time.
    guidance_scale: classifier-free guidance scale, a Python float (1: none).
    labels: (B, ...) conditions passed to denoise_fn, or None.
    null_label: the unconditional label, needed when guidance_scale != 1.

  Returns:
    (B, H, W, C) float32 samples.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; use one of {SAMPLERS}.")
  if sampler in ("ddpm", "ddim") and schedule is None:
    raise ValueError(f"sampler={sampler!r} needs the diffusion schedule.")
  if sampler in ("euler", "heun") and num_steps is None:
    raise ValueError(f"sampler={sampler!r} needs num_steps.")
  batch, channels = shape[0], shape[-1]
  rng_init, rng_steps = jax.random.split(rng)
  x = jax.random.normal(rng_init, shape, jnp.float32)

  def predict(x_t, t):
    t = jnp.broadcast_to(t, (batch,))
    return guided_prediction(denoise_fn, x_t, t, labels, guidance_scale=guidance_scale,
                             null_label=null_label)

  if sampler in ("ddpm", "ddim"):
    num_steps = num_steps or schedule.num_timesteps
    chain = schedules.respace(schedule, schedules.spaced_timesteps(
        schedule.num_timesteps, num_steps, timestep_spacing))
    model_timesteps = jnp.asarray(chain.timesteps, jnp.int32)
    stochastic = sampler == "ddpm" or eta > 0

    def body(k, x):
      index = num_steps - 1 - k
      prediction = predict(x, model_timesteps[index])
      noise = (jax.random.normal(jax.random.fold_in(rng_steps, k), shape, jnp.float32)
               if stochastic else None)
      if sampler == "ddpm":
        return ddpm_step(chain, x, prediction, index, noise, prediction_type=prediction_type,
                         variance_type=variance_type, clip_x0=clip_x0)
      return ddim_step(chain, x, prediction, index, noise, prediction_type=prediction_type,
                       eta=eta, clip_x0=clip_x0)

    return jax.lax.fori_loop(0, num_steps, body, x)

  sigmas = jnp.asarray(schedules.flow_sigmas(num_steps, shift=flow_shift,
                                             sigma_min=flow_sigma_min), jnp.float32)

  def velocity(x_t, sigma):
    return predict(x_t, sigma)[..., :channels]

  def euler(k, x):
    return flow_euler_step(x, velocity(x, sigmas[k]), sigmas[k], sigmas[k + 1])

  if sampler == "euler":
    return jax.lax.fori_loop(0, num_steps, euler, x)

  def heun(k, x):
    return flow_heun_step(velocity, x, sigmas[k], sigmas[k + 1])

  x = jax.lax.fori_loop(0, num_steps - 1, heun, x)
  # The last step, to time 0, is Euler's (as diffusers, and Karras et al.'s Algorithm 1).
  return euler(num_steps - 1, x)
