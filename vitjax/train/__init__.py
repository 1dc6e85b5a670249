"""The trainer: `python -m vitjax.train --config configs/X.py --workdir DIR`."""

import importlib

# name -> the module defining it, imported on first use, so that the command line starts
# without JAX (see vitjax/__init__).
_EXPORTS = {"TrainingDivergedError": "vitjax.train.trainer",
            "TrainingInterrupted": "vitjax.train.trainer",
            "build_model": "vitjax.train.tasks.base",
            "train": "vitjax.train.trainer"}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
