"""Expert-parallel training on 8 CPU devices, for tests/test_moe.py.

Run as a script in a fresh process (the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/moe_multidevice.py

It prints one JSON object: per run, the losses, gradient norms and dropped fractions of
3 training steps (the trainer's step function and sharded state), the first values of
every parameter after them, the bytes of expert parameters (and their optimizer state)
on each device, and how many all-to-alls the compiled step has.
"""

import functools
import json
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vitjax import config as config_lib  # pylint: disable=wrong-import-position
from vitjax import train as train_lib  # pylint: disable=wrong-import-position
from vitjax.train import sharding, tasks, trainer  # pylint: disable=wrong-import-position

CONFIG = os.path.join(ROOT, "configs", "moe_digits.py")

# name -> (moe, mesh, rules preset).
RUNS = {
    "sparse/one_device": ("sparse", {"data": 1}, "dp"),
    "sparse/data8": ("sparse", {"data": 8}, "dp"),
    "sparse/expert8": ("sparse", {"data": 1, "expert": 8}, "dp"),
    "sparse/fsdp2_expert4": ("sparse", {"data": 1, "fsdp": 2, "expert": 4}, "fsdp"),
    "soft/one_device": ("soft", {"data": 1}, "dp"),
    "soft/expert8": ("soft", {"data": 1, "expert": 8}, "dp"),
}


def tiny_config(moe, mesh, rules, steps=3):
  """8 experts of a width-16 ViT on 8x8 digits (4 tokens each), 3 steps of batch 16."""
  config = config_lib.load_config(f"{CONFIG}:moe={moe},steps={steps},top_k=2")
  config_lib.apply_overrides(config, [
      "batch_size=16", "eval_batch_size=40", "log_every=1", f"eval_every={steps}",
      f"checkpoint_every={steps}", "optimizer.warmup_steps=1", "model.drop_path_rate=0.0",
      "input.image_size=8", "model.image_size=8", f"sharding={rules}",
      "model.group_size=2", "model.slots_per_expert=1"])
  with config.unlocked():
    config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh}
  return config


def run(name):
  """Three training steps (the trainer's own step, on its sharded state) on fixed batches.

  Also: the bytes of expert parameters and optimizer state on each device, and the
  all-to-alls in the compiled step.
  """
  config = tiny_config(*RUNS[name])
  mesh = sharding.make_mesh(config.mesh)
  model = train_lib.build_model(config)
  task = tasks.make_task(config)
  data = np.random.RandomState(0)
  batches = [{"image": data.randn(16, 8, 8, 3).astype(np.float32),
              "label": data.randint(0, 10, 16).astype(np.int32)} for _ in range(3)]
  rng = jax.random.PRNGKey(0)
  with sharding.mesh_context(mesh, sharding.logical_rules(config)):
    state, shardings, tx, _ = trainer._init_state(config, model, mesh, rng)  # pylint: disable=protected-access
    memory = expert_memory(state)
    step = jax.jit(functools.partial(trainer._train_step, model, tx, task,  # pylint: disable=protected-access
                                     trainer.step_options(config)),
                   in_shardings=(shardings, sharding.batch_sharding(mesh),
                                 sharding.replicated(mesh), {}),
                   out_shardings=(shardings, sharding.replicated(mesh))
                   ).lower(state, batches[0], rng, {}).compile()
    losses, grad_norms, dropped = [], [], []
    for batch in batches:
      state, metrics = step(state, batch, rng, {})
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
      if "aux/moe_dropped" in metrics:
        dropped.append(float(metrics["aux/moe_dropped"]))
  return {"losses": losses, "grad_norms": grad_norms, "dropped": dropped, "memory": memory,
          "all_to_all": step.as_text().count("all-to-all("),
          "params": {jax.tree_util.keystr(path): np.asarray(leaf).ravel()[:64].tolist()
                     for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])}}


def expert_memory(state):
  """Bytes of expert weights + their Adam moments, in all and on each device."""
  total, per_device = 0, {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      {"params": state["params"], "opt_state": state["opt_state"]}):
    if "Experts_0" not in jax.tree_util.keystr(path):
      continue
    total += leaf.size * leaf.dtype.itemsize
    for shard in leaf.addressable_shards:
      per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
  return {"total": total, "per_device": per_device}


if __name__ == "__main__":
  print("RESULT " + json.dumps({name: run(name) for name in RUNS}))
