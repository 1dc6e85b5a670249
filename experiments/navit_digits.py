"""Test accuracy of trained digits runs at several test resolutions (experiments/flexi_navit.md).

    python experiments/navit_digits.py WORKDIR [WORKDIR ...] [--sizes 8,12,16,20,24]

For each workdir (a finished `python -m vitjax.train` run) it reloads the config and
the last checkpoint and evaluates the 360 test digits resized to each size: a NaViT
(config.input.packing) packs them at that size (packing.eval_size), a ViT takes
them at that size with its position embeddings resized. Prints a Markdown table.
"""

import argparse
import json
import os
import sys

import ml_collections

from vitjax import data
from vitjax.convert.workdir_checkpoints import load_params_and_step
from vitjax.evaluate import evaluate_classification
from vitjax.train.tasks.base import build_model


def accuracy_at(config, params, size):
  config = ml_collections.ConfigDict(config)
  if config.input.get("packing"):
    config.input.packing.eval_size = size
  else:
    config.input.image_size = size
    config.input.random_crop_padding = size // 8
    config.model.image_size = config.model.get("image_size", size)  # Posemb's own grid.
  dataset = data.get_dataset(config)
  model = build_model(config)
  batch_size = config.get("eval_batch_size", config.batch_size)
  return evaluate_classification(model, params, dataset.eval_iter(batch_size))["top1"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--sizes", default="8,12,16,20,24")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]
  print("| run | " + " | ".join(f"{s} px" for s in sizes) + " |")
  print("|---|" + "---:|" * len(sizes))
  for workdir in args.workdirs:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    _, params = load_params_and_step(workdir)
    cells = [f"{100 * accuracy_at(config, params, size):.1f}%" for size in sizes]
    print(f"| {os.path.basename(os.path.normpath(workdir))} | " + " | ".join(cells) + " |",
          flush=True)


if __name__ == "__main__":
  sys.exit(main())
