r"""Samples of a trained digits DiT, scored by the quickstart classifier, over sampling settings.

    python experiments/diffusion.py --workdir workdirs/dit_digits_ddpm \
        --classifier workdirs/quickstart --sampler ddim --steps 10,25,50 --guidance 1,2,4

For each sampler setting, one sample per test digit (360, the test split's labels) from
the run's EMA weights: the Fréchet distance of the classifier's pre-logits features
against the 360 test images (`fd`), and the fraction the classifier labels as the
digit asked for (`acc`). The first row is the floor: the training images against the
test images (what FD two real samples of the digits have). Prints a Markdown table;
`--grids DIR` writes a grid (a row per digit, 8 samples each) for each setting.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from vitjax import data  # pylint: disable=g-import-not-at-top
from vitjax.convert import workdir_checkpoints
from vitjax.evaluate import frechet, generation
from vitjax.train.tasks import base


def _images(batches):
  """(images, labels) of one pass over a split, padding dropped."""
  images, labels = [], []
  for batch in batches:
    keep = np.asarray(batch["mask"]).astype(bool)
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(images), np.concatenate(labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--classifier", default="workdirs/quickstart")
  parser.add_argument("--sampler", default=None, help="ddpm/ddim (DDPM runs), euler/heun (flow)")
  parser.add_argument("--steps", default="50")
  parser.add_argument("--guidance", default="1,2,4")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--grids", default=None, help="a directory for the sample grids")
  parser.add_argument("--raw", action="store_true", help="the raw weights, not the EMA")
  args = parser.parse_args()

  with open(os.path.join(args.workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = base.build_model(config)
  step, params = workdir_checkpoints.load_params_and_step(args.workdir, ema=not args.raw)
  params = jax.tree.map(jnp.asarray, params)
  dataset = data.get_dataset(config)
  classifier, classifier_params, mean, std = generation.load_feature_model(args.classifier)
  preprocess = frechet.Preprocess(mean, std)
  options = dict(batch_size=360, preprocess=preprocess)

  train, _ = _images(dataset.eval_iter(360, split="train"))
  test, labels = _images(dataset.eval_iter(360))
  test_stats = frechet.statistics_of(classifier, classifier_params, test, **options)
  print(f"{args.workdir} (step {step}, {'raw' if args.raw else 'EMA'} weights), "
        f"classifier {args.classifier}\n")
  print("| sampler | steps | guidance | FD | classifier accuracy | seconds |")
  print("|---|---:|---:|---:|---:|---:|")
  floor = frechet.frechet_distance(
      *frechet.statistics_of(classifier, classifier_params, train, **options), *test_stats)
  accuracy = frechet.conditional_accuracy(classifier, classifier_params, test, labels,
                                          **options)
  print(f"| real training images | - | - | {floor:.2f} | {accuracy:.3f} (test images) | - |")
  diffusion = dict(config.diffusion)
  for steps in [int(s) for s in args.steps.split(",")]:
    for scale in [float(g) for g in args.guidance.split(",")]:
      start = time.perf_counter()
      samples = generation.generate_samples(
          model, params, labels, num_samples=len(labels), batch_size=360,
          sampler=args.sampler, num_steps=steps, guidance_scale=scale, seed=args.seed,
          diffusion=diffusion)
      seconds = time.perf_counter() - start
      samples = np.clip(samples, -1, 1)
      fd = frechet.frechet_distance(
          *frechet.statistics_of(classifier, classifier_params, samples, **options),
          *test_stats)
      accuracy = frechet.conditional_accuracy(classifier, classifier_params, samples, labels,
                                              **options)
      sampler = args.sampler or ("heun" if diffusion["objective"] == "flow" else "ddim")
      print(f"| {sampler} | {steps} | {scale:g} | {fd:.2f} | {accuracy:.3f} | {seconds:.1f} |",
            flush=True)
      if args.grids:
        os.makedirs(args.grids, exist_ok=True)
        name = f"{os.path.basename(args.workdir.rstrip('/'))}_{sampler}{steps}_cfg{scale:g}.png"
        generation.save_grid(os.path.join(args.grids, name), samples, labels, 8)


if __name__ == "__main__":
  main()
