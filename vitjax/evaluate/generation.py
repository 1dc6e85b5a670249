"""Samples of a diffusion model, scored: Fréchet distance, conditioning precision, a grid.

    generation(model, params, dataset, batch_size=250, sampler='ddim', num_steps=50,
               guidance_scale=4.0, feature_model='workdirs/quickstart',
               png_path='samples.png')

The diffusion task (vitjax.train.tasks.diffusion) passes its settings (`diffusion`,
`input_mean`, `input_std`); the rest are config.evaluators.generation's. One sample
is drawn per evaluation image, with that image's label for a class-conditional
model, so generated and real sets have the same size and class balance. Noise is
fixed by `seed`: every evaluation of a run starts from the same noise.

With `feature_model` (a vitjax training workdir, e.g. the quickstart's classifier,
or a `(model, params)` pair) the metrics are
    fd                    Fréchet distance of its `feature_key` features, samples vs
                          the evaluation images (FID with Inception features,
                          FD-DINOv2 with DINOv2's: vitjax.evaluate.frechet)
    conditional_accuracy  the fraction of samples it classifies as their label
Without one, `fd_pixels`: the Fréchet distance of the raw pixels (small images only).
Always `sample_seconds` (wall time of the sampling, compilation included).
`png_path`: a grid of the first samples, one row per class when conditional.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import diffusion as diffusion_lib
from vitjax import models
from vitjax.evaluate import frechet
from vitjax.evaluate import images as images_lib

_FEATURE_MODELS = {}  # workdir path -> (model, params, Preprocess options): read once.


def _sampling_settings(diffusion, sampler, num_steps, eta):
  """(objective, hashable sampling settings) from the task's settings and the options."""
  diffusion = dict(diffusion or {})
  objective = diffusion.get("objective", "ddpm")
  if objective == "flow":
    sampler = sampler or "heun"
    if sampler not in ("euler", "heun"):
      raise ValueError(f"generation: sampler={sampler!r} does not sample a flow model; use "
                       "'euler' or 'heun'.")
    return objective, (("sampler", sampler), ("num_steps", num_steps))
  sampler = sampler or "ddim"
  if sampler not in ("ddpm", "ddim"):
    raise ValueError(f"generation: sampler={sampler!r} does not sample a DDPM model; use "
                     "'ddpm' or 'ddim'.")
  return objective, (("sampler", sampler), ("num_steps", num_steps),
                     ("schedule", (diffusion.get("schedule", "linear"),
                                   diffusion.get("num_timesteps", 1000))),
                     ("prediction_type", diffusion.get("prediction", "epsilon")),
                     ("eta", float(eta)))


@functools.lru_cache(maxsize=8)
def _sampler(model, shape, objective, settings, guidance_scale, conditional):
  """A jitted (params, rng, labels) -> samples, cached per model, shape and settings."""
  settings = dict(settings)
  extra = {}
  if objective == "ddpm":
    settings["schedule"] = diffusion_lib.make_schedule(*settings["schedule"])
    extra["variance_type"] = "learned_range" if model.learn_sigma else "fixed_small"
  time_scale = 1000.0 if objective == "flow" else 1.0

  def generate(params, rng, labels):
    def denoise(x_t, t, y):
      return model.apply({"params": params}, x_t, t * time_scale, y)[0]
    return diffusion_lib.sample(
        denoise, shape, rng, guidance_scale=guidance_scale if conditional else 1.0,
        labels=labels, null_label=model.null_class if conditional else None,
        **settings, **extra)
  return jax.jit(generate)


def generate_samples(model, params, labels, *, num_samples, batch_size, sampler=None,
                     num_steps=50, guidance_scale=1.0, eta=0.0, seed=0, diffusion=None):
  """(num_samples, H, W, C) float32 model-space samples (pixels in [-1, 1], or latents).

  `labels` (num_samples,) ints for a class-conditional model, else None. Batch i's noise
  comes from fold_in(PRNGKey(seed), i): the same samples whatever the weights' history.
  """
  objective, settings = _sampling_settings(diffusion, sampler, num_steps, eta)
  shape = (batch_size, model.image_size, model.image_size, model.in_channels)
  generate = _sampler(model, shape, objective, settings, float(guidance_scale),
                      labels is not None)
  rng = jax.random.PRNGKey(seed)
  samples = []
  for index, start in enumerate(range(0, num_samples, batch_size)):
    batch_labels = None
    if labels is not None:
      batch_labels = np.resize(np.asarray(labels[start:start + batch_size]), batch_size)
      batch_labels = jnp.asarray(batch_labels, jnp.int32)
    x = generate(params, jax.random.fold_in(rng, index), batch_labels)
    samples.append(np.asarray(jax.device_get(x))[:num_samples - start])
  return np.concatenate(samples)


def load_feature_model(workdir):
  """(model, params, input mean, input std) of a vitjax training workdir: the model its
  config.json names, with the parameters of its latest readable checkpoint."""
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if workdir not in _FEATURE_MODELS:
    # Imported here: orbax is needed for workdirs alone.
    from vitjax.convert import workdir_checkpoints  # pylint: disable=import-outside-toplevel
    try:
      with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"generation: feature_model={workdir!r} has no readable config.json "
                       f"({e}); give a vitjax training workdir, e.g. workdirs/quickstart."
                       ) from None
    options = dict(config["model"])
    for key in ("dtype", "param_dtype"):
      if isinstance(options.get(key), str):
        options[key] = jnp.dtype(options[key])
    model = models.create_model(options.pop("name"), **options)
    _, params = workdir_checkpoints.load_params_and_step(workdir)
    _FEATURE_MODELS[workdir] = (model, jax.tree.map(jnp.asarray, params),
                                tuple(config["input"]["mean"]), tuple(config["input"]["std"]))
  return _FEATURE_MODELS[workdir]


