"""Training losses: DDPM's simple MSE, Improved DDPM's hybrid loss, flow matching's MSE.

Every loss is a mean over all but the batch axis, then a mean over the batch, and
returns (loss, metrics) with metrics a dict of batch means.

The hybrid loss (Nichol & Dhariwal 2021, sec. 3.1) trains a model with 2C output
channels: the prediction (epsilon or v) and C values v in [-1, 1] that set the
variance of p(x_{t-1} | x_t), log sigma^2 = f log beta_t + (1 - f) log beta~_t with
f = (v + 1) / 2. It is L_simple + lambda * L_vlb, where L_vlb = sum_t L_t is
estimated at the sampled t as T * L_t, and lambda = 0.001: the VLB term of one
example weighs (T / 1000) * L_t (1 * L_t for T = 1000, as DiT's `mse + vb`).
L_t is in bits per dimension (nats / log 2, averaged over the dimensions):
  t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), both Gaussian;
  t = 0: -log p(x0 | x_1), the discretised Gaussian decoder: data in [-1, 1] in 256
         bins of width 2 / 255, the edge bins extended to -inf and +inf.
The model's mean in L_t comes from a stop-gradient copy of the prediction, so L_vlb
trains only the variance channels and L_simple only the prediction.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from vitjax.diffusion import schedules


def mean_over_dimensions(x):
  """(B, ...) -> (B,): the mean over all but the batch axis."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def normal_kl(mean1, log_var1, mean2, log_var2):
  """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats."""
  return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                + (mean1 - mean2) ** 2 * jnp.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) elementwise, in nats, of data x in [-1, 1] quantised to 256 levels.

  The probability of the bin [x - 1/255, x + 1/255] under N(mean, exp(log_scale)^2),
  with the lowest bin extended to -inf and the highest to +inf (DDPM, sec. 3.3).
  Uses the exact normal CDF (Improved DDPM's code uses a tanh approximation of it);
  probabilities are floored at 1e-12 as there.

  Args:
    x: data in [-1, 1] (values of (k / 127.5) - 1).
    mean: the decoder's mean.
    log_scale: the log of its standard deviation.

  Returns:
    The log-likelihoods, of x's shape.
  """
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (centered + 1.0 / 255.0)
  lower = inv_std * (centered - 1.0 / 255.0)
  log_cdf_upper = special.log_ndtr(upper)  # log P(X <= x + 1/255): the lowest bin.
  log_survival_lower = special.log_ndtr(-lower)  # log P(X >= x - 1/255): the highest bin.
  # Within the bin: P(lower < X < upper), computed on the side of the mean where it does not
  # cancel (both CDFs near 1 above the mean).
  bin_probability = jnp.where(lower > 0, special.ndtr(-lower) - special.ndtr(-upper),
                              special.ndtr(upper) - special.ndtr(lower))
  log_bin = jnp.log(jnp.maximum(bin_probability, 1e-12))
  return jnp.where(x < -0.999, jnp.maximum(log_cdf_upper, np.log(1e-12)),
                   jnp.where(x > 0.999, jnp.maximum(log_survival_lower, np.log(1e-12)), log_bin))


def vlb_terms(schedule, x0, x_t, t, x0_prediction, log_variance):
  """L_t of the variational bound, per example, in bits per dimension.

  Args:
    schedule: the `Schedule`.
    x0: (B, ...) clean data (in [-1, 1] for the decoder term to be a likelihood).
    x_t: the noisy input at t.
    t: (B,) integer timesteps.
    x0_prediction: the model's estimate of x0 (gives p's mean through q's posterior mean).
    log_variance: the log variance of p(x_{t-1} | x_t), x_t's shape.

  Returns:
    (B,) float32: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) where t > 0, and the
    decoder's -log p(x0 | x_1) where t = 0.
  """
  true_mean = schedules.posterior_mean(schedule, x0, x_t, t)
  true_log_variance = schedules.gather(schedule.posterior_log_variance_clipped, t, x_t.ndim)
  model_mean = schedules.posterior_mean(schedule, x0_prediction, x_t, t)
  kl = mean_over_dimensions(normal_kl(true_mean, true_log_variance, model_mean, log_variance))
  decoder_nll = -mean_over_dimensions(
      discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_variance))
  return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl) / np.log(2.0)


def diffusion_loss(schedule, prediction, x0, noise, t, *, prediction_type="epsilon",
                   vlb_weight=None):
  """The DDPM training loss: MSE on the target, plus the VLB term with a learned variance.

  With C-channel predictions: L_simple, the MSE to `prediction_target` (Ho et al. 2020).
  With 2C channels (prediction, then the variance values in [-1, 1]): Improved DDPM's
  hybrid loss L_simple + vlb_weight * L_t, L_t from `vlb_terms` in bits per dimension,
  its mean from the stop-gradient prediction (see the module docstring).

  Args:
    schedule: the `Schedule` the noise was added with.
    prediction: (B, ..., C) or (B, ..., 2C): the model's output at x_t = add_noise(
      schedule, x0, noise, t).
    x0: (B, ..., C) clean data.
    noise: the noise of x_t.
    t: (B,) integer timesteps.
    prediction_type: 'epsilon' or 'v'.
    vlb_weight: the weight of L_t; None: Improved DDPM's lambda * T = T / 1000.

  Returns:
    (loss, metrics): the scalar loss, and {'mse': ..., 'vb': ...} batch means
    ('vb' is 0 without a learned variance).
  """
  channels = x0.shape[-1]
  if prediction.shape[-1] not in (channels, 2 * channels):
    raise ValueError(f"The prediction has {prediction.shape[-1]} channels; expected "
                     f"{channels} (fixed variance) or {2 * channels} (learned variance) for "
                     f"data of shape {x0.shape}.")
  x0, noise, prediction = (jnp.asarray(a, jnp.float32) for a in (x0, noise, prediction))
  target = schedules.prediction_target(schedule, x0, noise, t, prediction_type)
  mse = mean_over_dimensions((target - prediction[..., :channels]) ** 2)
  vb = jnp.zeros_like(mse)
  if prediction.shape[-1] == 2 * channels:
    x_t = schedules.add_noise(schedule, x0, noise, t)
    frozen = jax.lax.stop_gradient(prediction[..., :channels])
    x0_prediction = schedules.predict_x0(schedule, x_t, frozen, t, prediction_type)
    log_variance = schedules.learned_log_variance(schedule, prediction[..., channels:], t)
    vb = vlb_terms(schedule, x0, x_t, t, x0_prediction, log_variance)
  if vlb_weight is None:
    vlb_weight = schedule.num_timesteps / 1000.0
  loss = jnp.mean(mse + vlb_weight * vb)
  return loss, {"mse": jnp.mean(mse), "vb": jnp.mean(vb)}


def flow_loss(prediction, x0, noise):
  """Flow matching's loss: the MSE of the predicted velocity to noise - x0.

  Args:
    prediction: (B, ..., C) the model's velocity at x_t = flow_interpolate(x0, noise, t).
    x0: clean data.
    noise: the noise of x_t.

  Returns:
    (loss, {'mse': loss}).
  """
  if prediction.shape != x0.shape:
    raise ValueError(f"The velocity prediction's shape {prediction.shape} is not the data's "
                     f"{x0.shape}.")
  target = schedules.flow_velocity(jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32))
  loss = jnp.mean(mean_over_dimensions((target - prediction.astype(jnp.float32)) ** 2))
  return loss, {"mse": loss}
