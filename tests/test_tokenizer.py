"""Tokenizers for the text tower: bytes round trip, padding, EOS, unicode, SentencePiece errors."""

import sys

import numpy as np
import pytest

from vitjax.text import EOS_ID, PAD_ID, ByteTokenizer, SentencePieceTokenizer, get_tokenizer


def test_byte_tokenizer_round_trip_with_eos_and_padding():
  tokenizer = ByteTokenizer(max_length=16)
  ids = tokenizer.encode(["a photo of a 7", ""])
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  assert list(ids[0, :3]) == [ord("a") + 3, ord(" ") + 3, ord("p") + 3]
  assert ids[0, 14] == EOS_ID and ids[0, 15] == PAD_ID  # 14 bytes, EOS, one pad.
  assert ids[1, 0] == EOS_ID and (ids[1, 1:] == PAD_ID).all()
  assert tokenizer.decode(ids) == ["a photo of a 7", ""]
  assert tokenizer.decode(tokenizer.encode("seven")) == "seven"  # One string: one row.


def test_byte_tokenizer_unicode_and_truncation_keep_eos():
  tokenizer = ByteTokenizer(max_length=8)
  text = "Ziffer 7 – sieben, 七"
  ids = tokenizer.encode([text])[0]
  assert ids[-1] == EOS_ID  # Cut to 7 bytes; EOS is never cut.
  assert tokenizer.decode(ids) == text.encode("utf-8")[:7].decode("utf-8")
  ids = ByteTokenizer(max_length=32).encode(["七 → 7"])
  assert ByteTokenizer(32).decode(ids) == ["七 → 7"]
  # A cut inside a multi-byte character drops the partial character.
  assert ByteTokenizer(max_length=3).decode(ByteTokenizer(3).encode(["七"])) == [""]
  assert ids.max() < ByteTokenizer.vocab_size == 259


def test_byte_tokenizer_bos_and_bad_input():
  tokenizer = ByteTokenizer(max_length=6, add_bos=True)
  ids = tokenizer.encode(["ab"])[0]
  assert list(ids) == [tokenizer.bos_id, ord("a") + 3, ord("b") + 3, EOS_ID, PAD_ID, PAD_ID]
  assert tokenizer.decode(ids) == "ab"
  with pytest.raises(ValueError, match="max_length"):
    ByteTokenizer(max_length=1)
  with pytest.raises(TypeError, match="str"):
    ByteTokenizer(8).encode([b"bytes"])


def test_sentencepiece_without_the_package_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # Import fails as if not installed.
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    SentencePieceTokenizer(str(tmp_path / "spm.model"))
  with pytest.raises(ValueError, match="Unknown tokenizer"):
    get_tokenizer("wordpiece")
  assert isinstance(get_tokenizer("bytes", 12), ByteTokenizer)
