"""Text for two-tower models: tokenizers (built-in bytes, or a SentencePiece file)."""

from vitjax.text.tokenizer import (BOS_ID, EOS_ID, PAD_ID, ByteTokenizer,
                                   SentencePieceTokenizer, get_tokenizer)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "ByteTokenizer", "SentencePieceTokenizer",
           "get_tokenizer"]
