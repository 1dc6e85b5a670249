"""DeiT distillation (Touvron et al. 2021): a student with a distillation token learns
from the labels through its class token and from a frozen teacher through the
distillation token.

    config.task = 'distill'
    config.model = dict(name='vit', ..., distilled=True)      # the student
    config.teacher = dict(model=dict(name='vit', ...),        # any vitjax model
                          init='teacher.npz',                 # or a training workdir
                          mean=None, std=None)                # its input normalisation
    config.distill = dict(type='hard', alpha=0.5, tau=1.0)

Losses, with s_cls / s_dist the student's two heads and t the teacher's logits:

    hard: 0.5 * CE(s_cls, y) + 0.5 * CE(s_dist, argmax t)
    soft: (1 - alpha) * CE(s_cls, y) + alpha * tau^2 * KL(softmax(t / tau) || softmax(s_dist / tau))

The KL is summed over classes and averaged over the batch (Hinton et al.); DeiT's
reference code divides it by the number of classes as well, which is the same
as a smaller alpha. CE(s_cls, y) uses `config.label_smoothing` and accepts soft
labels (Mixup). At inference the student's prediction is the mean of its heads.

The teacher runs in inference mode inside the same jitted step; its parameters
are the task's constants (sharded like parameters, never trained or
checkpointed). A teacher made for another resolution gets the batch resized
(bilinear, `jax.image.resize`) to its `image_size`; one trained with another
input normalisation gets the pixels renormalised from the student's mean/std to
`config.teacher.mean/std`.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vitjax import convert
from vitjax.models import dummy_input, param_shapes
from vitjax.train import sharding as sharding_lib
from vitjax.train.tasks.base import Task, build_model
from vitjax.train.tasks.supervised import classification_targets

DISTILLATION_TYPES = ("hard", "soft")


def distillation_loss(logits_cls, logits_dist, teacher_logits, targets, *, kind="hard",
                      alpha=0.5, tau=1.0):
  """(loss, {'loss_cls', 'loss_dist'}) of DeiT hard or soft distillation, batch means.

  Args:
    logits_cls, logits_dist: the student's class-token and distillation-token
      logits [B, C].
    teacher_logits: [B, C].
    targets: label distributions [B, C] (one-hot, smoothed or mixed).
    kind: 'hard' (the teacher's argmax as a label, weights 1/2 and 1/2) or 'soft'
      (temperature-`tau` KL to the teacher's distribution, weight `alpha`).
  """
  if kind not in DISTILLATION_TYPES:
    raise ValueError(f"config.distill.type={kind!r}: use one of {DISTILLATION_TYPES}.")
  logits_cls, logits_dist, teacher_logits = (
      x.astype(jnp.float32) for x in (logits_cls, logits_dist, teacher_logits))
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  loss_cls = optax.softmax_cross_entropy(logits_cls, targets).mean()
  if kind == "hard":
    teacher_labels = jnp.argmax(teacher_logits, -1)
    loss_dist = optax.softmax_cross_entropy_with_integer_labels(logits_dist,
                                                                teacher_labels).mean()
    return 0.5 * loss_cls + 0.5 * loss_dist, {"loss_cls": loss_cls, "loss_dist": loss_dist}
  teacher_log_probs = jax.nn.log_softmax(teacher_logits / tau)
  student_log_probs = jax.nn.log_softmax(logits_dist / tau)
  kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), -1)
  loss_dist = tau ** 2 * kl.mean()
  return ((1 - alpha) * loss_cls + alpha * loss_dist,
          {"loss_cls": loss_cls, "loss_dist": loss_dist})


class Distillation(Task):
  """DeiT hard / soft distillation from a frozen teacher through the distillation token."""

  def __init__(self, config):
    super().__init__(config)
    teacher_config = config.get("teacher")
    if not teacher_config or not teacher_config.get("model"):
      raise ValueError("config.task='distill' needs config.teacher.model (the teacher's "
                       "model keys, as config.model) and config.teacher.init (its weights).")
    self.teacher_config = teacher_config
    options = config.get("distill") or {}
    self.kind = options.get("type", "hard")
    self.alpha = float(options.get("alpha", 0.5))
    self.tau = float(options.get("tau", 1.0))
    if self.kind not in DISTILLATION_TYPES:
      raise ValueError(f"config.distill.type={self.kind!r}: use one of {DISTILLATION_TYPES}.")
    self.label_smoothing = config.get("label_smoothing", 0.0)
    self.teacher = self.teacher_params = None  # Set with the student, in build_model().

  def build_model(self):
    """The student (checked to have a distillation token); builds the teacher too."""
    student = super().build_model()
    if not getattr(student, "distilled", False):
      raise ValueError(
          f"config.task='distill' trains the student's distillation token, but "
          f"config.model ({self.config.model.name!r}) has none: set "
          f"config.model.distilled=True (a DeiT-style ViT with pool_type='token').")
    self.teacher = build_model(types.SimpleNamespace(model=self.teacher_config.model))
    student_classes = _num_classes(student)
    teacher_classes = _num_classes(self.teacher)
    if student_classes != teacher_classes:
      raise ValueError(
          f"The teacher predicts {teacher_classes} classes and the student "
          f"{student_classes}: distillation needs the same label set. Set "
          f"config.teacher.model.num_classes={student_classes} and give weights trained "
          f"on the student's classes.")
    # Loaded now, before the run writes anything: a missing or unfitting file fails early.
    self.teacher_params = load_teacher_params(self.teacher, self.teacher_config.get("init"))
    return student

  def prepare(self, model, mesh, rng):
    """{'teacher': the teacher's parameters}, placed on `mesh` as parameters would be."""
    del model, rng
    shardings = sharding_lib.param_shardings(param_shapes(self.teacher, boxed=True), mesh,
                                             nn.get_logical_axis_rules())
    return {"teacher": jax.device_put(self.teacher_params, shardings)}

  def teacher_logits(self, images, teacher_params):
    """The teacher's inference logits for the student's (normalised) batch."""
    images = self.teacher_input(images)
    logits, _ = self.teacher.apply({"params": teacher_params}, images)
    return jax.lax.stop_gradient(logits)

  def teacher_input(self, images):
    """The student's batch as the teacher expects it: its resolution, its normalisation."""
    size = getattr(self.teacher, "image_size", None)
    if size and images.shape[1:3] != (size, size):
      images = jax.image.resize(images, images.shape[:1] + (size, size) + images.shape[3:],
                                method="bilinear")
    mean, std = self.teacher_config.get("mean"), self.teacher_config.get("std")
    if mean is not None or std is not None:
      student_input = self.config.input
      pixels = images * jnp.asarray(student_input.std) + jnp.asarray(student_input.mean)
      images = ((pixels - jnp.asarray(mean if mean is not None else student_input.mean))
                / jnp.asarray(std if std is not None else student_input.std))
    return images

  def loss(self, model, params, batch, rng, constants, step):
    _, out = self.apply_model(model, params, batch["image"], rng=rng, step=step)
    teacher_logits = self.teacher_logits(batch["image"], constants["teacher"])
    targets = classification_targets(batch, out["logits_cls"].shape[-1], self.label_smoothing)
    loss, metrics = distillation_loss(out["logits_cls"], out["logits_dist"], teacher_logits,
                                      targets, kind=self.kind, alpha=self.alpha, tau=self.tau)
    labels = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
    student_predictions = jnp.argmax(out["logits"], -1)
    teacher_predictions = jnp.argmax(teacher_logits, -1)
    metrics.update(
        accuracy=jnp.mean(student_predictions == labels),
        teacher_accuracy=jnp.mean(teacher_predictions == labels),
        agreement=jnp.mean(student_predictions == teacher_predictions),
        dist_head_agreement=jnp.mean(jnp.argmax(out["logits_dist"], -1)
                                     == teacher_predictions))
    return loss, metrics


def load_teacher_params(teacher, init):
  """The teacher's parameters (NumPy) from a weights file or a training workdir."""
  if not init:
    raise ValueError("config.teacher.init is not set: a teacher needs trained weights (an "
                     ".npz / .safetensors file, or the workdir of a vitjax training run).")
  # Any mismatch is an error listing the differences: a teacher is never partly loaded.
  return convert.load_weights(teacher, init, head="error")


def _num_classes(model):
  """The width of the model's logits, from its attribute or a shape-only trace."""
  if getattr(model, "num_classes", None):
    return model.num_classes
  logits, _ = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), dummy_input(model))[0])
  return logits.shape[-1]
