"""Masked image modelling tasks: MAE and SimMIM pre-training.

The loss is the model's own (`out['loss']`: the masked-patch reconstruction
error, see vitjax.models.mae); the task checks that the model is the right
kind and logs the fraction of patches masked. Default evaluator:
'reconstruction' (the same loss on the evaluation split); add
'linear_probe' in config.evaluators to follow the encoder's features.
"""

from vitjax.models import mae
from vitjax.train.tasks.base import Task


class MaskedAutoencoder(Task):
  """MAE pre-training (`config.task = 'mae'`): a MaskedAutoencoder model, e.g. 'mae_vit_base_patch16'."""

  default_evaluators = {"reconstruction": {}}
  model_class = mae.MaskedAutoencoder
  example_model = "mae_vit_base_patch16' or name='mae', variant='B/16"

  def build_model(self):
    model = super().build_model()
    if not isinstance(model, self.model_class):
      raise ValueError(
          f"config.task={self.config.task!r} trains a {self.model_class.__name__}, but "
          f"config.model.name={self.config.model.name!r} is a {type(model).__name__}. Use "
          f"name='{self.example_model}'.")
    return model

  def loss(self, model, params, batch, rng, constants, step):
    del constants
    _, out = self.apply_model(model, params, batch["image"], rng=rng, step=step)
    return out["loss"], {"masked_fraction": out["mask"].mean()}


class SimMIM(MaskedAutoencoder):
  """SimMIM pre-training (`config.task = 'simmim'`): a SimMIM model, e.g. 'simmim_vit_base_patch16'."""

  model_class = mae.SimMIM
  example_model = "simmim_vit_base_patch16' or name='simmim', variant='B/16"
