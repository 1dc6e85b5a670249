"""Prints the registered models with parameters, resolution and forward GMACs per image.

    python -m vitjax.tools.model_table ['deit_*'] [--resolution R] [--markdown] [--no_macs]

Parameters come from `jax.eval_shape` of `model.init` (nothing is allocated); for
sparse mixtures of experts an `active params` column gives those one token uses.
MACs follow the papers' and timm's convention: one multiply-add of a matrix
multiplication or convolution is one MAC; softmax, GELU, norms and additions
are not counted. They are read off the traced forward pass (every dot_general
and convolution, with its shapes) and cross-checked against XLA's cost
analysis of the compiled program, whose FLOPs also include the element-wise work.
"""

import argparse
import math
import sys

import jax
import jax.numpy as jnp

from vitjax import models


def count_macs(fn, *args):
  """Multiply-adds of the matrix multiplications and convolutions `fn(*args)` performs."""
  return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_macs(jaxpr):
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) positions.
      per_output = math.prod(rhs[d] for d in spec[1:])
      total += math.prod(eqn.outvars[0].aval.shape) * per_output
    if name == "cond":  # One branch runs (e.g. vitjax.ops.dense's per-platform branches).
      total += max(_jaxpr_macs(branch.jaxpr) for branch in eqn.params["branches"])
      continue
    repeat = eqn.params.get("length", 1) if name == "scan" else 1
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += repeat * _jaxpr_macs(inner)
  return total


def model_row(name, resolution=None, macs=True):
  """{'name', 'params', 'active_params', 'resolution', 'gmacs', 'xla_gflops'} of a model.

  `active_params`: those one token's forward pass uses; fewer than `params` for sparse
  mixtures of experts (a token meets k of E experts), the same for every other model.
  """
  overrides = {"image_size": resolution} if resolution else {}
  model = models.create_model(name, **overrides)
  params = models.param_shapes(model)
  counts = models.parameter_counts(model, params)
  row = {"name": name, "params": counts["total"], "active_params": counts["active"],
         "resolution": model.image_size}
  if macs:
    images = jax.ShapeDtypeStruct(models.dummy_input(model).shape, jnp.float32)
    # All outputs: a two-tower model's image-only forward has no logits, only `out`.
    forward = lambda p, x: model.apply({"params": p}, x)
    row["gmacs"] = count_macs(forward, params, images) / 1e9
    cost = jax.jit(forward).lower(params, images).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row["xla_gflops"] = float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan")
  return row


def model_names(pattern="*"):
  """Registered names matching `pattern`, less the families (a family needs a variant; its
  members are listed)."""
  families = models.families()
  return [name for name in models.list_models(pattern) if name not in families]


def model_rows(pattern="*", resolution=None, macs=True):
  return [model_row(name, resolution, macs) for name in model_names(pattern)]


def no_match_message(pattern):
  """Why `pattern` lists nothing, and what to type instead."""
  families = [name for name in models.list_models(pattern) if name not in model_names()]
  if families:
    return (f"error: {', '.join(map(repr, families))} only names a family, which needs a "
            f"variant; its models: {' '.join(repr(f + '_*') for f in families)}")
  close = [name for name in models.closest_models(pattern, n=8) if name in model_names()][:5]
  if close:
    return f"error: no registered model matches {pattern!r}; closest: {', '.join(close)}"
  return (f"error: no registered model matches {pattern!r}; none is close; try one of "
          f"{', '.join(map(repr, models.name_patterns()))}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vit_*'")
  parser.add_argument("--resolution", type=int, help="input side, instead of each model's own")
  parser.add_argument("--markdown", action="store_true", help="a Markdown table")
  parser.add_argument("--no_macs", action="store_true", help="parameters only (instant)")
  args = parser.parse_args(argv)
  if not model_names(args.pattern):  # An empty table would read as success.
    print(no_match_message(args.pattern), file=sys.stderr)
    raise SystemExit(2)
  rows = model_rows(args.pattern, args.resolution, macs=not args.no_macs)
  macs = not args.no_macs
  # Active parameters only when some model (a sparse MoE) uses fewer than it has.
  active = any(r["active_params"] != r["params"] for r in rows)
  if args.markdown:
    print("| model | params |" + (" active params |" if active else "") + " resolution |"
          + (" GMACs | XLA GFLOPs |" if macs else ""))
    print("|---|---:|" + ("---:|" if active else "") + "---:|" + ("---:|---:|" if macs else ""))
    for r in rows:
      extra = f" {r['gmacs']:.2f} | {r['xla_gflops']:.2f} |" if macs else ""
      shown = f" {r['active_params']:,} |" if active else ""
      print(f"| `{r['name']}` | {r['params']:,} |{shown} {r['resolution']} |{extra}")
    return rows
  width = max((len(r["name"]) for r in rows), default=5)
  print(f"{'model':<{width}}  {'params':>13}" + ("  active params" if active else "")
        + "  resolution" + ("     GMACs  XLA GFLOPs" if macs else ""))
  for r in rows:
    extra = f"  {r['gmacs']:>8.2f}  {r['xla_gflops']:>10.2f}" if macs else ""
    shown = f"  {r['active_params']:>13,}" if active else ""
    print(f"{r['name']:<{width}}  {r['params']:>13,}{shown}  {r['resolution']:>10}{extra}")
  return rows


if __name__ == "__main__":
  main()
