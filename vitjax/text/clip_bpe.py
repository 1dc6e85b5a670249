"""OpenAI CLIP's byte-level BPE tokenizer, from the vocabulary files a user has.

    tokenizer = CLIPTokenizer.from_files("path/to/clip-vit-base-patch32")  # vocab.json + merges.txt
    tokenizer = CLIPTokenizer.from_files("bpe_simple_vocab_16e6.txt.gz")  # open_clip's
    ids = tokenizer.encode(["a photo of a cat"])  # [1, 77]: start, text, end, 0 ...

Published CLIP weights only make sense with the token ids they were trained on,
so zero-shot evaluation of converted CLIP checkpoints needs this tokenizer.
Nothing is downloaded: the files come with a Hugging Face CLIP checkpoint
(`vocab.json`, `merges.txt`) or inside the open_clip package
(`bpe_simple_vocab_16e6.txt.gz`, whose first 48,894 merges CLIP uses).

The text goes through what OpenAI's `clip.tokenize` does: ftfy's `fix_text` when
ftfy is installed (else Unicode NFC, the normalisation ftfy applies), HTML
entities unescaped, whitespace collapsed, lower case; it is split by CLIP's
pattern (contractions, runs of letters, single digits, runs of other symbols),
each piece's UTF-8 bytes are mapped to printable characters, and adjacent
symbols are merged by merge rank, '</w>' marking the end of a piece. Rows are
`<|startoftext|>` + tokens + `<|endoftext|>`, cut to `max_length` (the text is
cut, never the end token) and padded with 0, as `clip.tokenize` does. The
piece pattern needs the `regex` package (`\\p{L}`, `\\p{N}`).
"""

import functools
import gzip
import html
import json
import os
import unicodedata

import numpy as np

from vitjax.text.tokenizer import ByteTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_VOCAB_SIZE = 49408  # 256 bytes, 256 word-final bytes, 48,894 merges, 2 special tokens.
_PIECES = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
           r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


