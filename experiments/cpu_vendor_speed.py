"""ViT-S/16 on this CPU against transformers' PyTorch ViT: the rows of BENCHMARKS.md's
"CPU speed by vendor" table.

    python experiments/cpu_vendor_speed.py [--runs 3] [--out DIR] [--variants shipped,xla_defaults]

Runs `python -m vitjax.tools.benchmark --model vit_small_patch16_224 --batch 8 --mode MODE
--steps S --warmup 2 --compare transformers [VARIANT FLAGS]` `--runs` times for each mode
(train: 10 steps, infer: 8) and each variant, in separate processes, variants interleaved
(run 1 of each, then run 2 of each, ...) so that a drift in the machine's speed hits them
alike. Each run is the same-process, step-by-step alternating comparison of the benchmark
tool; this script reports, per mode and variant, every run's vitjax / PyTorch ratio, their
median, and the median images/s of both sides, with `lscpu`'s model name. Variants:
'shipped' (vitjax's CPU compile options), 'xla_defaults' (XLA's own), or one KEY=VALUE
(`--xla_options` on top of the shipped ones). The JSON of every run is kept under `--out`
(default: a new temporary folder). Run it on an idle machine (the benchmark warns when
other processes took CPU time while it timed).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

STEPS = {"train": 10, "infer": 8}


def variant_flags(variant):
  if variant == "shipped":
    return []
  if variant == "xla_defaults":
    return ["--xla_defaults"]
  return ["--xla_options", variant]


def run_once(mode, variant, path):
  command = [sys.executable, "-m", "vitjax.tools.benchmark", "--model",
             "vit_small_patch16_224", "--batch", "8", "--mode", mode, "--steps",
             str(STEPS[mode]), "--warmup", "2", "--compare", "transformers",
             *variant_flags(variant), "--json", str(path)]
  done = subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
  if done.returncode:  # The benchmark has said why on stderr.
    raise SystemExit(f"error: the benchmark exited with status {done.returncode} "
                     f"(variant {variant!r}, mode {mode})")
  return json.loads(path.read_text(encoding="utf-8"))


def table(results):
  """Markdown rows: one per (mode, variant), from {(mode, variant): [result, ...]}."""
  first = next(iter(results.values()))[0]
  rows = [
      f"CPU (lscpu model name): {first['cpu_model']}, {first['cpu_threads']} threads; "
      + ", ".join(f"{k} {v}" for k, v in first["versions"].items()) + f"; {first['date']}.",
      "",
      "| CPU | mode | variant | runs: vitjax / PyTorch | median | vitjax img/s | "
      "PyTorch img/s | background CPU |",
      "|---|---|---|---|---:|---:|---:|---:|",
  ]
  for (mode, variant), runs in results.items():
    ratios = [r["ratio"] for r in runs]
    background = max((r["background_cpu"] or 0.0) for r in runs)
    rows.append(
        f"| {first['cpu_model']} | {mode} | {variant} | "
        + ", ".join(f"{x:.2f}x" for x in ratios)
        + f" | **{statistics.median(ratios):.2f}x** | "
        f"{statistics.median(r['images_per_s'] for r in runs):.2f} | "
        f"{statistics.median(r['torch']['images_per_s'] for r in runs):.2f} | "
        f"{100 * background:.0f}% |")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--modes", default="train,infer")
  parser.add_argument("--variants", default="shipped,xla_defaults",
                      help="comma-separated: shipped, xla_defaults, or one KEY=VALUE (an "
                      "--xla_options value)")
  parser.add_argument("--out", help="folder for each run's JSON (default: a new temporary "
                      "folder, printed)")
  args = parser.parse_args(argv)
  if args.runs < 1:
    parser.error("--runs must be at least 1")
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="cpu_vendor_speed_"))
  out.mkdir(parents=True, exist_ok=True)
  print(f"each run's JSON goes to {out}", flush=True)
  modes, variants = args.modes.split(","), args.variants.split(",")
  results = {(mode, variant): [] for mode in modes for variant in variants}
  for i in range(args.runs):
    for mode in modes:
      for j, variant in enumerate(variants):
        result = run_once(mode, variant, out / f"{mode}_{j}_{i}.json")
        results[mode, variant].append(result)
        print(f"run {i + 1}/{args.runs} {mode} {variant}: {result['ratio']:.3f}x "
              f"({result['images_per_s']:.2f} vs {result['torch']['images_per_s']:.2f} img/s)",
              flush=True)
  print("\n".join(table(results)))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  sys.exit(main())
