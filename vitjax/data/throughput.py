r"""Input images/s of a config's training pipeline, on its own (no model, no trainer).

    python -m vitjax.data.throughput --config configs/quickstart.py
    python -m vitjax.data.throughput --config configs/imagenet.py --jpegs 768 \
        --batch_size 128 --steps 30 --compare timm

`--jpegs N` writes (once, under --jpeg_dir) an image folder of N random-content
JPEGs at ImageNet's typical 500x375 (and 375x500) in 100 classes and reads it as
`folder:PATH`, so ImageNet's decode + augmentation cost is measured without
ImageNet. Each pipeline kind runs with 1 and with N workers (N = the CPU count):

  vitjax threads     input.num_threads=k, input.num_workers=0 (one process)
  vitjax processes   input.num_workers=k grain worker processes, one thread each
  timm               (--compare timm) timm's create_transform with the same DeiT
                     recipe in a torch DataLoader with k workers, over the same
                     folder (vitjax/data/timm_reference.py; needs torch,
                     torchvision and timm installed)

and the table gives images/s and images/s per worker: multiplied out, the cores
a host needs to feed an accelerator. vitjax hands the device uint8 batches
(normalization, erasing and Mixup/CutMix run in the jitted step), timm's loader
normalized float tensors with erasing done (Mixup runs in its train loop); both
decode, crop, flip and RandAugment every image on the CPU. Any
`--config.key=value` overrides apply.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def write_jpeg_folder(root: str, count: int, num_classes: int = 100) -> str:
  """root/{train,val}/cNNN/*.jpg: random smooth-noise JPEGs of about 100 KB (once)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  done = os.path.join(root, ".complete")
  if os.path.exists(done):
    return root
  rng = np.random.default_rng(0)
  num_classes = min(num_classes, count)  # Every class in both splits.
  for split, split_count in (("train", count), ("val", 64)):
    for index in range(split_count):
      folder = os.path.join(root, split, f"c{index % num_classes:03d}")
      os.makedirs(folder, exist_ok=True)
      # Upsampled noise compresses about like a photograph (~100 KB at quality 90).
      coarse = rng.integers(0, 256, (48, 64, 3), np.uint8)
      image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
      if index % 4 == 3:
        image = image.transpose(Image.ROTATE_90)
      image.save(os.path.join(folder, f"{index:06d}.jpg"), quality=90)
  open(done, "w").close()
  return root


def measure(dataset, batch_size: int, steps: int, warmup: int = 1, seed: int = 0) -> dict:
  """Images/s of `steps` training batches after `warmup` batches (start-up excluded)."""
  iterator = dataset.train_iter(batch_size, seed=seed)
  try:
    for _ in range(warmup):
      next(iterator)  # Threads and processes start, files open, caches fill.
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    seconds = time.perf_counter() - start
  finally:
    iterator.close()
  return {"images_per_second": steps * batch_size / seconds,
          "seconds_per_batch": seconds / steps}


def _vitjax_rate(config, batch_size, steps, warmup, *, threads, processes):
  from vitjax import data  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.input.num_threads, config.input.num_workers = threads, processes
  return measure(data.get_dataset(config), batch_size, steps, warmup)["images_per_second"]


def compare(config, *, batch_size: int, steps: int, worker_counts, with_timm: bool) -> list:
  """Rows (kind, workers, images/s) of each pipeline kind at each worker count."""
  rows = []
  for workers in worker_counts:
    warmup = 2 * workers + 1  # Past every worker's first batch in both loaders.
    rows.append(("vitjax threads", workers, _vitjax_rate(
        config, batch_size, steps, warmup, threads=workers, processes=0)))
    rows.append(("vitjax processes", workers, _vitjax_rate(
        config, batch_size, steps, warmup, threads=1, processes=workers)))
    if with_timm:
      from vitjax.data import timm_reference  # pylint: disable=g-import-not-at-top
      rows.append(("timm DataLoader", workers, timm_reference.images_per_second(
          os.path.join(config.dataset[len("folder:"):], "train"),
          image_size=config.input.image_size, batch_size=batch_size, steps=steps,
          warmup=warmup, num_workers=workers, mean=config.input.mean,
          std=config.input.std, interpolation=config.input.interpolation)))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch_size", type=int, default=None,
                      help="default: the config's batch_size")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--jpegs", type=int, default=0)
  parser.add_argument("--jpeg_dir", default=None,
                      help="default: a folder per --jpegs count in the temp directory")
  parser.add_argument("--compare", choices=("timm",), default=None,
                      help="also measure timm's pipeline (and each worker count)")
  parser.add_argument("--workers", default=None,
                      help="worker counts to compare, e.g. '1,2' (default: 1 and the CPU count)")
  args, overrides = parser.parse_known_args(argv)

  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vitjax import data  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(args.config)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  config_lib.apply_overrides(config, [o[len("--config."):] for o in overrides])
  batch_size = args.batch_size or config.batch_size

  if args.jpegs:
    root = args.jpeg_dir or os.path.join(tempfile.gettempdir(),
                                         f"vitjax_throughput_{args.jpegs}")
    config.dataset = "folder:" + write_jpeg_folder(root, args.jpegs)
    config.train_split, config.eval_split = "train", "val"
  cpus = os.cpu_count() or 1
  if args.compare or args.workers:
    if not config.dataset.startswith("folder:") and args.compare:
      parser.error("--compare timm reads an image folder: give --jpegs N or "
                   "--config.dataset=folder:PATH")
    counts = (sorted({int(w) for w in args.workers.split(",")}) if args.workers
              else sorted({1, cpus}))
    rows = compare(config, batch_size=batch_size, steps=args.steps, worker_counts=counts,
                   with_timm=args.compare == "timm")
    print(f"{config.dataset}: batch {batch_size}, {args.steps} batches, {cpus} CPUs")
    print(f"{'pipeline':18} {'workers':>7} {'images/s':>9} {'per worker':>10}")
    for kind, workers, rate in rows:
      print(f"{kind:18} {workers:7d} {rate:9.0f} {rate / workers:10.0f}")
    return rows
  dataset = data.get_dataset(config)
  result = measure(dataset, batch_size, args.steps)
  print(f"{config.dataset}: {dataset.image_shape} batch {batch_size}, "
        f"{args.steps} batches, {cpus} CPUs: "
        f"{result['images_per_second']:,.0f} images/s "
        f"({1000 * result['seconds_per_batch']:.1f} ms per batch)")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
