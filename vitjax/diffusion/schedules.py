"""Forward processes: DDPM noise schedules and the rectified-flow interpolation.

DDPM (Ho et al. 2020): x_t = sqrt(acp_t) * x0 + sqrt(1 - acp_t) * noise, with
acp_t = prod_{s<=t} (1 - beta_s) the cumulative product of the alphas and t an integer
in [0, T). A `Schedule` holds the betas as float64 NumPy arrays and derives every table
the losses and samplers need (posterior coefficients, clipped log variances, ...) in
float64; a function gathers a table at traced timesteps as float32 constants. Computing
in float64 matters: 1 - acp_t near t = 0, or a respaced step's beta, loses most of its
digits when formed from float32 values. The schedule is therefore a constant of the
computation (close over it, or pass it as a static argument: it hashes by identity),
not a pytree of parameters.

Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023), in diffusers'
`FlowMatchEulerDiscreteScheduler` convention: x_t = (1 - t) * x0 + t * noise for t
in [0, 1] (t = 1 is pure noise), and the model predicts the velocity noise - x0.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v")
SCHEDULE_KINDS = ("linear", "cosine")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FLOW_TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A DDPM noise schedule: float64 betas and the tables derived from them.

  Attributes:
    betas: (T,) float64, beta_t = 1 - acp_t / acp_{t-1} (acp_{-1} = 1).
    timesteps: (T,) int64, the model's timestep at each index: arange(T) for a
      training schedule; the kept timesteps of a `respace`d one (whose index t
      then steps to index t - 1, the previous kept timestep).
  """
  betas: np.ndarray
  timesteps: np.ndarray

  @property
  def num_timesteps(self):
    return self.betas.shape[0]

  @property
  def log_alphas_cumprod(self):
    return np.cumsum(np.log1p(-self.betas))

  @property
  def alphas_cumprod(self):
    return np.exp(self.log_alphas_cumprod)

  @property
  def one_minus_alphas_cumprod(self):
    """1 - acp_t, exact to float64 precision even where acp_t is close to 1."""
    return -np.expm1(self.log_alphas_cumprod)

  @property
  def alphas_cumprod_prev(self):
    return np.append(1.0, self.alphas_cumprod[:-1])

  @property
  def one_minus_alphas_cumprod_prev(self):
    return np.append(0.0, self.one_minus_alphas_cumprod[:-1])

  @property
  def posterior_variance(self):
    """beta~_t = beta_t (1 - acp_{t-1}) / (1 - acp_t): the variance of q(x_{t-1} | x_t, x0)."""
    return self.betas * self.one_minus_alphas_cumprod_prev / self.one_minus_alphas_cumprod

  @property
  def posterior_log_variance_clipped(self):
    """log beta~_t, with beta~_1 in place of beta~_0 = 0 (Improved DDPM's clipping)."""
    variance = self.posterior_variance
    if len(variance) == 1:
      return np.log(self.betas)  # No beta~_1 to borrow; only t = 0, where it is unused.
    return np.log(np.append(variance[1], variance[1:]))

  @property
  def posterior_mean_coef_x0(self):
    """The weight of x0 in the mean of q(x_{t-1} | x_t, x0)."""
    return self.betas * np.sqrt(self.alphas_cumprod_prev) / self.one_minus_alphas_cumprod

  @property
  def posterior_mean_coef_xt(self):
    """The weight of x_t in the mean of q(x_{t-1} | x_t, x0)."""
    return (self.one_minus_alphas_cumprod_prev * np.sqrt(1.0 - self.betas)
            / self.one_minus_alphas_cumprod)


