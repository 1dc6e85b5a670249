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


# CLIP's byte-level BPE, against transformers' CLIPTokenizer built from the same files.

CORPUS = ("a photo of a cat . a photo of the digit seven . a blurry photo of a dog . "
          "the cat sat on the mat . there is a tattoo of a cat . photos of cats and dogs . "
          "it's a photograph of the number 7 . caf\u00e9 na\u00efve r\u00e9sum\u00e9 . "
          "\u6771\u4eac \u30bf\u30ef\u30fc") * 3


def train_merges(corpus, num_merges):
  """Merges learned by plain BPE on whitespace-split words, in CLIP's symbol alphabet."""
  from vitjax.text import clip_bpe  # pylint: disable=g-import-not-at-top
  symbols = clip_bpe.byte_symbols()
  words = {}
  for word in corpus.split():
    chars = [symbols[b] for b in word.encode("utf-8")]
    key = tuple(chars[:-1] + [chars[-1] + "</w>"])
    words[key] = words.get(key, 0) + 1
  merges = []
  for _ in range(num_merges):
    counts = {}
    for word, n in words.items():
      for pair in zip(word, word[1:]):
        counts[pair] = counts.get(pair, 0) + n
    if not counts:
      break
    best = max(sorted(counts), key=counts.get)
    merges.append(best)
    merged = {}
    for word, n in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] = merged.get(tuple(out), 0) + n
    words = merged
  return merges


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
  """A small CLIP vocabulary in both formats: vocab.json + merges.txt, and OpenAI's .gz."""
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from vitjax.text import clip_bpe  # pylint: disable=g-import-not-at-top
  merges = train_merges(CORPUS, 120)
  symbols = list(clip_bpe.byte_symbols().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  directory = tmp_path_factory.mktemp("clip_vocab")
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}),
                                        encoding="utf-8")
  merge_lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
  (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
  with gzip.open(directory / "bpe_simple_vocab.txt.gz", "wt", encoding="utf-8") as f:
    # OpenAI's file starts with a header line of its own, which its reader always skips.
    f.write("\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2'] + merge_lines[1:]) + "\n")
  return directory, len(tokens)


CLIP_TEXTS = [
    "a photo of a cat.", "A PHOTO   of\tthe digit 7!", "it's 2024: 3.14159 cats, they're ok",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9", "\u6771\u4eac\u30bf\u30ef\u30fc",
    "emoji \U0001f431\U0001f680 ok",
    "don't we'll I'm you've he'd", "photograph" * 30, "", "a cat <|endoftext|> a dog",
    "tattoos   of   cats...   ???", "e\u0301t\u00e9",  # Decomposed accent: NFC first.
]


def test_clip_bpe_matches_transformers(clip_files):
  import transformers  # The oracle: a failed import fails the test.
  from vitjax.text import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  directory, vocab_size = clip_files
  ours = CLIPTokenizer.from_files(directory, max_length=32)
  assert ours.vocab_size == vocab_size
  theirs = transformers.CLIPTokenizer.from_pretrained(str(directory))
  ids = ours.encode(CLIP_TEXTS)
  assert ids.shape == (len(CLIP_TEXTS), 32) and ids.dtype == np.int32
  for text, row in zip(CLIP_TEXTS, ids):
    expected = theirs(text, max_length=32, truncation=True)["input_ids"]
    end = len(row) - list(row[::-1]).index(ours.eos_id)  # After the final end token.
    assert list(row[:end]) == expected, text
    assert (row[end:] == 0).all()  # Padded with 0, as OpenAI's clip.tokenize.
  assert ids[7, -1] == ours.eos_id  # Cut text, never the end token.


def test_clip_bpe_openai_merges_file_and_decode(clip_files):
  from vitjax.text import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  directory, vocab_size = clip_files
  from_json = get_tokenizer(str(directory), max_length=24)
  from_gz = get_tokenizer(str(directory / "bpe_simple_vocab.txt.gz"), max_length=24,
                          vocab_size=vocab_size)
  assert isinstance(from_gz, CLIPTokenizer) and isinstance(from_json, CLIPTokenizer)
  np.testing.assert_array_equal(from_gz.encode(CLIP_TEXTS), from_json.encode(CLIP_TEXTS))
  ids = from_json.encode(["A photo of the  Cat!", "fish &amp; chips"])
  assert from_json.decode(ids) == ["a photo of the cat !", "fish & chips"]  # HTML unescaped.
  with pytest.raises(ValueError, match=f"needs {vocab_size + 10 - 514}"):
    get_tokenizer(str(directory / "bpe_simple_vocab.txt.gz"), vocab_size=vocab_size + 10)


def test_clip_bpe_bad_files_are_explained(tmp_path):
  from vitjax.text import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
    CLIPTokenizer.from_files(tmp_path)
  (tmp_path / "vocab.json").write_text('{"a": 0}')
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
  with pytest.raises(ValueError, match="no <\\|startoftext\\|> token"):
    CLIPTokenizer.from_files(tmp_path)
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(ValueError, match="line 2: a merge is two symbols"):
    CLIPTokenizer.from_files(tmp_path)
