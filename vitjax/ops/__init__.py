"""vitjax's attention op: one function, several implementations."""

from vitjax.ops.attention import IMPLEMENTATIONS, attention_weights, dot_product_attention

__all__ = ["IMPLEMENTATIONS", "attention_weights", "dot_product_attention"]
