"""Model soups: average the final weights of several runs of one model.

    python -m vitjax.tools.soup WORKDIR1 WORKDIR2 ... --recipe uniform|greedy --out soup.npz
        [--evaluator classification] [--split HELD_OUT_SPLIT]

Wortsman et al., "Model soups" (ICML 2022). The ingredients are the latest readable
checkpoints of training workdirs of the same model (fine-tuning runs from one
initialisation with other hyperparameters or seeds):

  uniform  the average of all of them;
  greedy   the ingredients sorted by their own held-out score, best first; each is
           added to the soup (a uniform average of those kept) only when the soup's
           held-out score strictly improves. (The paper keeps an ingredient when the
           score does not drop, >=; the strict rule keeps fewer on a small held-out
           set where ties are common.)

Scores are the first metric of `--evaluator` (classification: top-1). Greedy choices
are made on a held-out split, never on the reported one: `--split`, by default the rest
of the training split when the runs trained on a slice of it ('train[:90%]' holds out
'train[90%:]', as the digits configs can), else it must be given (e.g. 'validation'
for a TFDS dataset that has one). The table printed at the end gives every
ingredient's and the soup's held-out and reported scores (the config's `eval_split`).
The soup is written as a big_vision .npz that `vitjax.load_weights(model, path)` reads.

Exit status: 0 done; 2 bad input (fewer than two workdirs, a workdir without a config or
a checkpoint, workdirs of different models or data, an unknown evaluator, no held-out
split), one line on stderr, nothing written.
"""

import argparse
import os
import re
import sys

import numpy as np

RECIPES = ("uniform", "greedy")
# Config keys that must agree between ingredients: the parameters' names and shapes, and
# the data they are scored on. Hyperparameters (learning rate, seed, augmentation,
# dropout) may differ: that is what a soup mixes.
SAME_KEYS = ("model.", "task", "dataset", "data_dir", "eval_split", "input.image_size",
             "input.channels", "input.mean", "input.std", "input.crop_pct")


class SoupError(ValueError):
  """Ingredients that cannot be souped, or arguments that cannot be used; exit 2."""


# ---------------------------------------------------------------------------
# The recipes: pure functions of parameter trees and a scorer.


def uniform_soup(param_trees):
  """The element-wise mean of parameter trees of equal structure and shapes.

  Averaged in float64 and returned in each leaf's own dtype, so the result does not
  depend on the order of the ingredients.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not param_trees:
    raise SoupError("A soup needs at least one ingredient.")
  return jax.tree_util.tree_map(
      lambda *leaves: np.mean(np.stack([np.asarray(x, np.float64) for x in leaves]),
                              axis=0).astype(np.asarray(leaves[0]).dtype),
      *param_trees)


def greedy_soup(param_trees, scores, score):
  """Greedy soup: (soup params, kept indices, [(index, soup score with it, kept)]).

  Args:
    param_trees: the ingredients.
    scores: each ingredient's own held-out score (higher is better).
    score: params -> held-out score of a candidate soup.

  The best ingredient starts the soup; the others, in order of their own score, join
  only if the uniform average of the soup so far and the candidate scores strictly
  higher than the soup did.
  """
  order = sorted(range(len(param_trees)), key=lambda i: scores[i], reverse=True)
  kept = [order[0]]
  best = scores[order[0]]
  history = [(order[0], best, True)]
  for index in order[1:]:
    candidate = score(uniform_soup([param_trees[i] for i in kept + [index]]))
    improves = candidate > best
    history.append((index, candidate, improves))
    if improves:
      kept.append(index)
      best = candidate
  return uniform_soup([param_trees[i] for i in kept]), kept, history


def held_out_split(train_split):
  """The rest of 'train' when the runs trained on a one-sided slice of it, else None."""
  match = re.fullmatch(r"(\w+)\[:([^:\]]+)\]", train_split.replace(" ", ""))
  if match:
    return f"{match[1]}[{match[2]}:]"
  match = re.fullmatch(r"(\w+)\[([^:\]]+):\]", train_split.replace(" ", ""))
  if match:
    return f"{match[1]}[:{match[2]}]"
  return None


# ---------------------------------------------------------------------------
# Workdirs.


def read_config(workdir):
  """The workdir's config.json as a ConfigDict; SoupError if it has none."""
  from vitjax.train import resume  # pylint: disable=g-import-not-at-top
  from vitjax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  saved = resume.read_saved_config(workdir_lib.as_path(workdir))
  if saved is None:
    raise SoupError(f"{workdir}: no readable {resume.CONFIG_NAME}; is it a vitjax training "
                    "workdir?")
  return resume.as_config(saved)


