"""Device meshes and logical-axis sharding rules: parallelism by configuration.

Models name the axes of their weights (`embed`, `mlp`, `heads`, `kv`, `classes`,
`expert`) and activations (`act_batch`, `act_length`, `act_embed`, `act_mlp`,
`act_group`, `act_expert`, ...); a rules table maps those names to mesh axes. Data
parallel, FSDP and FSDP + tensor parallel are three tables below, chosen with
`config.sharding`, or replaced whole by `config.sharding_rules`; the mesh comes
from `config.mesh`. Every table splits a mixture of experts' experts over the
`expert` mesh axis (size 1 unless `config.mesh.expert` says otherwise): expert
parallelism composes with each of them.
"""

import math
import warnings

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

STANDARD_AXES = ("data", "fsdp", "tensor", "expert")
# Mesh axes the batch is split over. `expert` is one of them: outside the MoE layers it is
# data parallel; inside, the tokens move to the devices that hold their experts.
BATCH_AXES = ("data", "fsdp", "expert")
# Within an MoE layer, the groups of tokens stay split over the other data-like axes.
GROUP_AXES = ("data", "fsdp")

# Logical name -> mesh axes. A name missing from a table is replicated. Where two
# rules name the same logical axis, flax takes the first whose mesh axis is still
# free in that array.
RULES = {
    # Replicated weights (but the experts), batch split over every data-like axis.
    "dp": (
        ("expert", "expert"),
        ("act_batch", BATCH_AXES),
        ("act_group", GROUP_AXES),
        ("act_expert", "expert"),
    ),
    # ZeRO-3 style: weights (and so optimizer state) split over `fsdp` as well.
    "fsdp": (
        # Weights.
        ("expert", "expert"),
        ("embed", "fsdp"),
        # Only where `embed` did not take `fsdp`: the MLP and attention biases.
        ("mlp", "fsdp"),
        ("kv", "fsdp"),
        # Activations.
        ("act_batch", BATCH_AXES),
        ("act_group", GROUP_AXES),
        ("act_expert", "expert"),
    ),
    # FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`.
    "fsdp_tp": (
        # Weights.
        ("expert", "expert"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        # Activations.
        ("act_batch", BATCH_AXES),
        ("act_group", GROUP_AXES),
        ("act_expert", "expert"),
        ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
    ),
}


def logical_rules(config):
  """The rules table of `config`: `config.sharding_rules` if set, else the preset."""
  explicit = config.get("sharding_rules")
  if explicit:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in explicit)
  preset = config.get("sharding", "dp")
  if preset not in RULES:
    raise ValueError(f"Unknown config.sharding {preset!r}; presets: {', '.join(RULES)} "
                     f"(or give config.sharding_rules explicitly).")
  return RULES[preset]


def make_mesh(mesh_config, devices=None):
  """A Mesh from {'data': -1, 'fsdp': 1, 'tensor': 1}-style sizes; -1 = the remaining devices.

  All devices of all hosts by default. Sizes that multiply to fewer devices use
  the first ones (useful to compare with a smaller mesh on the same machine).
  """
  devices = list(devices if devices is not None else jax.devices())
  # The standard axes always exist (size 1 unless given), so every rules table applies.
  mesh_config = {**{axis: 1 for axis in STANDARD_AXES if axis not in mesh_config},
                 **dict(mesh_config)}
  names = tuple(mesh_config.keys())
  sizes = [int(mesh_config[name]) for name in names]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(zip(names, sizes))}: at most one axis may be -1.")
  fixed = math.prod(s for s in sizes if s != -1)
  if fixed <= 0 or len(devices) % fixed and -1 in sizes:
    raise ValueError(f"config.mesh {dict(zip(names, sizes))} does not divide the "
                     f"{len(devices)} devices.")
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  count = math.prod(sizes)
  if count > len(devices):
    raise ValueError(f"config.mesh {dict(zip(names, sizes))} needs {count} devices; "
                     f"{len(devices)} are available. Use -1 for 'all the rest'.")
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(sizes, devices[:count])
  except Exception as e:  # pylint: disable=broad-except
    # Topology-agnostic: fine on CPUs, slower collectives on a TPU or GPU torus.
    warnings.warn(f"jax.experimental.mesh_utils could not lay out the mesh "
                  f"{dict(zip(names, sizes))} on {count} {devices[0].platform} devices "
                  f"({type(e).__name__}: {e}); using them in plain order instead.")
    grid = np.array(devices[:count]).reshape(sizes)
  return Mesh(grid, names)


def mesh_context(mesh, rules):
  """The context in which models are traced: the mesh and the logical rules."""
  set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
  return _Both(set_mesh(mesh), nn.logical_axis_rules(rules))


class _Both:
  """Enters two context managers, leaves them in reverse order."""

  def __init__(self, first, second):
    self._first, self._second = first, second

  def __enter__(self):
    self._first.__enter__()
    self._second.__enter__()
    return self

  def __exit__(self, *exc):
    self._second.__exit__(*exc)
    return self._first.__exit__(*exc)


def param_shardings(boxed_abstract_params, mesh, rules):
  """NamedShardings for parameters from their logical axis names."""
  specs = nn.get_partition_spec(boxed_abstract_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def like_params(tree, params, params_sharding, mesh):
  """Shardings for a tree that holds params-shaped subtrees (optimizer state).

  A leaf whose key path ends with a parameter's path, and whose shape is that
  parameter's, gets the parameter's sharding (Adam's moments, also under optax's
  masks and multi_transform); every other leaf (step counts, scalars) is replicated.
  """
  by_path = {}
  for (path, param), (_, sharding) in zip(
      jax.tree_util.tree_leaves_with_path(params),
      jax.tree_util.tree_leaves_with_path(params_sharding)):
    by_path[_keys(path)] = (param.shape, sharding)

  def sharding_of(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match and match[0] == getattr(leaf, "shape", None):
        return match[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding_of, tree)


def _keys(path):
  """A key path as a tuple of plain names, comparable across containers."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def batch_sharding(mesh):
  """The leading (batch) dimension split over the data-like mesh axes."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes))


def batch_devices(mesh):
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def global_batch(local_batch, sharding):
  """This host's slice of the batch -> global arrays split as `sharding` says."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def initialize_distributed(distributed_config):
  """`jax.distributed.initialize` for multi-host runs (TPU pods, SLURM, multi-node GPU).

  `enabled=False` (the default) does nothing. With `enabled=True`, the other
  keys (coordinator_address, num_processes, process_id) are passed when set;
  left None, JAX detects them from the cluster environment. Must run before
  anything else touches the devices.
  """
  if not distributed_config or not distributed_config.get("enabled", False):
    return
  kwargs = {key: distributed_config.get(key) for key in
            ("coordinator_address", "num_processes", "process_id")
            if distributed_config.get(key) is not None}
  if distributed_config.get("cpu_collectives"):  # 'gloo' for CPU-only clusters and tests.
    jax.config.update("jax_cpu_collectives_implementation", distributed_config.cpu_collectives)
  jax.distributed.initialize(**kwargs)