@functools.lru_cache(maxsize=None)
def byte_symbols():
  """The printable character that stands for each byte value (GPT-2's byte-level alphabet).

  Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
  themselves; the other 68 take the code points 256, 257, ... in byte order.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  symbols, spare = {}, 256
  for byte in range(256):
    if byte in printable:
      symbols[byte] = chr(byte)
    else:
      symbols[byte] = chr(spare)
      spare += 1
  return symbols


@functools.lru_cache(maxsize=None)
def _symbol_bytes():
  """The inverse of `byte_symbols`: printable character -> byte value."""
  return {symbol: byte for byte, symbol in byte_symbols().items()}


def _clean(text):
  """OpenAI's basic_clean + whitespace_clean + lower."""
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
    text = ftfy.fix_text(text)
  except ImportError:
    text = unicodedata.normalize("NFC", text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


class CLIPTokenizer(ByteTokenizer):
  """CLIP's BPE: `encode` gives int32 [N, max_length] rows, `decode` the texts back."""

  def __init__(self, vocab, merges, max_length=77, *, source="the given vocabulary"):
    """`vocab`: token -> id; `merges`: (left, right) symbol pairs, highest priority first."""
    try:
      import regex  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("CLIP's tokenizer splits text with Unicode classes that need the "
                        "regex package: pip install regex.") from None
    for special in (START, END):
      if special not in vocab:
        raise ValueError(f"{source} has no {special} token; is it a CLIP vocabulary?")
    missing = [s for s in byte_symbols().values() if s not in vocab]
    if missing:
      raise ValueError(f"{source} lacks {len(missing)} of the 256 byte symbols (e.g. "
                       f"{missing[0]!r}); it is not a byte-level BPE vocabulary.")
    self._vocab = dict(vocab)
    self._tokens = {i: token for token, i in self._vocab.items()}
    self._ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    self._pattern = regex.compile(_PIECES, regex.IGNORECASE)
    self._cache = {}
    self.bos_id, self.eos_id, self.pad_id = self._vocab[START], self._vocab[END], 0
    self.vocab_size = max(self._vocab.values()) + 1
    super().__init__(max_length, add_bos=True)

  @classmethod
  def from_files(cls, path, max_length=77, *, vocab_size=CLIP_VOCAB_SIZE):
    """From a directory (or file inside it) holding `vocab.json` and `merges.txt`, or
    from OpenAI's merges-only `bpe_simple_vocab_16e6.txt.gz`, whose vocabulary is built
    from its first `vocab_size - 514` merges (48,894 for CLIP) as OpenAI builds it."""
    path = os.fspath(path)
    if path.endswith(".gz"):
      return cls._from_openai_merges(path, max_length, vocab_size)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    for needed in (vocab_path, merges_path):
      if not os.path.isfile(needed):
        raise FileNotFoundError(
            f"No {os.path.basename(needed)} in {directory}: a CLIP tokenizer needs vocab.json "
            f"and merges.txt (as in a Hugging Face CLIP checkpoint) or OpenAI's "
            f"bpe_simple_vocab_16e6.txt.gz.")
    with open(vocab_path, encoding="utf-8") as f:
      try:
        vocab = json.load(f)
      except json.JSONDecodeError as error:
        raise ValueError(f"{vocab_path} is not valid JSON: {error}") from None
    with open(merges_path, encoding="utf-8") as f:
      merges = _parse_merges(f.read().splitlines(), merges_path)
    return cls(vocab, merges, max_length, source=directory)

  @classmethod
  def _from_openai_merges(cls, path, max_length, vocab_size):
    num_merges = vocab_size - 2 * 256 - 2
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    except (OSError, EOFError) as error:
      raise ValueError(f"Cannot read {path} as gzip-compressed text: {error}") from None
    merges = _parse_merges(lines[1:], path, first_line=2)  # Line 1 is a header, always.
    if len(merges) < num_merges:
      raise ValueError(f"{path} holds {len(merges)} merges; a vocabulary of {vocab_size} "
                       f"needs {num_merges}. Pass the vocab_size the model was trained with.")
    merges = merges[:num_merges]
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += [START, END]
    return cls({token: i for i, token in enumerate(tokens)}, merges, max_length, source=path)

  def _pieces(self, text):
    ids = []
    for piece in self._pattern.findall(_clean(text)):
      if piece in (START, END):  # Written out in a caption, as OpenAI's tokenizer allows.
        ids.append(self._vocab[piece])
        continue
      symbols = "".join(byte_symbols()[b] for b in piece.encode("utf-8"))
      ids.extend(self._vocab[token] for token in self._merge(symbols))
    return ids

  def _merge(self, symbols):
    """The BPE tokens of one piece: the best-ranked adjacent pair merged, everywhere
    left to right, until no adjacent pair is a merge."""
    if symbols in self._cache:
      return self._cache[symbols]
    word = list(symbols[:-1]) + [symbols[-1] + END_OF_WORD]
    unranked = len(self._ranks)
    while len(word) > 1:
      rank, left, right = min((self._ranks.get(pair, unranked), *pair)
                              for pair in zip(word, word[1:]))
      if rank == unranked:
        break
      merged, i = [], 0
      while i < len(word):
        if word[i] == left and i + 1 < len(word) and word[i + 1] == right:
          merged.append(left + right)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[symbols] = word
    return word

  def _decode_row(self, row):
    row = [int(t) for t in row]
    if self.eos_id in row:
      row = row[:row.index(self.eos_id)]
    text = "".join(self._tokens.get(t, "") for t in row if t not in (self.bos_id, self.eos_id))
    byte_of = _symbol_bytes()
    words = (bytes(byte_of[c] for c in word).decode("utf-8", errors="replace")
             for word in text.split(END_OF_WORD))
    return " ".join(word for word in words if word)


def _parse_merges(lines, path, first_line=1):
  """(left, right) pairs of a merges file, skipping a '#version' header and blank lines."""
  merges = []
  for number, line in enumerate(lines, first_line):
    if not line.strip() or (number == 1 and line.startswith("#")):
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}, line {number}: a merge is two symbols separated by a space, "
                       f"got {line!r}.")
    merges.append(tuple(parts))
  return merges