def schedule_from_betas(betas, timesteps=None):
  """A `Schedule` from (T,) betas in (0, 1), computed in float64."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f"betas must be a 1-D array in (0, 1); got shape {betas.shape}, "
                     f"range [{betas.min()}, {betas.max()}].")
  timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps, np.int64)
  return Schedule(betas=betas, timesteps=timesteps)


def make_schedule(kind="linear", num_timesteps=1000, *, beta_start=1e-4, beta_end=0.02,
                  max_beta=0.999):
  """A DDPM noise schedule by name.

  Args:
    kind: 'linear': betas evenly spaced from `beta_start` to `beta_end` (DDPM; diffusers'
      'linear'; as diffusers, not rescaled by 1000 / T as Improved DDPM's code does).
      'cosine': acp(t) = cos((t / T + s) / (1 + s) * pi / 2)^2 with s = 0.008, betas
      1 - acp(t + 1) / acp(t) clipped at `max_beta` (Nichol & Dhariwal 2021; diffusers'
      'squaredcos_cap_v2').
    num_timesteps: T, the number of diffusion steps.
    beta_start: the first beta of 'linear'.
    beta_end: the last beta of 'linear'.
    max_beta: the largest beta of 'cosine'.

  Returns:
    The `Schedule`.
  """
  if kind == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif kind == "cosine":
    def alpha_bar(u):
      return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps),
                          max_beta) for i in range(num_timesteps)])
  else:
    raise ValueError(f"Unknown schedule kind {kind!r}; use one of {SCHEDULE_KINDS}.")
  return schedule_from_betas(betas)


def spaced_timesteps(num_timesteps, num_steps, spacing="leading"):
  """The `num_steps` timesteps of a shorter sampling chain, descending (diffusers' spacings).

  Args:
    num_timesteps: T of the training schedule.
    num_steps: how many timesteps to keep, at most T.
    spacing: 'leading': arange(num_steps) * (T // num_steps), e.g. 900, 800, ..., 0 (diffusers'
      default, with steps_offset=0); 'trailing': round(arange(T, 0, -T / num_steps)) - 1, e.g.
      999, 899, ..., 99; 'linspace': round(linspace(0, T - 1, num_steps)), the evenly strided
      timesteps of Improved DDPM's and DiT's respacing (`space_timesteps(T, '250')`).

  Returns:
    (num_steps,) int64 NumPy array, descending.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, num_timesteps={num_timesteps}].")
  if spacing == "leading":
    steps = np.arange(num_steps) * (num_timesteps // num_steps)
  elif spacing == "trailing":
    steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1
  elif spacing == "linspace":
    steps = np.round(np.linspace(0, num_timesteps - 1, num_steps))
  else:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}.")
  return np.sort(steps.astype(np.int64))[::-1].copy()


def respace(schedule, timesteps):
  """The schedule restricted to `timesteps` (Improved DDPM's respacing; diffusers' set_timesteps).

  The respaced schedule keeps acp at the given timesteps; its betas are those of the
  jumps between them, beta_i = 1 - acp[t_i] / acp[t_{i-1}] (acp before the first kept
  timestep is 1), so that its posterior, DDIM and learned-variance tables are those of
  the shorter chain. Its `timesteps` are the model's timesteps of each index.

  Args:
    schedule: a `Schedule`.
    timesteps: distinct timesteps of `schedule` to keep, in any order.

  Returns:
    A `Schedule` with len(timesteps) steps.
  """
  kept = np.sort(np.asarray(timesteps, np.int64))
  if len(np.unique(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= schedule.num_timesteps:
    raise ValueError(f"timesteps must be distinct and in [0, {schedule.num_timesteps}); "
                     f"got {timesteps}.")
  log_acp = schedule.log_alphas_cumprod[kept]
  betas = -np.expm1(np.diff(log_acp, prepend=0.0))
  return Schedule(betas=betas, timesteps=schedule.timesteps[kept])


def gather(table, t, ndim):
  """table[t] as float32, shaped to broadcast against an array of rank `ndim` (batch first).

  Args:
    table: (T,) NumPy table of a `Schedule`.
    t: scalar or (B,) integer timesteps (indices into the table), possibly traced.
    ndim: the rank of the array the values multiply.

  Returns:
    () or (B, 1, ..., 1) float32 values.
  """
  values = jnp.asarray(np.asarray(table, np.float32))[jnp.asarray(t)]
  return values.reshape(values.shape + (1,) * (ndim - values.ndim)) if values.ndim else values


def add_noise(schedule, x0, noise, t):
  """x_t = sqrt(acp_t) * x0 + sqrt(1 - acp_t) * noise: a sample of q(x_t | x0).

  Args:
    schedule: the `Schedule`.
    x0: (B, ...) clean data.
    noise: standard normal noise of x0's shape.
    t: (B,) or scalar integer timesteps.

  Returns:
    x_t, float32, of x0's shape.
  """
  return (gather(np.sqrt(schedule.alphas_cumprod), t, x0.ndim) * x0
          + gather(np.sqrt(schedule.one_minus_alphas_cumprod), t, x0.ndim) * noise)


def _check_prediction_type(prediction_type):
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; use one of "
                     f"{PREDICTION_TYPES}.")


def prediction_target(schedule, x0, noise, t, prediction_type="epsilon"):
  """What the model learns to predict: 'epsilon', the noise; or 'v' (Salimans & Ho 2022).

  v = sqrt(acp_t) * noise - sqrt(1 - acp_t) * x0 (diffusers' `get_velocity`).

  Args:
    schedule: the `Schedule`.
    x0: (B, ...) clean data.
    noise: the noise that made x_t.
    t: (B,) or scalar integer timesteps.
    prediction_type: 'epsilon' or 'v'.

  Returns:
    The target, of x0's shape.
  """
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return noise
  return (gather(np.sqrt(schedule.alphas_cumprod), t, x0.ndim) * noise
          - gather(np.sqrt(schedule.one_minus_alphas_cumprod), t, x0.ndim) * x0)


def predict_x0(schedule, x_t, prediction, t, prediction_type="epsilon"):
  """The model's estimate of x0 from its prediction (C channels) at x_t.

  epsilon: x0 = (x_t - sqrt(1 - acp_t) * eps) / sqrt(acp_t);
  v: x0 = sqrt(acp_t) * x_t - sqrt(1 - acp_t) * v.
  """
  _check_prediction_type(prediction_type)
  sqrt_acp = gather(np.sqrt(schedule.alphas_cumprod), t, x_t.ndim)
  sqrt_one_minus_acp = gather(np.sqrt(schedule.one_minus_alphas_cumprod), t, x_t.ndim)
  if prediction_type == "epsilon":
    return (x_t - sqrt_one_minus_acp * prediction) / sqrt_acp
  return sqrt_acp * x_t - sqrt_one_minus_acp * prediction


def predict_noise(schedule, x_t, prediction, t, prediction_type="epsilon"):
  """The model's estimate of the noise from its prediction (C channels) at x_t.

  epsilon: the prediction itself; v: eps = sqrt(acp_t) * v + sqrt(1 - acp_t) * x_t.
  """
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return prediction
  return (gather(np.sqrt(schedule.alphas_cumprod), t, x_t.ndim) * prediction
          + gather(np.sqrt(schedule.one_minus_alphas_cumprod), t, x_t.ndim) * x_t)


def posterior_mean(schedule, x0, x_t, t):
  """The mean of q(x_{t-1} | x_t, x0): coef_x0[t] * x0 + coef_xt[t] * x_t."""
  return (gather(schedule.posterior_mean_coef_x0, t, x_t.ndim) * x0
          + gather(schedule.posterior_mean_coef_xt, t, x_t.ndim) * x_t)


def learned_log_variance(schedule, variance_values, t):
  """Improved DDPM's learned variance: log sigma_t^2 = f log beta_t + (1 - f) log beta~_t.

  Args:
    schedule: the `Schedule`.
    variance_values: the model's C variance channels, v in [-1, 1]; f = (v + 1) / 2.
    t: (B,) or scalar integer timesteps.

  Returns:
    The log variance, of variance_values' shape (log beta~_t clipped as
    `Schedule.posterior_log_variance_clipped`).
  """
  fraction = (variance_values + 1) / 2
  max_log = gather(np.log(schedule.betas), t, variance_values.ndim)
  min_log = gather(schedule.posterior_log_variance_clipped, t, variance_values.ndim)
  return fraction * max_log + (1 - fraction) * min_log


def sample_timesteps(rng, batch_size, num_timesteps):
  """(batch_size,) int32 training timesteps, uniform in [0, num_timesteps)."""
  return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def flow_interpolate(x0, noise, t):
  """x_t = (1 - t) * x0 + t * noise for (B,) or scalar t in [0, 1] (t = 1: pure noise)."""
  t = jnp.asarray(t, jnp.float32)
  t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim)) if t.ndim else t
  return (1 - t) * x0 + t * noise


