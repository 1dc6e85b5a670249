"""Diffusion training (`config.task = 'diffusion'`): DDPM / Improved DDPM or flow matching.

    config.task = 'diffusion'
    config.model = dict(name='dit', variant='S/2', image_size=8, in_channels=1,
                        num_classes=10, learn_sigma=True)      # or a 'uvit' model
    config.diffusion = dict(
        objective='ddpm',        # 'ddpm' (noise schedule) or 'flow' (rectified flow)
        schedule='linear',       # 'linear' or 'cosine' (ddpm)
        num_timesteps=1000,      # ddpm
        prediction='epsilon',    # 'epsilon' or 'v' (ddpm)
        flow_times='uniform',    # 'uniform' or 'logit_normal' (flow)
        vae=None,                # a diffusers AutoencoderKL directory: train on its latents
    )
    config.ema = dict(decay=0.9999)                            # sampled from by evaluators
    config.evaluators = dict(generation=dict(sampler='ddim', num_steps=50, guidance_scale=4.0))

The data are the batch's images mapped back to [-1, 1] (from `config.input.mean/std`),
or with `diffusion.vae` the VAE's latents of them (a sample of the encoder's posterior,
scaled by its `scaling_factor`, as latent diffusion trains). A model with a learned
variance (`learn_sigma`: twice the data's channels) trains on Improved DDPM's hybrid
loss (MSE + the VLB term), as DiT does; otherwise on the MSE of its target (the noise,
v, or the flow's velocity). Labels condition a class-conditional model (`num_classes`
> 0), dropped to the null class at its `class_dropout_prob` for classifier-free
guidance. Flow models see times t in [0, 1] as timesteps 1000 t, the DDPM range their
timestep embedding is made for.

The maths are vitjax.diffusion's; the generation evaluator (vitjax.evaluate.generation)
samples with the same settings (`sampling_options`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from vitjax import diffusion
from vitjax.train.tasks.base import Task

OBJECTIVES = ("ddpm", "flow")
# config.diffusion's keys and their defaults.
DEFAULTS = dict(objective="ddpm", schedule="linear", num_timesteps=1000, prediction="epsilon",
                flow_times="uniform", vae=None)
FLOW_TIME_SCALE = 1000.0  # Flow time t in [0, 1] -> the model's timestep.


@dataclasses.dataclass(frozen=True)
class DiffusionOptions:
  """config.diffusion, checked: what the loss and the samplers need."""
  objective: str = "ddpm"
  schedule: str = "linear"
  num_timesteps: int = 1000
  prediction: str = "epsilon"
  flow_times: str = "uniform"
  vae: str = None

  @classmethod
  def from_config(cls, config):
    section = dict(config.get("diffusion") or {})
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
      raise ValueError(f"config.diffusion has no key(s) {', '.join(map(repr, unknown))}; its "
                       f"keys: {', '.join(DEFAULTS)}.")
    options = cls(**{**DEFAULTS, **section})
    checks = (("objective", OBJECTIVES), ("schedule", diffusion.SCHEDULE_KINDS),
              ("prediction", diffusion.PREDICTION_TYPES),
              ("flow_times", diffusion.schedules.FLOW_TIME_DISTRIBUTIONS))
    for key, allowed in checks:
      if getattr(options, key) not in allowed:
        raise ValueError(f"config.diffusion.{key}={getattr(options, key)!r}: use one of "
                         f"{', '.join(map(repr, allowed))}, e.g. --config.diffusion.{key}="
                         f"{allowed[0]}.")
    if (not isinstance(options.num_timesteps, int) or isinstance(options.num_timesteps, bool)
        or options.num_timesteps < 2):
      raise ValueError(f"config.diffusion.num_timesteps={options.num_timesteps!r}: must be an "
                       "int >= 2, e.g. --config.diffusion.num_timesteps=1000.")
    return options

  def make_schedule(self):
    return diffusion.make_schedule(self.schedule, self.num_timesteps)

  def model_time(self, t):
    """The timesteps the model is given for the objective's times."""
    return t * FLOW_TIME_SCALE if self.objective == "flow" else t


def to_unit_range(images, input_config):
  """Images normalised with `input_config.mean/std` -> pixels in [-1, 1]."""
  mean = jnp.asarray(input_config.get("mean", (0.5,)), jnp.float32)
  std = jnp.asarray(input_config.get("std", (0.5,)), jnp.float32)
  channels = images.shape[-1]
  mean, std = (jnp.broadcast_to(v.reshape(-1)[:channels] if v.size > 1 else v, (channels,))
               for v in (mean, std))
  return (images.astype(jnp.float32) * std + mean) * 2.0 - 1.0


