"""Command line: python -m vitjax.train --config configs/X.py[:args] --workdir DIR [--config.key=value ...]

Exit status:
  0    done, or the run in the workdir was already complete (nothing written);
  1    training failed: the loss diverged, a checkpoint could not be written or none
       could be read (the message names the step and the file);
  2    bad input, with nothing written: an unknown or out-of-range config value, an
       unknown model, a workdir held by another run, a workdir whose checkpoints
       were written for another model or input stream;
  130  interrupted (Ctrl-C); rerun the same command to resume.
Errors are one message on stderr; `--verbose` (or VITJAX_VERBOSE=1) adds the
traceback and the libraries' own logs. A bug in vitjax still gets its traceback
and exit 1.
"""

import argparse
import logging
import os
import sys
import traceback

USAGE = ("python -m vitjax.train --config configs/FILE.py[:key=value,...] --workdir DIR "
         "[--config.KEY=VALUE ...]")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m vitjax.train", usage=USAGE,
                                   description="Train a vitjax model from a config file.")
  parser.add_argument("--config", required=True, help="configs/FILE.py[:key=value,...]")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--verbose", action="store_true",
                      help="on an error, print the traceback and the libraries' logs too")
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
  verbose = args.verbose or os.environ.get("VITJAX_VERBOSE", "") not in ("", "0")
  if args.verbose:
    os.environ["VITJAX_VERBOSE"] = "1"  # Also read by the checkpointer.
  if not verbose:
    # Orbax logs the tracebacks of its background threads before vitjax reports the
    # error they raised; the one-line report is enough.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
  try:
    return _run(args, overrides)
  except KeyboardInterrupt as e:
    print(f"\n{e}" if str(e) else "\nInterrupted before training started; nothing to "
          "resume from yet.", file=sys.stderr, flush=True)
    return 130
  except BaseException as e:  # pylint: disable=broad-except
    code = _exit_code(e)
    if code is None:
      raise  # A bug: its traceback, exit 1.
    if verbose:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr, flush=True)
    return code


def _exit_code(error):
  """2 for bad input, 1 for a failed run, None for anything else (a bug)."""
  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vitjax import data  # pylint: disable=g-import-not-at-top
  from vitjax import models  # pylint: disable=g-import-not-at-top
  from vitjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  from vitjax.train import trainer  # pylint: disable=g-import-not-at-top
  from vitjax.train import workdir  # pylint: disable=g-import-not-at-top
  # A corrupt image met mid-run is bad input too: its message names the file and the fix.
  if isinstance(error, (config_lib.ConfigError, models.UnknownModelError,
                        workdir.WorkdirLockedError, checkpoints.DataStateMismatchError,
                        checkpoints.CheckpointMismatchError, data.BadImageError)):
    return 2
  if isinstance(error, (trainer.TrainingDivergedError, checkpoints.CheckpointWriteError,
                        checkpoints.CheckpointError)):
    return 1
  return None


def _run(args, overrides):
  from vitjax.train import workdir  # pylint: disable=g-import-not-at-top
  workdir.check_free(args.workdir)  # A second run stops before importing JAX.
  # Imported after argument parsing so that `--help` answers at once.
  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vitjax import models  # pylint: disable=g-import-not-at-top
  from vitjax.train import sharding  # pylint: disable=g-import-not-at-top
  from vitjax.train import trainer  # pylint: disable=g-import-not-at-top
  from vitjax.train.tasks import base as tasks_base  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, overrides)
  try:
    tasks_base.build_model(config)  # An unknown model fails before the workdir exists.
  except (models.UnknownModelError, config_lib.ConfigError):
    raise
  # An option or a variant the model does not take; any other TypeError is a bug (exit 1).
  except (models.UnknownOptionError, ValueError) as e:
    raise config_lib.ConfigError(f"config.model: {e}") from e
  sharding.initialize_distributed(config.get("distributed"))
  result = trainer.train(config, args.workdir, progress=not args.no_progress)
  if "eval/top1" in result:
    print(f"\nFinal eval top-1: {result['eval/top1']:.4f}  top-5: {result['eval/top5']:.4f}"
          f"  (step {result['step']})")
  else:  # Other evaluators (few-shot, reconstruction, ...), or none.
    final = "  ".join(f"{k[len('eval/'):]}: {v:.4f}" for k, v in result.items()
                      if k.startswith("eval/"))
    print(f"\nFinal eval {final or '(no evaluators)'}  (step {result['step']})")
  for name in ("checkpoint", "metrics", "plot", "tensorboard"):
    print(f"{name + ':':13}{_shown(result[name])}")
  return 0


def _shown(path):
  """A local path made absolute; `gs://...` and None as they are."""
  if path is None:
    return "-"
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


if __name__ == "__main__":
  exit_code = main()
  if exit_code:
    # After a failed checkpoint write, orbax's background threads wait minutes for a
    # directory that was never made; the error is reported, so exit without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # pylint: disable=protected-access
  sys.exit(exit_code)