def flow_velocity(x0, noise):
  """The velocity dx_t/dt = noise - x0: the flow model's training target."""
  return noise - x0


def sample_flow_times(rng, batch_size, *, distribution="uniform", logit_mean=0.0,
                      logit_std=1.0):
  """(batch_size,) float32 training times t in (0, 1) of the flow.

  Args:
    rng: a PRNG key.
    batch_size: how many.
    distribution: 'uniform' (rectified flow), or 'logit_normal': t = sigmoid(n) with
      n ~ N(logit_mean, logit_std^2), which favours the middle times (SD3, Esser et al. 2024).
    logit_mean: the mean of the logit-normal's normal.
    logit_std: the standard deviation of the logit-normal's normal.

  Returns:
    The times.
  """
  if distribution == "uniform":
    return jax.random.uniform(rng, (batch_size,), jnp.float32)
  if distribution == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,)))
  raise ValueError(f"Unknown flow time distribution {distribution!r}; use one of "
                   f"{FLOW_TIME_DISTRIBUTIONS}.")


def flow_sigmas(num_steps, *, shift=1.0, sigma_min=1e-3):
  """The times of a flow sampling chain: `num_steps` from 1 down to `sigma_min`, then 0.

  As diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` (whose sigma_min is
  1 / num_train_timesteps = 1e-3): linspace(1, sigma_min, num_steps), each shifted by
  shift * s / (1 + (shift - 1) * s) (SD3's resolution shift; 1: none), and a final 0.
  diffusers shifts its sigma_min twice; to match it for shift != 1 pass its
  `scheduler.sigma_min` here.

  Args:
    num_steps: the number of steps (model evaluations for Euler).
    shift: the time shift.
    sigma_min: the last nonzero time.

  Returns:
    (num_steps + 1,) float64 NumPy array, descending from 1 to 0.
  """
  if num_steps < 1 or not 0 < sigma_min < 1:
    raise ValueError(f"Need num_steps >= 1 and 0 < sigma_min < 1; got {num_steps}, {sigma_min}.")
  sigmas = np.linspace(1.0, sigma_min, num_steps)
  sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
  return np.append(sigmas, 0.0)