def from_unit_range(pixels, input_config):
  """The inverse of `to_unit_range`: [-1, 1] pixels -> the input normalisation."""
  mean = jnp.asarray(input_config.get("mean", (0.5,)), jnp.float32)
  std = jnp.asarray(input_config.get("std", (0.5,)), jnp.float32)
  channels = pixels.shape[-1]
  mean, std = (jnp.broadcast_to(v.reshape(-1)[:channels] if v.size > 1 else v, (channels,))
               for v in (mean, std))
  return ((pixels + 1.0) / 2.0 - mean) / std


class Diffusion(Task):
  """Denoising diffusion or flow matching of a DiT / U-ViT (see the module docstring)."""

  default_evaluators = {"generation": {}}

  def __init__(self, config):
    super().__init__(config)
    self.options = DiffusionOptions.from_config(config)
    self.schedule = self.options.make_schedule() if self.options.objective == "ddpm" else None
    self._vae = None

  def build_model(self):
    model = super().build_model()
    if not hasattr(model, "learn_sigma") or not hasattr(model, "in_channels"):
      raise ValueError(f"config.task='diffusion' trains a diffusion model (name='dit' or "
                       f"'uvit', or a registered 'dit_*' / 'uvit_*'), but config.model.name="
                       f"{self.config.model.name!r} is a {type(model).__name__}.")
    if self.options.objective == "flow" and model.learn_sigma:
      raise ValueError("config.diffusion.objective='flow' predicts a velocity, not a variance: "
                       "set config.model.learn_sigma=False.")
    vae = self.vae()
    if vae is not None:
      module, _ = vae
      if model.in_channels != module.latent_channels:
        raise ValueError(f"config.diffusion.vae's latents have {module.latent_channels} "
                         f"channels; set config.model.in_channels={module.latent_channels}.")
    return model

  def vae(self):
    """(AutoencoderKL module, params) of config.diffusion.vae, or None; read once."""
    if self.options.vae is None:
      return None
    if self._vae is None:
      from vitjax.convert import vae as vae_convert  # pylint: disable=import-outside-toplevel
      self._vae = vae_convert.load_diffusers_vae(self.options.vae)
    return self._vae

  def prepare(self, model, mesh, rng):
    """The VAE's parameters, replicated (frozen: never trained or checkpointed)."""
    del model, rng
    vae = self.vae()
    if vae is None:
      return {}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {"vae": jax.device_put(vae[1], replicated)}

  def evaluators(self):
    """The configured evaluators; 'generation' gets the task's settings (`sampling_options`)."""
    evaluators = super().evaluators()
    if "generation" in evaluators:
      evaluators["generation"] = {**self.sampling_options(), **evaluators["generation"]}
    return evaluators

  def sampling_options(self):
    """What a sampler needs to know of training: objective, schedule, prediction, VAE, the
    input normalisation of real images."""
    options = dataclasses.asdict(self.options)
    return {"diffusion": options, "input_mean": tuple(self.config.input.get("mean", (0.5,))),
            "input_std": tuple(self.config.input.get("std", (0.5,)))}

  def data(self, images, constants, rng):
    """The training data x0 of a batch: [-1, 1] pixels, or the scaled VAE latents."""
    pixels = to_unit_range(images, self.config.input)
    if "vae" not in constants:
      return pixels
    module, _ = self.vae()
    z = module.apply({"params": constants["vae"]}, pixels,
                     method=lambda vae, x: vae.encode(x).sample(rng))
    return module.scale(z)

  def loss(self, model, params, batch, rng, constants, step):
    del step
    rng_data, rng_t, rng_noise, rng_model = jax.random.split(rng, 4)
    x0 = jax.lax.stop_gradient(self.data(batch["image"], constants, rng_data))
    labels = batch["label"] if model.num_classes else None
    if labels is not None and labels.ndim > 1:  # Soft labels (Mixup) have no class to condition on.
      raise ValueError("config.task='diffusion' conditions on class labels: turn off Mixup / "
                       "CutMix (config.input.mixup_alpha=0, cutmix_alpha=0).")
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    batch_size = x0.shape[0]
    if self.options.objective == "flow":
      t = diffusion.sample_flow_times(rng_t, batch_size, distribution=self.options.flow_times)
      x_t = diffusion.flow_interpolate(x0, noise, t)
    else:
      t = diffusion.sample_timesteps(rng_t, batch_size, self.options.num_timesteps)
      x_t = diffusion.add_noise(self.schedule, x0, noise, t)
    prediction, _ = model.apply({"params": params}, x_t, self.options.model_time(t), labels,
                                train=True, rngs={"dropout": rng_model})
    if self.options.objective == "flow":
      return diffusion.flow_loss(prediction, x0, noise)
    return diffusion.diffusion_loss(self.schedule, prediction, x0, noise, t,
                                    prediction_type=self.options.prediction)


__all__ = ["DEFAULTS", "Diffusion", "DiffusionOptions", "FLOW_TIME_SCALE", "OBJECTIVES",
           "from_unit_range", "to_unit_range"]
