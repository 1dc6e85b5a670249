"""vitjax's attention op: one function, several implementations."""

from vitjax.ops.attention import (IMPLEMENTATIONS, attention_weights, default_implementation,
                                  dot_product_attention, segment_mask)
from vitjax.ops.flash_attention import BlockSizes, flash_attention

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "attention_weights", "default_implementation",
           "dot_product_attention", "flash_attention", "segment_mask"]
