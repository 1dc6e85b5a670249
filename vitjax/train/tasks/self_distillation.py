"""Self-distillation with no labels (`config.task = 'dino'`): DINO, iBOT and DINOv2's losses.

    config.task = 'dino'
    config.model = dict(name='dino', variant='S/16', head_out_dim=65536)  # a vitjax DINO
    config.input.multicrop = dict(global_crops=2, local_crops=8, local_size=96)
    config.dino = dict(
        student_temperature=0.1,
        teacher_temperature=0.04,           # after the warm-up
        warmup_teacher_temperature=0.04,    # linear warm-up from this...
        warmup_teacher_temperature_steps=0, # ...over these steps
        centering='center',                 # or 'sinkhorn_knopp' (DINOv2)
        center_momentum=0.9,
        teacher_momentum=0.996,             # -> 1.0 on a cosine over the run
        ibot_weight=0.0,                    # iBOT's masked-patch loss (needs a patch head)
        ibot_teacher_temperature=0.07, ibot_warmup_teacher_temperature=0.04,
        koleo_weight=0.0,                   # DINOv2's KoLeo regulariser (0.1 there)
    )
    config.evaluators = dict(knn=dict(), linear_probe=dict())

The student (the trained parameters) sees every crop: the global crops (with iBOT,
their masked patches replaced by the mask token) and the local ones. The teacher, an
exponential moving average of the student with a momentum that rises from
`teacher_momentum` to 1 on a cosine over `config.total_steps` (DINO's schedule), sees the
global crops, unmasked. Its class-token outputs are centred (minus a running mean of
its logits, momentum `center_momentum`) and sharpened (temperature below the
student's), or with 'sinkhorn_knopp' normalised by three Sinkhorn-Knopp iterations over
the batch (DINOv2), and the student learns to predict them across views: the
cross-entropy of each student view against each teacher view but its own.

With `ibot_weight` > 0 (the model needs `patch_head='shared'` or 'separate', and the
input `multicrop.masks='ibot'`), the student's patch tokens at masked positions predict
the teacher's patch tokens of the same view (iBOT), with a patch centre of their own.
With `koleo_weight` > 0, DINOv2's KoLeo term spreads the student's class tokens of
each global view over the sphere.

Teacher, centres and the schedules' step live in the train state (`task`), are
checkpointed with it and resume bitwise. The evaluators run on the student
(`eval/...`) and the teacher (`eval_teacher/...`), DINO's evaluated network.
Collapse monitors are logged every step: the teacher's output entropy, the entropy of
its batch-mean distribution (low: every image picks the same prototype) and the KL
from teacher to student.

Left out: DINO's freezing of the last layer in the first epoch, and its weight-decay
schedule (0.04 -> 0.4): config.optimizer has neither.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from vitjax.models.dino import DINO
from vitjax.train.tasks import dino_losses
from vitjax.train.tasks.base import Task, build_model, float32_copy
from vitjax.train.tasks.base import update_ema as update_teacher  # An EMA of the student.

CENTERING = ("center", "sinkhorn_knopp")
MOMENTUM_SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class DinoOptions:
  """config.dino, checked."""
  student_temperature: float = 0.1
  teacher_temperature: float = 0.04
  warmup_teacher_temperature: float = 0.04
  warmup_teacher_temperature_steps: int = 0
  centering: str = "center"
  center_momentum: float = 0.9
  teacher_momentum: float = 0.996
  ibot_weight: float = 0.0
  ibot_teacher_temperature: float = 0.07
  ibot_warmup_teacher_temperature: float = 0.04
  koleo_weight: float = 0.0

  @classmethod
  def from_config(cls, config):
    section = dict(config.get("dino") or {})
    return cls(**checked_section(section, cls, "dino"))

  def __post_init__(self):
    for key in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature",
                "ibot_teacher_temperature", "ibot_warmup_teacher_temperature"):
      if not getattr(self, key) > 0:
        raise ValueError(f"config.dino.{key}={getattr(self, key)!r}: a temperature must be "
                         f"> 0, e.g. --config.dino.{key}={getattr(DinoOptions, key)}.")
    for key in ("center_momentum", "teacher_momentum"):
      if not 0 <= getattr(self, key) <= 1:
        raise ValueError(f"config.dino.{key}={getattr(self, key)!r}: a momentum is in "
                         f"[0, 1], e.g. --config.dino.{key}={getattr(DinoOptions, key)}.")
    for key in ("ibot_weight", "koleo_weight", "warmup_teacher_temperature_steps"):
      if getattr(self, key) < 0:
        raise ValueError(f"config.dino.{key}={getattr(self, key)!r}: must be >= 0.")
    if self.centering not in CENTERING:
      raise ValueError(f"config.dino.centering={self.centering!r}: use one of "
                       f"{', '.join(map(repr, CENTERING))}.")


def checked_section(section, options_class, name):
  """`section` (a config dict) with its keys checked against `options_class`'s fields."""
  fields = [f.name for f in dataclasses.fields(options_class)]
  unknown = sorted(set(section) - set(fields))
  if unknown:
    raise ValueError(f"config.{name} has no key(s) {', '.join(map(repr, unknown))}; its keys: "
                     f"{', '.join(fields)}.")
  return section


