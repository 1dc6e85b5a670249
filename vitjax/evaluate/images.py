"""Pictures of images: a grid of samples as a PNG (one per evaluation of a generator).

    save_image_grid('samples/step_10000.png', samples, nrow=8)

Laid out as torchvision's `make_grid`: `nrow` images per row, `padding` pixels
between them and around the edge.
"""

import os

import numpy as np


def image_grid(images, nrow=8, *, padding=2, value_range=None, pad_value=0.0):
  """uint8 [rows * (H + padding) + padding, columns * (W + padding) + padding, C] grid.

  Args:
    images: [N, H, W, C] (C 1 or 3) or [N, H, W] floats, or uint8.
    nrow: images per row (fewer columns when there are fewer images).
    padding: pixels between images and around the edge.
    value_range: (low, high) of the images, mapped to black and white and clipped.
      None: (0, 255) for uint8, else (-1, 1) if any value is negative, else (0, 1);
      pass it when the range is known (samples in [-1, 1] need not reach below 0).
    pad_value: the padding's grey level in [0, 1].
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise ValueError(f"A grid takes images [N, H, W, C] with N >= 1 and C 1 or 3; got shape "
                     f"{images.shape}.")
  if value_range is None:
    if images.dtype == np.uint8:
      value_range = (0, 255)
    else:
      value_range = (-1.0, 1.0) if images.min() < 0 else (0.0, 1.0)
  low, high = (float(v) for v in value_range)
  images = np.clip((images.astype(np.float32) - low) / (high - low), 0.0, 1.0)
  count, height, width, channels = images.shape
  columns = min(nrow, count)
  rows = -(-count // columns)
  grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding,
                  channels), pad_value, np.float32)
  for index, image in enumerate(images):
    top = padding + (index // columns) * (height + padding)
    left = padding + (index % columns) * (width + padding)
    grid[top:top + height, left:left + width] = image
  return (grid * 255).round().astype(np.uint8)


def save_image_grid(path, images, nrow=8, **options):
  """Writes `image_grid(images, nrow, **options)` to `path` as a PNG; returns `path`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = image_grid(images, nrow, **options)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")
  return path
