"""Tasks: what a training step optimises and how a run is evaluated.

A task supplies the loss (and the metrics logged with it), the model and data it
needs, and its default evaluators; the trainer's loop, sharding, checkpointing and
logging are shared by all of them. `config.task` picks one by name:

    supervised   softmax cross-entropy on labels (`vitjax.train.tasks.supervised`)
    distill      DeiT hard / soft distillation from a frozen teacher
    mae          masked autoencoder pre-training
    simmim       SimMIM masked image modelling
    contrastive  two towers, CLIP (softmax) or SigLIP (sigmoid) loss; LiT by freezing

Task modules are imported when first named, so a task's extra dependencies cost
nothing to the others.
"""

import difflib
import importlib

from vitjax.train.tasks.base import Task

# name -> "module:class", imported on first use.
TASKS = {
    "supervised": "vitjax.train.tasks.supervised:Supervised",
    "distill": "vitjax.train.tasks.distill:Distillation",
    "mae": "vitjax.train.tasks.masked:MaskedAutoencoder",
    "simmim": "vitjax.train.tasks.masked:SimMIM",
    "contrastive": "vitjax.train.tasks.contrastive:Contrastive",
}


def task_class(name):
  if name not in TASKS:
    close = difflib.get_close_matches(str(name), TASKS, 3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown task {name!r}.{hint} Set config.task to one of: "
                     f"{', '.join(sorted(TASKS))}.")
  module_name, class_name = TASKS[name].split(":")
  return getattr(importlib.import_module(module_name), class_name)


def make_task(config):
  """The task named by `config.task` ('supervised' when absent), built from `config`."""
  return task_class(config.get("task", "supervised"))(config)


__all__ = ["TASKS", "Task", "make_task", "task_class"]