def generation(model, params, dataset, *, batch_size, batch_sharding=None, diffusion=None,
               input_mean=(0.5,), input_std=(0.5,), sampler=None, num_steps=50,
               guidance_scale=1.0, eta=0.0, seed=0, num_samples=None, feature_model=None,
               feature_key="pre_logits", png_path=None, grid_columns=8):
  """{metric: float} of samples from `model` against the evaluation split (module docstring).

  Args:
    model, params: a DiT / U-ViT and its parameters (the EMA's, under `eval_ema/`).
    dataset: a `vitjax.data.Dataset`; its evaluation split is the reference.
    batch_size: samples per jitted sampling call (and feature batch).
    batch_sharding: unused (samples are drawn on this host's devices).
    diffusion, input_mean, input_std: the task's settings (`sampling_options`).
    sampler: 'ddpm' or 'ddim' (default) for DDPM models, 'euler' or 'heun' (default)
      for flow models.
    num_steps: sampling steps.
    guidance_scale: classifier-free guidance (1: none; conditional models only).
    eta: DDIM's noise.
    seed: the samples' noise.
    num_samples: at most this many (default: as many as evaluation images).
    feature_model: a training workdir or a (model, params) pair for `fd` and
      `conditional_accuracy`.
    feature_key: the feature model's `out` entry for the Fréchet distance.
    png_path: where to write a grid of samples (None: none).
    grid_columns: samples per row of the grid.
  """
  del batch_sharding
  real, labels = [], []
  for batch in dataset.eval_iter(batch_size, process_index=0, process_count=1):
    keep = np.asarray(batch["mask"]).astype(bool)
    real.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  real, labels = np.concatenate(real), np.concatenate(labels)
  if num_samples is not None:
    real, labels = real[:num_samples], labels[:num_samples]
  conditional = bool(getattr(model, "num_classes", 0))
  start = time.perf_counter()
  samples = generate_samples(
      model, params, labels if conditional else None, num_samples=len(real),
      batch_size=batch_size, sampler=sampler, num_steps=num_steps,
      guidance_scale=guidance_scale, eta=eta, seed=seed, diffusion=diffusion)
  samples = _decoded(samples, diffusion)
  seconds = time.perf_counter() - start
  # Real images as the pipeline normalised them -> [-1, 1], as the samples are.
  mean, std = (np.resize(np.asarray(v, np.float32), real.shape[-1]) for v in (input_mean,
                                                                              input_std))
  real = (real * std + mean) * 2.0 - 1.0
  if png_path:
    save_grid(png_path, samples, labels if conditional else None, grid_columns)
  if feature_model is None:
    return {"fd_pixels": frechet.frechet_distance(
        *frechet.feature_statistics(samples.reshape(len(samples), -1)),
        *frechet.feature_statistics(real.reshape(len(real), -1))), "sample_seconds": seconds}
  if isinstance(feature_model, (tuple, list)):
    feature, feature_params = feature_model
    preprocess = frechet.Preprocess((0.5,), (0.5,))
  else:
    feature, feature_params, mean, std = load_feature_model(feature_model)
    preprocess = frechet.Preprocess(mean, std)  # From [-1, 1] to the classifier's input.
  options = dict(batch_size=batch_size, preprocess=preprocess)
  metrics = {}
  metrics["fd"] = frechet.frechet_distance(
      *frechet.statistics_of(feature, feature_params, samples, feature_key=feature_key,
                             **options),
      *frechet.statistics_of(feature, feature_params, real, feature_key=feature_key,
                             **options))
  if conditional:
    metrics["conditional_accuracy"] = frechet.conditional_accuracy(
        feature, feature_params, samples, labels, **options)
  metrics["sample_seconds"] = seconds
  return metrics


def _decoded(samples, diffusion):
  """Latent samples through the VAE's decoder (config.diffusion.vae), pixels as they are."""
  path = (diffusion or {}).get("vae")
  if not path:
    return np.clip(samples, -1.0, 1.0)
  from vitjax.convert import vae as vae_convert  # pylint: disable=import-outside-toplevel
  module, params = vae_convert.load_diffusers_vae(path)
  decode = jax.jit(lambda p, z: module.apply({"params": p}, module.unscale(z),
                                             method=module.decode))
  return np.clip(np.asarray(decode(params, samples)), -1.0, 1.0)


def save_grid(path, samples, labels, columns):
  """The first `columns` samples of each class, a row per class (or the first samples)."""
  if labels is None:
    chosen = samples[:columns * columns]
  else:
    rows = [samples[labels == c][:columns] for c in np.unique(labels)]
    chosen = np.concatenate([r for r in rows if len(r) == columns] or [samples[:columns]])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images_lib.save_image_grid(path, chosen, columns, value_range=(-1.0, 1.0))


__all__ = ["generate_samples", "generation", "load_feature_model", "save_grid"]
