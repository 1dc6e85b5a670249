"""WebDataset tar shards, img2dataset's output: `--config.dataset=wds:PATTERN`.

    --config.dataset='wds:/data/cc3m/{00000..00331}.tar'    (braces, as img2dataset names them)
    --config.dataset='wds:/data/laion/*.tar'                (or a glob)

A sample is the files of a shard that share a key (the path up to the first dot
of the file name): an image (`.jpg`, `.jpeg`, `.png` or `.webp`), and any of a
class label (`.cls`, an integer), a caption (`.txt`) and img2dataset's metadata
(`.json`, whose "caption" is used when there is no `.txt`).

Shards are indexed once when the dataset is opened (member offsets, read from
the tar headers; labels read then, captions when a sample is read), which gives
random access: every sample of every shard is a record index, so batches are
deterministic and resumable, and hosts read their own slices, as with TFDS.
The eval split is another pattern (`--config.eval_split='/data/val/*.tar'`) or a
slice of the training shards ('train[99%:]', with --config.train_split='train[:99%]').

A truncated shard (a download that stopped) is an error that names it, or, with
config.input.skip_bad_images, its readable samples are used and the cut-off ones
counted with the undecodable images.
"""

import dataclasses
import functools
import glob
import io
import json
import os
import re
import tarfile

import numpy as np
from PIL import Image

from vitjax.data import sources

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardError(ValueError):
  """No shards match the pattern, or a shard cannot be indexed."""


def expand_braces(pattern: str) -> list[str]:
  """'a{00..02}b{x,y}' -> a00bx, a00by, a01bx, ...: WebDataset's (and bash's) braces."""
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match is None:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numbers:
    first, last = numbers.groups()
    width = len(first) if first.startswith("0") else 0
    step = 1 if int(last) >= int(first) else -1
    choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
  else:
    choices = body.split(",")
  return [path for choice in choices for path in expand_braces(head + choice + tail)]


def is_pattern(split: str) -> bool:
  """Whether a split names shards ('/data/val/{0..9}.tar') rather than a slice ('train[99%:]')."""
  return ".tar" in split or os.sep in split or "*" in split


def shard_paths(pattern: str) -> list[str]:
  """The shard files of a brace / glob pattern that exist, in pattern order."""
  paths = []
  for expanded in expand_braces(os.path.expanduser(pattern)):
    matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else (
        [expanded] if os.path.isfile(expanded) else [])
    paths.extend(matches)
  if not paths:
    raise ShardError(f"No WebDataset shards match {pattern!r}: give a .tar file, a "
                     "brace pattern ('/data/{00000..00099}.tar') or a glob ('/data/*.tar').")
  return paths


@dataclasses.dataclass
class _Sample:
  shard: int
  image: tuple[int, int]  # (offset, size) of the image bytes in the shard.
  image_name: str
  caption: tuple[int, int, str] | None = None  # (offset, size, extension)
  label: int = -1


@functools.lru_cache(maxsize=4096)
def _index_shard(path: str, shard: int, skip_truncated: bool, size: int,
                 mtime_ns: int) -> tuple[list[_Sample], int]:
  """The samples of one shard in file order, and how many were cut off by truncation.

  Cached by the file's size and mtime: the config check and the trainer open the
  same shards seconds apart.
  """
  del mtime_ns  # Part of the cache key only.
  samples: dict[str, dict] = {}
  truncated = False
  try:
    with tarfile.open(path, "r:") as tar:
      for member in tar:
        if not member.isfile():
          continue
        directory, base = os.path.split(member.name)
        key, _, extension = base.partition(".")
        entry = samples.setdefault(os.path.join(directory, key), {})
        if member.offset_data + member.size > size:
          truncated = True
          entry["cut"] = True
          break
        entry[extension.lower()] = member
        if extension.lower() == "cls":
          entry["label"] = tar.extractfile(member).read()
  except tarfile.TarError as error:
    if "unexpected end" not in str(error) and "truncated" not in str(error):
      raise ShardError(f"Cannot read WebDataset shard {path!r}: {error}.") from None
    truncated = True
  if truncated and not skip_truncated:
    raise sources.BadImageError(
        f"WebDataset shard {path!r} is truncated (its last member ends past the end "
        f"of the file, {size} bytes). Download it again, or set "
        "config.input.skip_bad_images=True to use its complete samples and count the "
        "cut-off ones in dataset.bad_images_skipped.")
  indexed, cut = [], 0
  for key, entry in samples.items():
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in entry), None)
    if entry.get("cut") or image_ext is None:
      cut += 1 if entry.get("cut") or truncated else 0
      continue
    member = entry[image_ext]
    sample = _Sample(shard, (member.offset_data, member.size), f"{key}.{image_ext}")
    for ext in ("txt", "json"):
      if ext in entry:
        sample.caption = (entry[ext].offset_data, entry[ext].size, ext)
        break
    if "label" in entry:
      try:
        sample.label = int(entry["label"].decode().strip())
      except ValueError:
        raise ShardError(f"{path!r}: {key}.cls holds {entry['label'][:20]!r}, not an "
                         "integer class label.") from None
    indexed.append(sample)
  return indexed, cut


