"""Logical axis names on weights and activations, for sharding by configuration.

Weights: `embed`, `mlp`, `heads`, `kv`, `classes`, `expert` (an MoE's stacked experts).
Activations: `act_batch`, `act_length`, `act_embed`, `act_mlp`, `act_heads`, `act_kv`,
and in MoE layers `act_group` (groups of tokens) and `act_expert` (their experts). A rules table in
the config maps them to mesh axes (vitjax.train.sharding); without rules (a
notebook, one device) the names change nothing.
"""

import flax.linen as nn


def logical(init, *names):
  """An initializer whose parameter carries logical axis names, for sharding rules."""
  return nn.with_logical_partitioning(init, names)


def constrain(x, *names):
  """Asks the compiler to lay out activation `x` as the rules map `names` (no-op without rules)."""
  return nn.with_logical_constraint(x, names)
