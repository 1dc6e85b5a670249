"""vitjax's ops: attention (several implementations) and the dense layers' affine map."""

from vitjax.ops.attention import (AUTO_CHOICES, IMPLEMENTATIONS, attention_output,
                                  attention_weights, default_implementation,
                                  dot_product_attention, segment_mask)
from vitjax.ops.dense import dense
from vitjax.ops.flash_attention import BlockSizes, flash_attention

__all__ = ["AUTO_CHOICES", "IMPLEMENTATIONS", "BlockSizes", "attention_output",
           "attention_weights", "default_implementation", "dense", "dot_product_attention",
           "flash_attention", "segment_mask"]
