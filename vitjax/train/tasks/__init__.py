"""Tasks: what a training step optimises and how a run is evaluated.

A task supplies the loss (and the metrics logged with it), the model and data it
needs, and its default evaluators; the trainer's loop, sharding, checkpointing and
logging are shared by all of them. `config.task` picks one by name:

    supervised   softmax cross-entropy on labels (`vitjax.train.tasks.supervised`)
    distill      DeiT hard / soft distillation from a frozen teacher
    mae          masked autoencoder pre-training
    simmim       SimMIM masked image modelling
    contrastive  two towers, CLIP (softmax) or SigLIP (sigmoid) loss; LiT by freezing
    diffusion    DDPM / Improved DDPM or flow matching of a DiT or U-ViT
    dino         self-distillation with no labels: DINO, iBOT's patch loss, DINOv2's options
    ijepa        I-JEPA: predict masked blocks' representations from a context block

Task modules are imported when first named, so a task's extra dependencies cost
nothing to the others.
"""

from vitjax import lazy
from vitjax.train.tasks.base import Task

# name -> "module:class", imported on first use.
TASKS = {
    "supervised": "vitjax.train.tasks.supervised:Supervised",
    "distill": "vitjax.train.tasks.distill:Distillation",
    "mae": "vitjax.train.tasks.masked:MaskedAutoencoder",
    "simmim": "vitjax.train.tasks.masked:SimMIM",
    "contrastive": "vitjax.train.tasks.contrastive:Contrastive",
    "diffusion": "vitjax.train.tasks.diffusion:Diffusion",
    "dino": "vitjax.train.tasks.self_distillation:SelfDistillation",
    "ijepa": "vitjax.train.tasks.jepa:Ijepa",
}


def task_class(name):
  return lazy.resolve(TASKS, name, "task", "Set config.task to")


def make_task(config):
  """The task named by `config.task` ('supervised' when absent), built from `config`."""
  return task_class(config.get("task", "supervised"))(config)


__all__ = ["TASKS", "Task", "make_task", "task_class"]
