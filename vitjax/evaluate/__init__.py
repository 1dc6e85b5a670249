"""Evaluators read what they need from the model's `(logits, out)`."""

from vitjax.evaluate.classification import evaluate_classification

__all__ = ["evaluate_classification"]
