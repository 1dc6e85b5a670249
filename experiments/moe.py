"""The digits table of experiments/moe.md from the runs of experiments/moe.sh.

    python experiments/moe.py WORKDIR_ROOT

For each setting (dense, V-MoE top-1, V-MoE top-2, Soft MoE; runs named
SETTING_seedN): test top-1 of the last evaluation, mean and standard deviation over
the seeds, each seed's figure, forward MMACs per image and total and active parameters
(vitjax.tools.benchmark.cost_figures of the model in the run's config.json), the
fraction of token-expert assignments dropped for capacity at the last logged step, and
the training time. Then the expert-parallel run (and the dense ViT data parallel on as
many devices) beside the single-device run of the same seed: both accuracies, and the
differences between their logged losses.
"""

import glob
import json
import os
import re
import sys

import ml_collections
import numpy as np

from vitjax.tools import benchmark
from vitjax.train.tasks.base import build_model

SETTINGS = (("dense", "dense ViT (mu/4)"), ("vmoe_top1", "V-MoE top-1, C=1.0"),
            ("vmoe_top2", "V-MoE top-2, C=0.5, BPR"), ("soft_moe", "Soft MoE, 8x2 slots"))


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def last(rows_, key):
  values = [row[key] for row in rows_ if key in row]
  return values[-1] if values else None


def figures(workdir):
  """(MMACs per image, total params, active params) of the run's model."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  size = config.input.image_size
  costs = benchmark.cost_figures(build_model(config), (size, size, 3), batch=1)
  return 1e3 * costs["gmacs"], costs["params"], costs["active_params"]


def seconds(workdir):
  path = workdir.rstrip("/") + ".seconds"
  return int(open(path).read()) if os.path.exists(path) else None


def main(argv=None):
  root = (argv or sys.argv[1:])[0]
  print("| setting | test top-1 (4 seeds) | seeds | MMACs/image | params | active params "
        "| dropped | train time |")
  print("|---|---:|---|---:|---:|---:|---:|---:|")
  for key, label in SETTINGS:
    workdirs = sorted((w for w in glob.glob(os.path.join(root, f"{key}_seed[0-9]"))
                       if seconds(w) is not None),  # Finished runs only.
                      key=lambda w: int(re.search(r"seed(\d+)$", w).group(1)))
    if not workdirs:
      continue
    top1 = [100 * last(rows(w), "eval/top1") for w in workdirs]
    dropped = [last(rows(w), "train/aux/moe_dropped") for w in workdirs]
    macs, total, active = figures(workdirs[0])
    drop_text = f"{100 * np.mean(dropped):.1f}%" if None not in dropped else "-"
    print(f"| {label} | {np.mean(top1):.1f}% ± {np.std(top1):.1f} | "
          f"{', '.join(f'{t:.1f}' for t in top1)} | {macs:.2f} | {total:,} | {active:,} | "
          f"{drop_text} | {np.mean([seconds(w) for w in workdirs]):.0f} s |")
  pairs = (("V-MoE top-1", "vmoe_top1_seed0", "vmoe_top1_expert4_seed0", "mesh expert=4"),
           ("dense ViT", "dense_seed0", "dense_data4_seed0", "mesh data=4"))
  print()
  print("| seed 0 | devices | test top-1 | final train loss | loss difference at step 50 "
        "| largest loss difference |")
  print("|---|---|---:|---:|---:|---:|")
  for label, single, parallel, mesh in pairs:
    if any(seconds(os.path.join(root, name)) is None for name in (single, parallel)):
      continue  # Not run, or not finished.
    a, b = rows(os.path.join(root, single)), rows(os.path.join(root, parallel))
    losses = lambda r: {row["step"]: row["train/loss"] for row in r if "train/loss" in row}
    la, lb = losses(a), losses(b)
    differences = {step: abs(la[step] - lb[step]) for step in la if step in lb}
    for name, r in (("1", a), (f"4, {mesh}", b)):
      print(f"| {label} | {name} | {100 * last(r, 'eval/top1'):.1f}% | "
            f"{last(r, 'train/loss'):.4f} | {differences.get(50, float('nan')):.1g} | "
            f"{max(differences.values()):.2g} |")


if __name__ == "__main__":
  sys.exit(main())
