"""Prints the registered models with their parameter counts and input resolution.

    python -m vitjax.tools.model_table ['deit_*'] [--markdown]

Counts come from `jax.eval_shape` of `model.init`: nothing is computed or allocated.
"""

import argparse

from vitjax import models


def model_rows(pattern="*"):
  """(name, params, resolution) for every registered model matching `pattern`."""
  rows = []
  for name in models.list_models(pattern):
    if name in models._FAMILIES:  # pylint: disable=protected-access
      continue  # A family needs a variant; its members are listed by name.
    model = models.create_model(name)
    rows.append((name, models.count_params(models.param_shapes(model)), model.image_size))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vit_*'")
  parser.add_argument("--markdown", action="store_true", help="a Markdown table")
  args = parser.parse_args(argv)
  rows = model_rows(args.pattern)
  if args.markdown:
    print("| model | params | resolution |\n|---|---:|---:|")
    for name, params, resolution in rows:
      print(f"| `{name}` | {params:,} | {resolution} |")
  else:
    width = max((len(r[0]) for r in rows), default=5)
    print(f"{'model':<{width}}  {'params':>13}  resolution")
    for name, params, resolution in rows:
      print(f"{name:<{width}}  {params:>13,}  {resolution:>10}")


if __name__ == "__main__":
  main()
