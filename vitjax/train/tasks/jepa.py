"""I-JEPA pre-training (`config.task = 'ijepa'`): predict the representations of masked
blocks from a context block, in representation space (Assran et al. 2023).

    config.task = 'ijepa'
    config.model = dict(name='ijepa', variant='mu/2', image_size=16, predictor_depth=2)
    config.input.multicrop = dict(global_crops=1, local_crops=0, global_scale=(0.3, 1.0),
                                  masks='ijepa', mask_patch_size=2, ...)  # no colour jitter
    config.ijepa = dict(teacher_momentum=0.996, momentum_schedule='linear')

Each image gets M target blocks and one context block that excludes them
(`multicrop.masks='ijepa'`: `context_index` (B, Kc) and `target_index` (B, M, Kt)).
The context encoder (the trained ViT) encodes the context patches only; the narrow
predictor turns them, with mask tokens at the target positions, into predictions of
the target encoder's outputs there. The target encoder is an exponential moving
average of the context encoder (momentum from `teacher_momentum` to 1, linearly over
the run, as I-JEPA) that encodes the whole image; its outputs are layer-normed
(without a learned affine) and gathered at the targets. The loss is their mean squared
error (the paper's L2).

The target encoder lives in the train state (`task/target_encoder`), checkpointed and
resumed bitwise; the evaluators run on the context encoder (`eval/...`) and the target
encoder (`eval_target/...`), which I-JEPA evaluates. Collapse monitor, logged every
step: the standard deviation over the batch of the target features (near 0: every
image maps to the same representation) and of the predictions.
"""

import dataclasses

import jax
import jax.numpy as jnp

from vitjax.models import jepa
from vitjax.train.tasks.base import Task
from vitjax.train.tasks.self_distillation import (MOMENTUM_SCHEDULES, checked_section,
                                                  float32_copy, in_dtype_of, model_or_none,
                                                  teacher_momentum, update_teacher)


@dataclasses.dataclass(frozen=True)
class IjepaOptions:
  """config.ijepa, checked."""
  teacher_momentum: float = 0.996
  momentum_schedule: str = "linear"

  @classmethod
  def from_config(cls, config):
    return cls(**checked_section(dict(config.get("ijepa") or {}), cls, "ijepa"))

  def __post_init__(self):
    if not 0 <= self.teacher_momentum <= 1:
      raise ValueError(f"config.ijepa.teacher_momentum={self.teacher_momentum!r}: a momentum "
                       "is in [0, 1], e.g. --config.ijepa.teacher_momentum=0.996.")
    if self.momentum_schedule not in MOMENTUM_SCHEDULES:
      raise ValueError(f"config.ijepa.momentum_schedule={self.momentum_schedule!r}: use one "
                       f"of {', '.join(map(repr, MOMENTUM_SCHEDULES))}.")


class Ijepa(Task):
  """I-JEPA; see the module docstring."""

  default_evaluators = {"knn": {}}
  takes_multicrop = True

  def __init__(self, config):
    super().__init__(config)
    self.options = IjepaOptions.from_config(config)
    multicrop = dict((config.get("input") or {}).get("multicrop") or {})
    if multicrop.get("masks") != "ijepa":
      raise ValueError("config.task='ijepa' needs I-JEPA's context and target blocks: set "
                       "config.input.multicrop=dict(global_crops=1, local_crops=0, "
                       "masks='ijepa', mask_patch_size=PATCH) (PATCH: the model's patch size).")
    self.multicrop = multicrop
    self.check_model(model_or_none(config))

  def build_model(self):
    model = super().build_model()
    self.check_model(model)
    return model

  def check_model(self, model):
    """Raises ValueError where the model and config.input.multicrop do not fit."""
    if model is None:
      return
    if not isinstance(model, jepa.IJEPA):
      raise ValueError(f"config.task='ijepa' trains an I-JEPA model (name='ijepa', "
                       f"variant=...), but config.model.name={self.config.model.name!r} is a "
                       f"{type(model).__name__}.")
    mask_patch_size = self.multicrop.get("mask_patch_size", 16)
    if mask_patch_size != model.patch_size:
      raise ValueError(f"config.input.multicrop.mask_patch_size={mask_patch_size} cuts the "
                       f"blocks on another grid than the model's patches ({model.patch_size}): "
                       f"set config.input.multicrop.mask_patch_size={model.patch_size}.")

  def init_state(self, model, params, rng):
    del model, rng
    return {"target_encoder": float32_copy(jepa.encoder_params(params))}

  def eval_weights(self, task_state, params):
    encoder = jepa.encoder_params(params)
    return {"eval_target": in_dtype_of(task_state["target_encoder"], encoder)}

  def update_state(self, task_state, params, step):
    momentum = teacher_momentum(step, self.config.total_steps, self.options.teacher_momentum,
                                self.options.momentum_schedule)
    return {"target_encoder": update_teacher(task_state["target_encoder"],
                                             jepa.encoder_params(params), momentum)}

  def stateful_loss(self, model, params, task_state, batch, rng, constants, step):
    del constants
    images = batch["global_crops"][:, 0]
    context_index, target_index = batch["context_index"], batch["target_index"]
    encoder = jepa.encoder_params(params)
    target_encoder = jax.lax.stop_gradient(in_dtype_of(task_state["target_encoder"], encoder))
    _, target_out = model.apply({"params": target_encoder}, images)
    targets = jax.lax.stop_gradient(
        jepa.target_features(target_out["tokens"].astype(jnp.float32), target_index))
    predictions, _ = self.apply_model(model, params, images, rng=rng, step=step,
                                      context_index=context_index, target_index=target_index)
    predictions = predictions.astype(jnp.float32)
    loss = jnp.mean((predictions - targets) ** 2)
    metrics = {
        "teacher_momentum": teacher_momentum(step, self.config.total_steps,
                                             self.options.teacher_momentum,
                                             self.options.momentum_schedule),
        # Over the batch, averaged over features: near 0 when the representation collapses.
        "target_std": jnp.mean(jnp.std(jnp.mean(targets, axis=(1, 2)), axis=0)),
        "prediction_std": jnp.mean(jnp.std(jnp.mean(predictions, axis=(1, 2)), axis=0)),
    }
    return loss, metrics, task_state


__all__ = ["Ijepa", "IjepaOptions"]
