"""Post-training quantization of a trained model: accuracy, size and speed against float.

    python -m vitjax.tools.quantize WORKDIR --scheme w8,w8a8,w4a4 [--vit_quantizers both]
        [--calibration_batches 4] [--calibration_batch_size 32] [--log2_base 2|sqrt2]
        [--float_modules REGEX] [--out FILE.npz] [--time [--batch 64 --steps 20]]
    python -m vitjax.tools.quantize --model vit_small_patch16_224 --scheme w8,w8a8 --time \\
        [--batch 8] [--steps 20]     # speed only: random weights and images

From a training workdir (its config.json and latest checkpoint, as vitjax.tools.soup
reads them) it quantizes the model with each scheme (vitjax.quantize.SCHEMES), calibrating
the activation scales on the first `--calibration_batches` batches of the training split
(with the evaluation preprocessing), and prints a table: the float model and each
quantized one, their top-1 / top-5 on the config's eval_split through the
'classification' evaluator, and their size in bytes. `--vit_quantizers on` adds RepQ-ViT
and the log2 attention quantizer to the schemes with activations, `both` prints each such
scheme without and with them. `--out` writes the quantized parameters (one scheme) in
vitjax.quantize's .npz format.

`--time` times the jitted forward pass of the float and quantized models on one batch of
`--batch` images, in one process, their steps alternating, and adds the median images/s
and the speed relative to float. With `--model NAME` instead of a workdir only the speed
is measured (random weights; random images calibrate).

Exit status: 0 done; 2 bad input (an unknown scheme, a workdir without a config or a
checkpoint, --out in a missing directory or for several schemes, --calibration_batches
below 1), one line on stderr, nothing written.
"""

import argparse
import os
import statistics
import sys
import time