class WdsSplit(sources.RecordSource):
  """Samples of WebDataset shards, by record index (see the module docstring).

  Attributes:
    paths: the shard files.
    num_cut: samples lost to truncated shards (with skip_bad_images).
    has_labels, has_captions: every sample has a `.cls` / a caption.
  """

  def __init__(self, pattern: str, split: str = "train", *, image_size: int | None,
               num_classes: int | None = None, crop_pct: float = 1.0,
               interpolation: str = "bilinear", skip_bad_images: bool = False):
    _, spec = sources.parse_split(split)
    self.paths = shard_paths(pattern)
    samples, self.num_cut = [], 0
    for shard, path in enumerate(self.paths):
      stat = os.stat(path)
      indexed, cut = _index_shard(path, shard, skip_bad_images, stat.st_size, stat.st_mtime_ns)
      samples.extend(indexed)
      self.num_cut += cut
    samples = [samples[i] for i in sources.slice_indices(len(samples), spec, split)]
    if not samples:
      raise ShardError(f"The WebDataset shards {pattern!r} (split {split!r}) hold no "
                       f"samples with an image ({', '.join(IMAGE_EXTENSIONS)}).")
    if image_size is None:
      raise ShardError("WebDataset images differ in size: set config.input.image_size "
                       "(e.g. 224).")
    labels = np.asarray([sample.label for sample in samples], np.int64)
    self.has_labels = bool((labels >= 0).all())
    self.has_captions = all(sample.caption is not None for sample in samples)
    if num_classes is None:
      num_classes = int(labels.max()) + 1 if self.has_labels else 0
    super().__init__(name=f"wds:{pattern}", split=split, num_classes=num_classes,
                     image_size=image_size, channels=3, crop_pct=crop_pct,
                     interpolation=interpolation, skip_bad_images=skip_bad_images)
    self.pattern = pattern
    # Columns, not a list of objects: compact, and quick to pickle to worker processes.
    self._shard = np.asarray([sample.shard for sample in samples], np.int32)
    self._image = np.asarray([sample.image for sample in samples], np.int64)
    self._names = [sample.image_name for sample in samples]
    self._caption = np.asarray([sample.caption[:2] if sample.caption else (-1, 0)
                                for sample in samples], np.int64)
    self._caption_json = np.asarray([bool(sample.caption) and sample.caption[2] == "json"
                                     for sample in samples])
    self._labels = np.maximum(labels, 0).astype(np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  def _read_bytes(self, shard: int, offset: int, size: int) -> bytes:
    # A fresh handle per read: reads run in several threads (and processes).
    with open(self.paths[shard], "rb") as file:
      file.seek(offset)
      data = file.read(size)
    if len(data) != size:
      raise OSError(f"{self.paths[shard]} ends {size - len(data)} bytes early")
    return data

  def _where(self, index: int) -> str:
    return (f"sample {self._names[index]!r} of shard {self.paths[self._shard[index]]!r} "
            f"(record {index} of split {self.split!r})")

  def _record(self, index: int) -> tuple[np.ndarray, int]:
    data = self._read_bytes(self._shard[index], *self._image[index])
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB")), int(self._labels[index])

  def captions(self, indices: np.ndarray) -> list[str]:
    """The caption of each record (`.txt`, or the `.json`'s "caption"); '' if none."""
    texts = []
    for index in indices:
      offset, size = self._caption[index]
      if offset < 0:
        texts.append("")
        continue
      text = self._read_bytes(self._shard[index], offset, size).decode("utf-8", "replace")
      if self._caption_json[index]:
        text = str(json.loads(text).get("caption") or "")
      texts.append(text.strip())
    return texts
