"""Command line: python -m vitjax.train --config configs/X.py[:args] --workdir DIR [--config.key=value ...]

Exit status: 0 done; 1 training failed (the loss diverged, a checkpoint could not be
written, none could be read); 2 bad input (unknown config key or model, a config that
does not load, a workdir whose checkpoint was written with another dataset, batch size
or seed), with nothing written.
"""

import argparse
import os
import sys

USAGE = ("python -m vitjax.train --config configs/FILE.py[:key=value,...] --workdir DIR "
         "[--config.KEY=VALUE ...]")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m vitjax.train", usage=USAGE,
                                   description="Train a vitjax model from a config file.")
  parser.add_argument("--config", required=True, help="configs/FILE.py[:key=value,...]")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  i = 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r}; overrides look like --config.KEY=VALUE")
    item = item[len("--config."):]
    if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
      item, i = f"{item}={rest[i + 1]}", i + 1
    overrides.append(item)
    i += 1
  return args, overrides


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  # Imported after argument parsing so that `--help` answers at once.
  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vitjax import models  # pylint: disable=g-import-not-at-top
  from vitjax.train import trainer  # pylint: disable=g-import-not-at-top

  try:
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    trainer.build_model(config)  # Fails on an unknown model before the workdir exists.
  except (config_lib.ConfigError, models.UnknownModelError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from vitjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  from vitjax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(config.get("distributed"))
  try:
    result = trainer.train(config, args.workdir, progress=not args.no_progress)
  except checkpoints.DataStateMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (trainer.TrainingDivergedError, checkpoints.CheckpointWriteError,
          checkpoints.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if "eval/top1" in result:
    print(f"\nFinal eval top-1: {result['eval/top1']:.4f}  top-5: {result['eval/top5']:.4f}"
          f"  (step {result['step']})")
  else:  # Other evaluators (few-shot, reconstruction, ...), or none.
    final = "  ".join(f"{k[len('eval/'):]}: {v:.4f}" for k, v in result.items()
                      if k.startswith("eval/"))
    print(f"\nFinal eval {final or '(no evaluators)'}  (step {result['step']})")
  print(f"checkpoint: {os.path.abspath(result['checkpoint']) if result['checkpoint'] else '-'}")
  print(f"metrics:    {os.path.abspath(result['metrics'])}")
  print(f"plot:       {os.path.abspath(result['plot']) if result['plot'] else '-'}")
  print(f"tensorboard: {os.path.abspath(result['tensorboard'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
