"""Image folders, ImageNet's usual layout: `--config.dataset=folder:PATH`.

    PATH/train/CLASS/*.jpg    (config.train_split, 'train' by default)
    PATH/val/CLASS/*.jpg      (config.eval_split, 'val' by default)

Classes are the sub-folders of the training split, sorted by name, and label i
is the i-th: torchvision's ImageFolder order, so labels agree with a PyTorch
run on the same folders. Within a class, files are sorted by path. Images may
have any size and aspect ratio; they are decoded with PIL and converted to RGB
(as torchvision's default loader does). A split may be sliced as in TFDS:
'train[:90%]', 'train[90%:]', 'val[:1000]'.
"""

import functools
import os

import numpy as np
from PIL import Image

from vitjax.data import sources

# torchvision's IMG_EXTENSIONS, compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                    ".webp")


class FolderError(ValueError):
  """The folder, a split of it, or its classes are not where the config says."""


def find_classes(directory: str) -> list[str]:
  """The class names of a split folder: its sub-folders, sorted (ImageFolder's order)."""
  return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


# TFDS's split names and the usual folder names of the same splits.
_ALIASES = {"validation": ("val", "valid"), "val": ("validation", "valid")}


def _split_dir(root: str, split_name: str) -> str:
  directory = os.path.join(root, split_name)
  for alias in _ALIASES.get(split_name, ()):
    if not os.path.isdir(directory) and os.path.isdir(os.path.join(root, alias)):
      directory = os.path.join(root, alias)
  if not os.path.isdir(directory):
    present = (sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
               if os.path.isdir(root) else None)
    if present is None:
      raise FolderError(f"Image folder {root!r} does not exist. config.dataset="
                        "'folder:PATH' wants PATH/train/CLASS/*.jpg and "
                        "PATH/val/CLASS/*.jpg.")
    raise FolderError(
        f"Image folder {root!r} has no split folder {split_name!r} (it has "
        f"{present or 'no sub-folders'}). Set config.train_split / config.eval_split "
        "to one of them, e.g. --config.eval_split=val.")
  return directory


def _list_images(directory: str, classes: list[str]) -> tuple[list[str], list[int]]:
  """Relative paths ('CLASS/sub/x.jpg') and labels of every image, class by class."""
  # The config check and the trainer open the same folders seconds apart: list once.
  # A file added to or removed from a class folder changes the folder's mtime.
  stamps = tuple(os.stat(path).st_mtime_ns if os.path.isdir(path) else -1
                 for path in (os.path.join(directory, name) for name in classes))
  return _list_images_cached(directory, tuple(classes), stamps)


@functools.lru_cache(maxsize=8)
def _list_images_cached(directory: str, classes: tuple[str, ...],
                        stamps: tuple[int, ...]) -> tuple[list[str], list[int]]:
  del stamps  # Part of the cache key only.
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(directory, name)
    for folder, _, files in sorted(os.walk(class_dir, followlinks=True)):
      for file in sorted(files):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.relpath(os.path.join(folder, file), directory))
          labels.append(label)
  return paths, labels


class FolderSplit(sources.RecordSource):
  """One split of an image folder, by record index.

  `classes` fixes the label of each class name: the training split's classes,
  so that every split labels alike (a class folder the training split lacks is
  an error, not a shifted label).
  """

  def __init__(self, root: str, split: str, *, image_size: int | None,
               classes: list[str] | None = None, crop_pct: float = 1.0,
               interpolation: str = "bilinear", skip_bad_images: bool = False):
    split_name, spec = sources.parse_split(split)
    directory = _split_dir(root, split_name)
    own_classes = find_classes(directory)
    if classes is None:
      classes = own_classes
    unknown = sorted(set(own_classes) - set(classes))
    if unknown:
      raise FolderError(
          f"Split {split_name!r} of image folder {root!r} has class folders the "
          f"training split lacks: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}. "
          "Every split needs the training split's class names.")
    if not classes:
      raise FolderError(f"{directory!r} has no class folders; config.dataset="
                        "'folder:PATH' wants PATH/SPLIT/CLASS/*.jpg.")
    if image_size is None:
      raise FolderError("Images in a folder differ in size: set "
                        "config.input.image_size (e.g. 224).")
    paths, labels = _list_images(directory, classes)
    kept = sources.slice_indices(len(paths), spec, split)
    if not len(kept):
      raise FolderError(
          f"Split {split!r} of image folder {root!r} holds no images (looked for "
          f"{', '.join(IMAGE_EXTENSIONS)} under {directory}/CLASS/).")
    super().__init__(name=f"folder:{root}", split=split, num_classes=len(classes),
                     image_size=image_size, channels=3, crop_pct=crop_pct,
                     interpolation=interpolation, skip_bad_images=skip_bad_images)
    self.root = root
    self.directory = directory
    self.classes = list(classes)
    # Paths as one byte string and offsets, not a list of str: a tenth of the
    # memory for ImageNet's 1.28M files, and quick to pickle for worker processes.
    encoded = [paths[i].encode() for i in kept]
    self._offsets = np.cumsum([0] + [len(path) for path in encoded])
    self._paths = b"".join(encoded)
    self._labels = np.asarray([labels[i] for i in kept], np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  def path(self, index: int) -> str:
    """The file of record `index`."""
    start, stop = self._offsets[index], self._offsets[index + 1]
    return os.path.join(self.directory, self._paths[start:stop].decode())

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  def _where(self, index: int) -> str:
    return f"image {self.path(index)!r} (record {index} of split {self.split!r})"

  def _record(self, index: int) -> tuple[np.ndarray, int]:
    with Image.open(self.path(index)) as image:
      return np.asarray(image.convert("RGB")), int(self._labels[index])
