"""The trainer: `python -m vitjax.train --config configs/X.py --workdir DIR`."""

import importlib

_EXPORTS = ("TrainingDivergedError", "TrainingInterrupted", "build_model", "train")
__all__ = list(_EXPORTS)


def __getattr__(name):
  # Imported on first use, so that the command line starts without JAX (see vitjax/__init__).
  if name in _EXPORTS:
    return getattr(importlib.import_module("vitjax.train.trainer"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