def model_or_none(config):
  """The model config.model names, or None where it cannot be built (the trainer's
  validation reports that, naming config.model)."""
  try:
    return build_model(config)
  except Exception:  # pylint: disable=broad-except
    return None


def teacher_momentum(step, total_steps, base, schedule="cosine"):
  """The EMA momentum at `step`: from `base` to 1 over `total_steps` (DINO: cosine;
  I-JEPA: linear)."""
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  if schedule == "linear":
    return base + (1.0 - base) * progress
  return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


def warmup_temperature(step, start, end, warmup_steps):
  """Linear from `start` to `end` over `warmup_steps`, then `end` (DINO's teacher warm-up)."""
  if not warmup_steps:
    return jnp.float32(end)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return start + (end - start) * progress


def as_views(crops):
  """[B, V, H, W, C] crops -> [V * B, H, W, C], view-major (view v's batch is rows v * B...)."""
  return jnp.swapaxes(crops, 0, 1).reshape((-1,) + crops.shape[2:])


def by_view(x, num_views):
  """[V * B, ...] -> [V, B, ...]."""
  return x.reshape((num_views, -1) + x.shape[1:])


def in_dtype_of(tree, params):
  return jax.tree_util.tree_map(lambda t, p: t.astype(p.dtype), tree, params)


