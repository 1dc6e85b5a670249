"""Diffusion and flow-matching maths: schedules, training losses, samplers. Pure functions.

DDPM / Improved DDPM (epsilon or v prediction, fixed or learned variance):

    from vitjax import diffusion
    schedule = diffusion.make_schedule('linear', 1000)        # or 'cosine'; float64 tables
    t = diffusion.sample_timesteps(rng_t, batch, schedule.num_timesteps)
    noise = jax.random.normal(rng_n, x0.shape)
    x_t = diffusion.add_noise(schedule, x0, noise, t)
    prediction, _ = model.apply(variables, x_t, t, labels)   # C or 2C channels (learned sigma)
    loss, metrics = diffusion.diffusion_loss(schedule, prediction, x0, noise, t)

Rectified flow (x_t = (1 - t) x0 + t noise, velocity target noise - x0):

    t = diffusion.sample_flow_times(rng_t, batch)           # or distribution='logit_normal'
    x_t = diffusion.flow_interpolate(x0, noise, t)
    loss, metrics = diffusion.flow_loss(model.apply(variables, x_t, t, labels)[0], x0, noise)

Sampling, jitted once (every keyword static; `labels` and `rng` traced):

    def denoise_fn(x_t, t, labels):
      return model.apply(variables, x_t, t, labels)[0]
    generate = jax.jit(functools.partial(
        diffusion.sample, denoise_fn, (8, 32, 32, 4), sampler='ddpm', num_steps=250,
        schedule=schedule, variance_type='learned_range', guidance_scale=4.0,
        null_label=1000))
    images = generate(rng, labels=labels)

`sampler` is 'ddpm', 'ddim' (with `eta`), 'euler' or 'heun' (flow; the model gets times
in [0, 1]). The per-step functions (`ddpm_step`, `ddim_step`, `flow_euler_step`,
`flow_heun_step`) step arrays; `respace` gives the schedule of a shorter chain.
"""

from vitjax.diffusion.losses import (diffusion_loss, discretized_gaussian_log_likelihood,
                                     flow_loss, mean_over_dimensions, normal_kl, vlb_terms)
from vitjax.diffusion.samplers import (SAMPLERS, VARIANCE_TYPES, ddim_step, ddpm_step,
                                       flow_euler_step, flow_heun_step, guided_prediction,
                                       sample)
from vitjax.diffusion.schedules import (PREDICTION_TYPES, SCHEDULE_KINDS, TIMESTEP_SPACINGS,
                                        Schedule, add_noise, flow_interpolate, flow_sigmas,
                                        flow_velocity, gather, learned_log_variance,
                                        make_schedule, posterior_mean, predict_noise,
                                        predict_x0, prediction_target, respace,
                                        sample_flow_times, sample_timesteps,
                                        schedule_from_betas, spaced_timesteps)

__all__ = [
    "PREDICTION_TYPES", "SAMPLERS", "SCHEDULE_KINDS", "TIMESTEP_SPACINGS", "VARIANCE_TYPES",
    "Schedule", "add_noise", "ddim_step", "ddpm_step", "diffusion_loss",
    "discretized_gaussian_log_likelihood", "flow_euler_step", "flow_heun_step",
    "flow_interpolate", "flow_loss", "flow_sigmas", "flow_velocity", "gather",
    "guided_prediction", "learned_log_variance", "make_schedule", "mean_over_dimensions",
    "normal_kl", "posterior_mean", "predict_noise", "predict_x0", "prediction_target",
    "respace", "sample", "sample_flow_times", "sample_timesteps", "schedule_from_betas",
    "spaced_timesteps", "vlb_terms",
]
