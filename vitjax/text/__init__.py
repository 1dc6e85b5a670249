"""Text for two-tower models: tokenizers (built-in bytes, a SentencePiece file, CLIP's BPE)."""

import os

from vitjax.text.clip_bpe import CLIPTokenizer
from vitjax.text.tokenizer import (BOS_ID, EOS_ID, PAD_ID, ByteTokenizer,
                                   SentencePieceTokenizer)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "ByteTokenizer", "CLIPTokenizer",
           "SentencePieceTokenizer", "get_tokenizer"]


def get_tokenizer(name="bytes", max_length=32, **kwargs):
  """'bytes' (built in); the path of a SentencePiece .model file; or CLIP's BPE: a
  directory with vocab.json and merges.txt (or one of them), or OpenAI's
  bpe_simple_vocab_16e6.txt.gz."""
  if name in (None, "bytes"):
    return ByteTokenizer(max_length, **kwargs)
  path = str(name)
  if (path.endswith(".gz") or os.path.isdir(path)
      or os.path.basename(path) in ("vocab.json", "merges.txt")):
    return CLIPTokenizer.from_files(path, max_length, **kwargs)
  if path.endswith(".model") or os.path.isfile(path):
    return SentencePieceTokenizer(path, max_length, **kwargs)
  raise ValueError(f"Unknown tokenizer {name!r}: use 'bytes', the path of a SentencePiece "
                   ".model file, or CLIP's BPE files (a directory with vocab.json and "
                   "merges.txt, or bpe_simple_vocab_16e6.txt.gz).")
