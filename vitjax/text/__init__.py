"""Text for two-tower models: tokenizers (built-in bytes, a SentencePiece file, CLIP's BPE)."""

from vitjax.text.clip_bpe import CLIPTokenizer
from vitjax.text.tokenizer import (BOS_ID, EOS_ID, PAD_ID, ByteTokenizer,
                                   SentencePieceTokenizer, get_tokenizer)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "ByteTokenizer", "CLIPTokenizer",
           "SentencePieceTokenizer", "get_tokenizer"]