class QuantizeError(ValueError):
  """Arguments or a workdir that cannot be used; exit 2."""


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m vitjax.tools.quantize", description=__doc__.splitlines()[0])
  parser.add_argument("workdir", nargs="?", help="a vitjax training workdir")
  parser.add_argument("--model", help="a model name instead of a workdir: speed only")
  parser.add_argument("--scheme", required=True,
                      help="a scheme or a comma list: w8, w4, w8a8, w4a8, w4a4")
  parser.add_argument("--vit_quantizers", choices=("off", "on", "both"), default="off",
                      nargs="?", const="on", help="RepQ-ViT + log2 attention quantizer")
  parser.add_argument("--log2_base", choices=("2", "sqrt2"), default="2")
  parser.add_argument("--float_modules", help="regular expression of module paths kept float")
  parser.add_argument("--calibration_batches", type=int, default=4)
  parser.add_argument("--calibration_batch_size", type=int, default=32)
  parser.add_argument("--out", help="write the quantized parameters (one scheme), a .npz")
  parser.add_argument("--time", action="store_true", help="time float and quantized forward")
  parser.add_argument("--batch", type=int, help="images per timed step (default 64, or 8 "
                      "with --model)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return _run(args)
  except QuantizeError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


def _variants(args):
  """[(scheme, vit_quantizers)] to run, checked; QuantizeError on bad arguments."""
  from vitjax import quantize  # pylint: disable=g-import-not-at-top
  schemes = [s.strip().lower() for s in args.scheme.split(",") if s.strip()]
  for scheme in schemes or [args.scheme]:
    try:
      quantize.check_scheme(scheme)
    except ValueError as e:
      raise QuantizeError(f"--scheme: {e}") from None
  variants = []
  for scheme in schemes:
    with_activations = quantize.SCHEMES[scheme][1] is not None
    options = {"off": [False], "on": [True], "both": [False, True]}[args.vit_quantizers]
    variants += [(scheme, v) for v in (options if with_activations else [False])]
  if args.vit_quantizers != "off" and not any(v for _, v in variants):
    raise QuantizeError(f"--vit_quantizers quantize activations; {args.scheme} keeps them "
                        "in float: add a scheme with activations (w8a8, w4a8, w4a4).")
  return variants


def _check_arguments(args):
  if (args.workdir is None) == (args.model is None):
    raise QuantizeError("give a training workdir or --model NAME (speed only), not both.")
  if args.model is not None and not args.time:
    raise QuantizeError("--model has random weights: only --time measures anything there.")
  for flag in ("calibration_batches", "calibration_batch_size", "steps"):
    if getattr(args, flag) < 1:
      raise QuantizeError(f"--{flag} must be at least 1; got {getattr(args, flag)}.")
  if args.batch is not None and args.batch < 1:
    raise QuantizeError(f"--batch must be at least 1; got {args.batch}.")
  variants = _variants(args)
  if args.out is not None:
    if not args.out.endswith(".npz"):
      raise QuantizeError(f"--out {args.out}: the quantized parameters are a .npz; name it "
                          "'*.npz'.")
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
      raise QuantizeError(f"--out {args.out}: directory {directory} does not exist.")
    if len(variants) != 1:
      raise QuantizeError("--out writes one quantized model: give one scheme (and "
                          "--vit_quantizers on or off, not both).")
  return variants


def from_workdir(args):
  """(model, params, config, model_config) of a workdir's latest checkpoint."""
  from vitjax.tools import soup  # pylint: disable=g-import-not-at-top
  from vitjax.train import tasks  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(args.workdir):
    raise QuantizeError(f"{args.workdir}: no such workdir.")
  try:
    config = soup.read_config(args.workdir)
    _, params = soup.read_final_weights(args.workdir)
  except soup.SoupError as e:
    raise QuantizeError(str(e)) from None
  try:
    model = tasks.make_task(config).build_model()
  except (TypeError, ValueError) as e:
    raise QuantizeError(f"{args.workdir}: its config.model cannot be built: "
                        f"{str(e).splitlines()[0]}") from None
  model_config = config.model.to_dict() if hasattr(config.model, "to_dict") else None
  return model, params, config, model_config


def split_dataset(config, split):
  """The workdir config's dataset with `split` as its eval split."""
  from vitjax import data  # pylint: disable=g-import-not-at-top
  from vitjax.train import resume  # pylint: disable=g-import-not-at-top
  copy = resume.as_config(config.to_dict())
  copy.eval_split = split
  try:
    return data.get_dataset(copy)
  except (ValueError, data.DatasetNotPreparedError) as e:
    raise QuantizeError(f"split {split!r}: {str(e).splitlines()[0]}") from None


def calibration_images(config, args):
  """`args.calibration_batches` batches of the training split, eval preprocessing."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  dataset = split_dataset(config, config.get("train_split") or "train")
  batches = []
  for batch in dataset.eval_iter(args.calibration_batch_size, process_index=0,
                                 process_count=1):
    images = np.asarray(batch["image"])
    if "mask" in batch:  # The last batch is padded.
      images = images[np.asarray(batch["mask"], bool)]
    batches.append(images)
    if len(batches) == args.calibration_batches:
      break
  return batches


def time_forward(runners, steps, warmup):
  """{name: [seconds per step]} of zero-argument callables, their steps alternating."""
  import jax  # pylint: disable=g-import-not-at-top
  for run in runners.values():
    for _ in range(warmup):
      jax.block_until_ready(run())
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, run in runners.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - start)
  return times


def _run(args):
  variants = _check_arguments(args)
  import jax  # pylint: disable=g-import-not-at-top
  from vitjax import evaluate  # pylint: disable=g-import-not-at-top
  from vitjax import models  # pylint: disable=g-import-not-at-top
  from vitjax import quantize  # pylint: disable=g-import-not-at-top

  if args.workdir is not None:
    model, params, config, model_config = from_workdir(args)
    calibration = calibration_images(config, args)
    eval_data = split_dataset(config, config.get("eval_split") or "test")
    batch_size = config.get("eval_batch_size", config.get("batch_size", 256))
    name = args.workdir
  else:
    try:
      model = models.create_model(args.model)
    except (TypeError, ValueError) as e:
      raise QuantizeError(f"--model: {str(e).splitlines()[0]}") from None
    shape = models.dummy_input(model, args.calibration_batch_size).shape
    keys = jax.random.split(jax.random.key(0), args.calibration_batches + 1)
    calibration = [jax.random.normal(k, shape) for k in keys[1:]]
    params = models.init_params(model, keys[0])
    config, model_config, eval_data, name = None, {"name": args.model}, None, args.model

  rows = [("float", "", params, model)]
  for scheme, vit_quantizers in variants:
    try:
      qmodel, qparams = quantize.quantize(
          model, params, calibration, scheme=scheme, vit_quantizers=vit_quantizers,
          log2_base=args.log2_base, float_modules=args.float_modules, model_name=name)
    except ValueError as e:
      raise QuantizeError(f"{scheme}: {str(e).splitlines()[0]}") from None
    rows.append((scheme, "yes" if vit_quantizers else "no", qparams, qmodel))

  header = ["model", "vit quantizers", "bytes", "vs float"]
  table = []
  float_bytes = quantize.model_size_bytes(params)
  for scheme, vit, p, m in rows:
    size = quantize.model_size_bytes(p)
    table.append([scheme, vit, str(size), f"{size / float_bytes:.3f}"])
  if eval_data is not None:
    header += ["top1", "top5"]
    for line, (_, _, p, m) in zip(table, rows):
      metrics = evaluate.run_evaluator("classification", m, p, eval_data,
                                       batch_size=batch_size)
      line += [f"{metrics['top1']:.4f}", f"{metrics['top5']:.4f}"]
  if args.time:
    batch = args.batch or (64 if args.workdir is not None else 8)
    images = jax.random.normal(jax.random.key(1), (batch,) + calibration[0].shape[1:])
    steps = {}
    for i, (_, _, p, m) in enumerate(rows):
      forward = jax.jit(lambda p, x, m=m: m.apply({"params": p}, x)[0])
      steps[i] = lambda forward=forward, p=p: forward(p, images)
    times = time_forward(steps, args.steps, args.warmup)
    header += ["images/s", "speed vs float"]
    float_time = statistics.median(times[0])
    for i, line in enumerate(table):
      median = statistics.median(times[i])
      line += [f"{batch / median:.1f}", f"{float_time / median:.2f}x"]
    print(f"timed: jitted forward, batch {batch}, median of {args.steps} alternating steps "
          f"on {jax.devices()[0].device_kind} ({jax.default_backend()})")
  widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
  for line in [header] + table:
    print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(line, widths))))

  if args.out is not None:
    (scheme, vit_quantizers), qparams = variants[0], rows[1][2]
    quantize.save_quantized(args.out, qparams, scheme=scheme,
                            vit_quantizers=vit_quantizers, log2_base=args.log2_base,
                            float_modules=args.float_modules,
                            input_shape=calibration[0].shape, model_config=model_config)
    print(f"quantized: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
