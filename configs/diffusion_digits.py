r"""A class-conditional DiT on the 8x8 digits, in pixel space, on a CPU.

    python -m vitjax.train --config configs/diffusion_digits.py --workdir workdirs/dit_digits

Trains a small DiT (width 128, depth 4, 4 heads, patch 2: 16 tokens; about 1.2M
parameters) to denoise the 1,437 training digits (one channel, [-1, 1]) with DDPM's
linear schedule, Improved DDPM's learned variance and classifier-free guidance's
label dropout, keeping an EMA of the weights. Every `eval_every` steps it samples one
digit per test image (DDIM, 50 steps) from the EMA and the raw weights and logs
`fd_pixels`, or with `feature_model=workdirs/quickstart` the Fréchet distance of the
quickstart classifier's features (`fd`) and how often it classifies a sample as its
label (`conditional_accuracy`), and writes a grid of samples, a row per digit.
Results: experiments/diffusion.md.

Arguments after the colon, e.g.
`configs/diffusion_digits.py:objective=flow,steps=2000,feature_model=workdirs/quickstart`:
    objective       'ddpm' (default) or 'flow' (rectified flow; Heun sampling)
    prediction      'epsilon' (default) or 'v' (ddpm)
    schedule        'linear' (default) or 'cosine' (ddpm)
    learn_sigma     Improved DDPM's learned variance (ddpm; default True)
    sampler, sample_steps, guidance_scale   the evaluation's sampling (default: ddim for
                    ddpm, heun for flow; 50 steps; guidance 2.0)
    feature_model   a classifier's training workdir for fd and conditional_accuracy
"""

import os

import ml_collections

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=4000, image_size=8, width=128, depth=4, num_heads=4,
                             patch_size=2, objective="ddpm", prediction="epsilon",
                             schedule="linear", learn_sigma=True, sampler="",
                             sample_steps=50, guidance_scale=2.0, feature_model="",
                             ema_decay=0.999, seed=0)
  config = config_lib.load_config(f"{QUICKSTART}:image_size={arg.image_size},steps={arg.steps}")
  with config.unlocked():
    config.seed = arg.seed
    config.input.update(channels=1, random_crop_padding=0, mean=(0.5,), std=(0.5,))
    config.model = ml_collections.ConfigDict(dict(
        name="dit",
        image_size=arg.image_size,
        in_channels=1,
        patch_size=arg.patch_size,
        width=arg.width,
        depth=arg.depth,
        num_heads=arg.num_heads,
        num_classes=10,
        class_dropout_prob=0.1,
        learn_sigma=arg.learn_sigma and arg.objective == "ddpm",
        attention_impl=None,
        dtype="float32",
    ))
    config.task = "diffusion"
    config.diffusion = dict(objective=arg.objective, schedule=arg.schedule, num_timesteps=1000,
                            prediction=arg.prediction, flow_times="uniform", vae=None)
    generation = dict(sampler=arg.sampler or None, num_steps=arg.sample_steps,
                      guidance_scale=arg.guidance_scale,
                      png_path="{workdir}/samples_{weights}_{step}.png")
    if arg.feature_model:
      generation["feature_model"] = arg.feature_model
    config.evaluators = dict(generation=generation)
  config.label_smoothing = 0.0
  config.ema.decay = arg.ema_decay
  config.optimizer.update(learning_rate=1e-3, weight_decay=0.0, warmup_steps=200,
                          grad_clip_norm=1.0)
  config.log_every = 200
  config.eval_every = arg.steps
  config.checkpoint_every = arg.steps
  config.keep_checkpoints = 1
  return config
