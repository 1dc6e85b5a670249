"""Evaluators: each reads what it needs from the model's `(logits, out)`, never its internals.

    run_evaluator('classification', model, params, dataset, batch_size=256)

The trainer runs the ones its task names (or `config.evaluators`, a dict
{name: options}) every `config.eval_every` steps; each is also a plain function
for notebooks and standalone evaluation. Evaluator modules are imported when first
named. Every evaluator has the signature

    evaluator(model, params, dataset, *, batch_size, batch_sharding=None, **options)
        -> {metric name: float}
"""

from vitjax import lazy
from vitjax.evaluate.classification import classification, evaluate_classification

# name -> "module:function", imported on first use.
EVALUATORS = {
    "classification": "vitjax.evaluate.classification:classification",
    "fewshot": "vitjax.evaluate.fewshot:fewshot",
    "linear_probe": "vitjax.evaluate.linear_probe:linear_probe",
    "knn": "vitjax.evaluate.knn:knn",
    "zeroshot": "vitjax.evaluate.zeroshot:zeroshot",
    "retrieval": "vitjax.evaluate.retrieval:retrieval",
    "reconstruction": "vitjax.evaluate.reconstruction:reconstruction",
    "generation": "vitjax.evaluate.generation:generation",
}


def get_evaluator(name):
  return lazy.resolve(EVALUATORS, name, "evaluator", "Use in config.evaluators")


def run_evaluator(name, model, params, dataset, *, batch_size, batch_sharding=None,
                  **options):
  """Runs evaluator `name`; returns its metrics {name: float}."""
  return get_evaluator(name)(model, params, dataset, batch_size=batch_size,
                             batch_sharding=batch_sharding, **options)


__all__ = ["EVALUATORS", "classification", "evaluate_classification", "get_evaluator",
           "run_evaluator"]
