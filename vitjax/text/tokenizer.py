"""Tokenizers that turn captions into fixed-length int32 token ids, with no download.

    tokenizer = ByteTokenizer(max_length=16)
    ids = tokenizer.encode(["a photo of the digit 7", "ein Foto der Ziffer Sieben"])
    tokenizer.decode(ids)   # the texts back (cut to max_length - 1 bytes)

`ByteTokenizer` is built in: UTF-8 bytes shifted by the special tokens, so any
text in any script is representable. `SentencePieceTokenizer` reads a
SentencePiece model file a user has (e.g. the one published with SigLIP); it
needs `pip install sentencepiece`, imported only when used. CLIP's byte-level
BPE is `vitjax.text.clip_bpe.CLIPTokenizer`, from the vocabulary files of a CLIP
checkpoint.

Every row ends with EOS (the last position when the text fills the row: the
text is cut, never the EOS), then padding to `max_length`.
"""

import os

import numpy as np

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
_BYTE_OFFSET = 3  # Byte b is token b + 3.


class ByteTokenizer:
  """UTF-8 bytes + special tokens (pad 0, eos 1, bos 2); vocab_size 259."""

  pad_id = PAD_ID
  eos_id = EOS_ID
  bos_id = BOS_ID
  vocab_size = 256 + _BYTE_OFFSET

  def __init__(self, max_length=32, *, add_bos=False):
    minimum = 2 + int(add_bos)
    if max_length < minimum:
      raise ValueError(f"max_length={max_length} leaves no room for text: at least "
                       f"{minimum} positions are needed (BOS, EOS, one byte).")
    self.max_length = max_length
    self.add_bos = add_bos

  def _pieces(self, text):
    return [b + _BYTE_OFFSET for b in text.encode("utf-8")]

  def encode(self, texts):
    """int32 [len(texts), max_length] ids of a list of strings (or one string -> [max_length])."""
    if isinstance(texts, str):
      return self.encode([texts])[0]
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    room = self.max_length - 1 - int(self.add_bos)
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"Texts must be str; item {row} is {type(text).__name__}.")
      tokens = ([self.bos_id] if self.add_bos else []) + self._pieces(text)[:room] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
    return ids

  def decode(self, ids):
    """The texts of `ids` ([L] -> str, [N, L] -> list of str), up to the first EOS."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self._decode_row(ids)
    return [self._decode_row(row) for row in ids]

  def _decode_row(self, row):
    row = [int(t) for t in row]
    if self.eos_id in row:
      row = row[:row.index(self.eos_id)]
    data = bytes(t - _BYTE_OFFSET for t in row if t >= _BYTE_OFFSET)
    # A cut may split a multi-byte character; the partial one is dropped.
    return data.decode("utf-8", errors="ignore")


class SentencePieceTokenizer(ByteTokenizer):
  """A SentencePiece model file's tokenizer, padded and terminated like ByteTokenizer."""

  def __init__(self, model_path, max_length=64, *, add_bos=False):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
          f"Reading the SentencePiece model {model_path} needs the sentencepiece package: "
          "pip install sentencepiece. (vitjax.text.ByteTokenizer needs nothing.)") from None
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"No SentencePiece model file at {model_path}.")
    self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    self.pad_id = max(self._processor.pad_id(), 0)
    self.eos_id = self._processor.eos_id()
    self.bos_id = self._processor.bos_id()
    if self.eos_id < 0:
      raise ValueError(f"The SentencePiece model {model_path} defines no EOS token.")
    if add_bos and self.bos_id < 0:
      raise ValueError(f"add_bos=True, but the SentencePiece model {model_path} has no BOS.")
    self.vocab_size = self._processor.get_piece_size()
    super().__init__(max_length, add_bos=add_bos)

  def _pieces(self, text):
    return list(self._processor.encode(text))

  def _decode_row(self, row):
    row = [int(t) for t in row]
    if self.eos_id in row:
      row = row[:row.index(self.eos_id)]
    special = {self.pad_id, self.bos_id}
    return self._processor.decode([t for t in row if t not in special])

