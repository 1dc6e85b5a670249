"""Test accuracy of trained digits runs with token merging / pruning switched on afterwards.

    python experiments/token_merging.py WORKDIR [WORKDIR ...] [--r 1,2,3] [--keep 0.7,0.5]

For each workdir (a finished `python -m vitjax.train` run) it reloads the config and
the last checkpoint and evaluates the 360 test digits with the model's token_merging
replaced by each setting: off; ToMe at each r with and without proportional attention,
and with the decreasing schedule; EViT at each keep rate (EViT's blocks); top-k by norm
at each r. Prints a Markdown table: setting, tokens out of the last block, forward
MMACs per image (vitjax.tools.model_table.count_macs) and top-1 per workdir.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

from vitjax import data
from vitjax.convert.workdir_checkpoints import load_params_and_step
from vitjax.evaluate import evaluate_classification
from vitjax.tools.model_table import count_macs
from vitjax.train.tasks.base import build_model


def settings(rs, keep_rates):
  """(label, token_merging dict) pairs, the plain model first."""
  rows = [("off", dict(r=0))]
  rows += [(f"ToMe r={r}", dict(method="tome", r=r)) for r in rs]
  rows += [(f"ToMe r={r}, no proportional attention",
            dict(method="tome", r=r, proportional_attention=False)) for r in rs]
  rows += [(f"ToMe r={r}, decreasing", dict(method="tome", r=r, schedule="decreasing"))
           for r in rs]
  rows += [(f"EViT keep {k}", dict(method="evit", keep_rate=k)) for k in keep_rates]
  rows += [(f"top-k r={r}", dict(method="topk", r=r)) for r in rs]
  return rows


def build(config, spec):
  config = ml_collections.ConfigDict(config)
  with config.unlocked():
    config.model.token_merging = spec
  return build_model(config)


def figures(model, params, image_size):
  """(tokens out of the last block, forward MMACs per image) of `model`."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  forward = lambda p, x: model.apply({"params": p}, x)
  _, out = jax.eval_shape(forward, params, images)
  return out["encoded"].shape[1], count_macs(forward, params, images) / 1e6


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--r", default="1,2,3", help="ToMe / top-k r values")
  parser.add_argument("--keep", default="0.7,0.5", help="EViT keep rates")
  args = parser.parse_args(argv)
  rs = [int(r) for r in args.r.split(",")]
  keep_rates = [float(k) for k in args.keep.split(",")]
  runs = []
  for workdir in args.workdirs:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    _, params = load_params_and_step(workdir)
    runs.append((os.path.basename(os.path.normpath(workdir)), config, params))
  config = runs[0][1]
  dataset = data.get_dataset(ml_collections.ConfigDict(config))
  batch_size = config.get("eval_batch_size") or config["batch_size"]
  print("| setting | tokens out | MMACs/image | " + " | ".join(name for name, _, _ in runs) + " |")
  print("|---|---:|---:|" + "---:|" * len(runs))
  for label, spec in settings(rs, keep_rates):
    cells, tokens, macs = [], None, None
    for _, run_config, params in runs:
      model = build(run_config, spec)
      if tokens is None:
        tokens, macs = figures(model, params, run_config["input"]["image_size"])
      top1 = evaluate_classification(model, params, dataset.eval_iter(batch_size))["top1"]
      cells.append(f"{100 * top1:.1f}%")
    print(f"| {label} | {tokens} | {macs:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