def read_final_weights(workdir):
  """(step, params) of the workdir's latest readable checkpoint: the one place it is read."""
  from vitjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    return checkpoints.load_params_and_step(workdir)
  except checkpoints.CheckpointError as e:
    raise SoupError(f"{workdir}: {str(e).splitlines()[0]}") from None


def check_same_run_family(workdirs, configs):
  """SoupError naming the keys where a config differs from the first's."""
  from vitjax.train import resume  # pylint: disable=g-import-not-at-top
  matches = lambda key, patterns: any(
      key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)
  relevant = lambda config: {
      key: value for key, value in resume.flat_json(config).items()
      if matches(key, SAME_KEYS) and not matches(key, resume.COMPUTE_ONLY_KEYS)}
  first = relevant(configs[0])
  for workdir, config in zip(workdirs[1:], configs[1:]):
    other = relevant(config)
    differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
    if differing:
      shown = "; ".join(f"{k}: {first.get(k)!r} vs {other.get(k)!r}" for k in differing[:4])
      more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
      raise SoupError(f"{workdir} trained another model or data than {workdirs[0]}: "
                      f"{shown}{more}.")


def check_same_shapes(workdirs, param_trees):
  """SoupError naming the parameters whose names or shapes differ from the first's."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  shapes = lambda tree: {name: np.shape(x) for name, x in
                         traverse_util.flatten_dict(tree, sep="/").items()}
  first = shapes(param_trees[0])
  for workdir, tree in zip(workdirs[1:], param_trees[1:]):
    other = shapes(tree)
    differing = sorted(n for n in set(first) | set(other) if first.get(n) != other.get(n))
    if differing:
      shown = "; ".join(f"{n}: {first.get(n, 'absent')} vs {other.get(n, 'absent')}"
                        for n in differing[:4])
      more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
      raise SoupError(f"{workdir}'s parameters differ from {workdirs[0]}'s: {shown}{more}.")


# ---------------------------------------------------------------------------
# Command line.


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m vitjax.tools.soup", description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", help="training workdirs of the same model")
  parser.add_argument("--recipe", choices=RECIPES, required=True)
  parser.add_argument("--out", required=True, help="the soup's weights, a .npz")
  parser.add_argument("--evaluator", default="classification",
                      help="scores ingredients and soups; its first metric is the score")
  parser.add_argument("--split", help="held-out split for the greedy choices (default: the "
                      "rest of the training split, when the runs trained on a slice of it)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return _run(args)
  except SoupError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


def _check_arguments(args):
  if len(args.workdirs) < 2:
    raise SoupError(f"A soup needs at least two workdirs; got {len(args.workdirs)}.")
  paths = [os.path.realpath(w) for w in args.workdirs]
  for i, path in enumerate(paths):
    if path in paths[:i]:
      raise SoupError(f"{args.workdirs[i]} is given twice (it would weigh double).")
  if not args.out.endswith(".npz"):
    raise SoupError(f"--out {args.out}: the soup is written as a big_vision .npz; name it "
                    "'*.npz'.")
  from vitjax import evaluate  # pylint: disable=g-import-not-at-top
  try:
    evaluate.get_evaluator(args.evaluator)
  except ValueError as e:
    raise SoupError(f"--evaluator: {e}") from None


def _held_out(args, config):
  """The split greedy scores on, or None for a uniform soup without --split."""
  reported = config.get("eval_split") or "test"
  split = args.split
  if split is None and args.recipe == "greedy":
    split = held_out_split(config.get("train_split") or "train")
    if split is None:
      raise SoupError(
          f"A greedy soup needs a held-out split, and the runs trained on all of "
          f"{config.get('train_split') or 'train'!r}: pass --split (e.g. 'validation', if "
          f"the dataset has one), or train the runs on a slice such as 'train[:90%]' so "
          f"that 'train[90%:]' is held out.")
  if split is not None and split.replace(" ", "") == reported.replace(" ", ""):
    raise SoupError(f"--split {split} is the reported split (config.eval_split); choosing "
                    "ingredients on it would overstate the soup's score. Pass another split.")
  return split


def _run(args):
  _check_arguments(args)
  configs = [read_config(w) for w in args.workdirs]
  check_same_run_family(args.workdirs, configs)
  config = configs[0]
  held_out = _held_out(args, config)
  weights = [read_final_weights(w) for w in args.workdirs]
  steps, param_trees = [step for step, _ in weights], [params for _, params in weights]
  check_same_shapes(args.workdirs, param_trees)

  # Imported here so that bad arguments answer at once.
  from vitjax import convert  # pylint: disable=g-import-not-at-top
  from vitjax import data  # pylint: disable=g-import-not-at-top
  from vitjax import evaluate  # pylint: disable=g-import-not-at-top
  from vitjax.train import resume  # pylint: disable=g-import-not-at-top
  from vitjax.train import tasks  # pylint: disable=g-import-not-at-top

  try:
    model = tasks.make_task(config).build_model()
  except (TypeError, ValueError) as e:
    raise SoupError(f"{args.workdirs[0]}: its config.model cannot be built: "
                    f"{str(e).splitlines()[0]}") from None

  def dataset_for(split):
    copy = resume.as_config(config.to_dict())
    copy.eval_split = split
    try:
      return data.get_dataset(copy)
    except (ValueError, data.DatasetNotPreparedError) as e:
      raise SoupError(f"split {split!r}: {str(e).splitlines()[0]}") from None

  batch_size = config.get("eval_batch_size", config.get("batch_size", 256))
  reported_split = config.get("eval_split") or "test"
  datasets = {"reported": dataset_for(reported_split)}
  if held_out is not None:
    datasets["held_out"] = dataset_for(held_out)
  metric = {}

  def score(params, which):
    metrics = evaluate.run_evaluator(args.evaluator, model, params, datasets[which],
                                     batch_size=batch_size)
    metric.setdefault("name", next(iter(metrics)))
    return float(metrics[metric["name"]])

  columns = list(datasets)[::-1]  # Held-out first.
  rows = [{which: score(params, which) for which in columns} for params in param_trees]
  if args.recipe == "uniform":
    soup, kept = uniform_soup(param_trees), list(range(len(param_trees)))
  else:
    soup, kept, _ = greedy_soup(param_trees, [row["held_out"] for row in rows],
                                lambda params: score(params, "held_out"))
  soup_row = {which: score(soup, which) for which in columns}

  convert.save_weights(soup, args.out)
  titles = {"held_out": f"held-out {held_out}", "reported": f"reported {reported_split}"}
  header = ["ingredient", "step", "in soup"] + [f"{titles[c]} {metric['name']}"
                                                for c in columns]
  table = [[w, str(s), "yes" if i in kept else "no"] + [f"{row[c]:.4f}" for c in columns]
           for i, (w, s, row) in enumerate(zip(args.workdirs, steps, rows))]
  table.append([f"{args.recipe} soup", "", f"{len(kept)} of {len(param_trees)}"]
               + [f"{soup_row[c]:.4f}" for c in columns])
  widths = [max(len(line[i]) for line in [header] + table) for i in range(len(header))]
  for line in [header] + table:
    print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(line, widths))))
  print(f"soup: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
