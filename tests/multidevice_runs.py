"""Training runs on several devices, for tests/test_sharding.py.

Run as a script in a fresh process (the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_runs.py SCENARIO DIR

It prints one JSON object with what the scenario measured.
"""

import json
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax import data as data_lib  # pylint: disable=wrong-import-position
from vitjax import train as train_lib  # pylint: disable=wrong-import-position
from vitjax.train import checkpoints, metrics, sharding, trainer  # pylint: disable=wrong-import-position

# No metrics.png: these runs check losses, parameters and checkpoints, and drawing the plot
# took two seconds a run.
metrics.plot_metrics = lambda jsonl_path, png_path: None

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def tiny_config(mesh, rules="dp", **overrides):
  config = config_lib.load_config(QUICKSTART + ":image_size=8,variant=mu/4")
  config_lib.apply_overrides(config, [
      "batch_size=16", "eval_batch_size=120", "total_steps=5", "log_every=1",
      "eval_every=5", "checkpoint_every=5", "optimizer.warmup_steps=2",
      "model.drop_path_rate=0.0", f"sharding={rules}"]
      + [f"{k}={v}" for k, v in overrides.items()])
  with config.unlocked():
    config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
    config.mesh = mesh
  return config


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [row["train/loss"] for row in rows if "train/loss" in row]


MESHES = {
    "one_device": ({"data": 1}, "dp"),
    "data8": ({"data": 8, "fsdp": 1, "tensor": 1}, "dp"),
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
}


def meshes(workdir):
  """Loss curves of the same run on four meshes."""
  return {name: losses(_train(tiny_config(*MESHES[name]), os.path.join(workdir, name)))
          for name in MESHES}


def _train(config, workdir):
  train_lib.train(config, workdir, progress=False)
  return workdir


def fsdp_memory(workdir):
  """Bytes of parameters + optimizer state per device under fsdp=8, and in total."""
  del workdir
  config = tiny_config(*MESHES["fsdp8"])
  mesh = sharding.make_mesh(config.mesh)
  model = train_lib.build_model(config)
  with sharding.mesh_context(mesh, sharding.logical_rules(config)):
    state, _, _, _ = trainer._init_state(config, model, mesh, jax.random.PRNGKey(0))  # pylint: disable=protected-access
  leaves = jax.tree_util.tree_leaves({"params": state["params"], "opt_state": state["opt_state"]})
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  per_device = {}
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
  return {"total": total, "per_device": per_device}


def grad_accum(workdir):
  """Parameters after 3 steps of batch 16, in one piece and as 4 micro-batches of 4."""
  results = {}
  for accum in (1, 4):
    config = tiny_config(*MESHES["data8"], grad_accum_steps=accum, total_steps=3, batch_size=32,
                         eval_every=3, checkpoint_every=3)
    path = _train(config, os.path.join(workdir, f"accum{accum}"))
    params = checkpoints.load_params(path)
    results[f"accum{accum}"] = {"losses": losses(path),
                                "params": [np.asarray(x).ravel()[:50].tolist()
                                           for x in jax.tree_util.tree_leaves(params)]}
  return results


class _Preempted(Exception):
  pass


def mesh_change(workdir):
  """fsdp=8 until a checkpoint at step 4, then resumed with data=8 to step 6."""
  straight = tiny_config(*MESHES["fsdp8"], total_steps=6, checkpoint_every=2, eval_every=6)
  straight_losses = losses(_train(straight, os.path.join(workdir, "straight")))

  dataset_type = type(data_lib.get_dataset(straight))
  original = dataset_type.train_iter

  def preempted_after_5(self, *args, **kwargs):
    for i, batch in enumerate(original(self, *args, **kwargs)):
      if i == 5:
        raise _Preempted()
      yield batch

  dataset_type.train_iter = preempted_after_5
  try:
    train_lib.train(straight, os.path.join(workdir, "changed"), progress=False)
  except _Preempted:
    pass
  dataset_type.train_iter = original
  resumed = tiny_config(*MESHES["data8"], total_steps=6, checkpoint_every=2, eval_every=6)
  changed_losses = losses(_train(resumed, os.path.join(workdir, "changed")))
  return {"straight": straight_losses, "changed": changed_losses}


if __name__ == "__main__":
  scenario, directory = sys.argv[1], sys.argv[2]
  print("RESULT " + json.dumps(globals()[scenario](directory)))