class SelfDistillation(Task):
  """DINO (with iBOT's patch loss and DINOv2's options); see the module docstring."""

  default_evaluators = {"knn": {}}
  takes_multicrop = True

  def __init__(self, config):
    super().__init__(config)
    self.options = DinoOptions.from_config(config)
    multicrop = (config.get("input") or {}).get("multicrop")
    if not multicrop:
      raise ValueError("config.task='dino' learns from several crops of each image: set "
                       "config.input.multicrop, e.g. dict(global_crops=2, local_crops=8, "
                       "local_size=96).")
    self.multicrop = dict(multicrop)
    self.check_model(model_or_none(config))

  @property
  def ibot(self):
    return self.options.ibot_weight > 0

  def build_model(self):
    model = super().build_model()
    self.check_model(model)
    return model

  def check_model(self, model):
    """Raises ValueError where the model and config.dino / config.input do not fit."""
    if model is None:
      return
    if not isinstance(model, DINO):
      raise ValueError(f"config.task='dino' trains a DINO model (name='dino', variant=..., or "
                       f"'dino_vit_small_patch16_224'), but config.model.name="
                       f"{self.config.model.name!r} is a {type(model).__name__}.")
    if self.ibot and not model.patch_head:
      raise ValueError("config.dino.ibot_weight > 0 trains iBOT's masked-patch loss: set "
                       "config.model.patch_head='shared' (iBOT) or 'separate' (DINOv2).")
    if self.ibot and self.multicrop.get("masks") != "ibot":
      raise ValueError("config.dino.ibot_weight > 0 needs masked global crops: set "
                       "config.input.multicrop.masks='ibot'.")
    if self.multicrop.get("global_crops", 2) < 2:
      raise ValueError("config.task='dino' compares each teacher view with the student's "
                       "other views: config.input.multicrop.global_crops must be >= 2.")

  def init_state(self, model, params, rng):
    del rng
    state = {"teacher": float32_copy(params),
             "center": jnp.zeros((1, model.head_out_dim), jnp.float32)}
    if model.patch_head:
      width = (model.patch_out_dim or model.head_out_dim if model.patch_head == "separate"
               else model.head_out_dim)
      state["patch_center"] = jnp.zeros((1, width), jnp.float32)
    return state

  def eval_weights(self, task_state, params):
    return {"eval_teacher": in_dtype_of(task_state["teacher"], params)}

  def update_state(self, task_state, params, step):
    momentum = teacher_momentum(step, self.config.total_steps, self.options.teacher_momentum)
    return {**task_state, "teacher": update_teacher(task_state["teacher"], params, momentum)}

  def teacher_probabilities(self, logits, center, temperature, mask=None):
    if self.options.centering == "sinkhorn_knopp":
      return dino_losses.sinkhorn_knopp(logits, temperature, mask=mask)
    return dino_losses.teacher_probabilities(logits, center, temperature)

  def stateful_loss(self, model, params, task_state, batch, rng, constants, step):
    del constants
    options = self.options
    global_crops = batch["global_crops"]
    num_global = global_crops.shape[1]
    images = as_views(global_crops)
    mask = as_views(batch["ibot_mask"]) if self.ibot else None

    teacher = jax.lax.stop_gradient(in_dtype_of(task_state["teacher"], params))
    teacher_logits, teacher_out = model.apply({"params": teacher}, images)
    teacher_logits = by_view(teacher_logits.astype(jnp.float32), num_global)
    temperature = warmup_temperature(step, options.warmup_teacher_temperature,
                                     options.teacher_temperature,
                                     options.warmup_teacher_temperature_steps)
    teacher_probs = by_view(self.teacher_probabilities(
        teacher_logits.reshape(-1, teacher_logits.shape[-1]), task_state["center"],
        temperature), num_global)
    teacher_probs = jax.lax.stop_gradient(teacher_probs)

    student_logits, student_out = self.apply_model(model, params, images, rng=rng, step=step,
                                                   mask=mask)
    student_logits = [by_view(student_logits.astype(jnp.float32), num_global)]
    if "local_crops" in batch:
      local_crops = batch["local_crops"]
      local_logits, _ = self.apply_model(model, params, as_views(local_crops),
                                         rng=jax.random.fold_in(rng, 1), step=step)
      student_logits.append(by_view(local_logits.astype(jnp.float32), local_crops.shape[1]))
    student_logits = jnp.concatenate(student_logits, axis=0)

    loss_dino = dino_losses.dino_loss(student_logits, teacher_probs,
                                      options.student_temperature)
    loss = loss_dino
    metrics = {
        "loss_dino": loss_dino,
        "teacher_temperature": temperature,
        "teacher_momentum": teacher_momentum(step, self.config.total_steps,
                                             options.teacher_momentum),
        "teacher_entropy": dino_losses.teacher_entropy(teacher_probs),
        "teacher_mean_entropy": dino_losses.mean_distribution_entropy(teacher_probs),
        "teacher_student_kl": dino_losses.teacher_student_kl(
            student_logits, teacher_probs, options.student_temperature),
    }
    new_state = dict(task_state)
    new_state["center"] = dino_losses.update_center(
        task_state["center"], jax.lax.stop_gradient(teacher_logits), options.center_momentum)

    if self.ibot:
      patch_logits = by_view(teacher_out["patch_logits"].astype(jnp.float32), num_global)
      patch_mask = by_view(mask, num_global)
      patch_temperature = warmup_temperature(
          step, options.ibot_warmup_teacher_temperature, options.ibot_teacher_temperature,
          options.warmup_teacher_temperature_steps)
      patch_probs = jax.lax.stop_gradient(self.teacher_probabilities(
          patch_logits, task_state["patch_center"], patch_temperature, mask=patch_mask))
      student_patches = by_view(student_out["patch_logits"].astype(jnp.float32), num_global)
      loss_ibot = dino_losses.ibot_patch_loss(student_patches, patch_probs, patch_mask,
                                              options.student_temperature)
      loss = loss + options.ibot_weight * loss_ibot
      metrics["loss_ibot"] = loss_ibot
      metrics["masked_fraction"] = jnp.mean(patch_mask.astype(jnp.float32))
      new_state["patch_center"] = dino_losses.update_center(
          task_state["patch_center"], jax.lax.stop_gradient(jnp.mean(patch_logits, axis=2)),
          options.center_momentum)

    if options.koleo_weight:
      class_tokens = by_view(student_out["pre_logits"].astype(jnp.float32), num_global)
      loss_koleo = sum(dino_losses.koleo_loss(tokens) for tokens in class_tokens)
      loss = loss + options.koleo_weight * loss_koleo
      metrics["loss_koleo"] = loss_koleo
    return loss, metrics, new_state


__all__ = ["CENTERING", "DinoOptions", "SelfDistillation", "as_views", "by_view",
           "teacher_momentum", "update_teacher", "warmup_temperature"]
