"""The trainer: `python -m vitjax.train --config configs/X.py --workdir DIR`."""

from vitjax.train.trainer import TrainingDivergedError, build_model, train

__all__ = ["TrainingDivergedError", "build_model", "train"]
