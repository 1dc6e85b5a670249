"""Image preprocessing as pure numpy functions on batches.

Every function takes and returns `images` of shape [N, H, W, C] (float32 unless
said otherwise), so the same code serves the input pipeline and a notebook. They
are deterministic: the random crop and flip are `crop` and `flip` given offsets
and flips that the pipeline draws from (seed, step).
"""

import math
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# ITU-R BT.601 luma weights, the usual RGB -> grayscale conversion.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


INTERPOLATIONS = ("bilinear", "bicubic")


def _cubic(distance: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys' cubic convolution kernel; a = -0.5 as in PIL (support 2)."""
  distance = np.abs(distance)
  near = ((a + 2) * distance - (a + 3)) * distance**2 + 1
  far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
  return np.where(distance <= 1, near, np.where(distance < 2, far, 0.0))


def _interpolation_matrix(input_size: int, output_size: int,
                          interpolation: str = "bilinear") -> np.ndarray:
  """[output_size, input_size] weights of a 1-D bilinear or bicubic resize.

  Pixel centers sit at half-integers. When downscaling, the kernel is
  stretched by the scale factor so that every input pixel contributes
  (antialiasing); when upscaling this is plain interpolation. Rows are
  normalized, so edge pixels are not darkened. Bilinear is the same resampling
  as `jax.image.resize(method='linear', antialias=True)`, bicubic the same as
  PIL's `Image.resize(..., Image.BICUBIC)` on float images.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not "
                     f"{interpolation!r}.")
  scale = output_size / input_size
  kernel_width = max(1.0 / scale, 1.0)
  # Position of each output pixel center in input pixel coordinates.
  sample = (np.arange(output_size) + 0.5) / scale - 0.5
  distance = np.abs(sample[:, None] - np.arange(input_size)[None, :])
  if interpolation == "bilinear":
    weights = np.maximum(0.0, 1.0 - distance / kernel_width)
  else:
    weights = _cubic(distance / kernel_width)
  weights /= weights.sum(axis=1, keepdims=True)
  return weights.astype(np.float32)


def resize(images: np.ndarray, size: int | tuple[int, int],
           interpolation: str = "bilinear") -> np.ndarray:
  """Bilinear (or bicubic) resize of [N, H, W, C] to float32 [N, size, size, C].

  `size` may also be a (height, width) pair.

  Separable: two small matrix products, so resizing all 1,797 digits from 8x8
  to 32x32 takes milliseconds. Antialiased when downscaling.
  """
  height, width = (size, size) if isinstance(size, int) else size
  images = np.asarray(images, np.float32)
  _, input_height, input_width, _ = images.shape
  if (input_height, input_width) == (height, width):
    return images
  rows = _interpolation_matrix(input_height, height, interpolation)
  columns = _interpolation_matrix(input_width, width, interpolation)
  # [H_out, H_in] @ [H_in, W_in] per image and channel, then [W_out, W_in] per row.
  # Stacked matmuls make one BLAS call per matrix, so an image's result does not
  # depend on the batch it is in (an einsum over the batch, folded into one matrix
  # product, gave other last bits for a half batch: hosts would disagree).
  images = np.matmul(rows, images.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
  return np.matmul(columns, images)


def resize_shorter_side_and_center_crop(
    images: np.ndarray, size: int, crop_pct: float = 1.0,
    interpolation: str = "bilinear") -> np.ndarray:
  """[N, H, W, C] -> [N, size, size, C]: evaluation preprocessing.

  The shorter side is resized to floor(size / crop_pct), then the middle
  [size, size] is cropped out: timm's eval transform, so that a published
  weight's crop_pct (0.875 for DeiT, 0.9 for AugReg ViTs) reproduces its
  accuracy. With crop_pct 1 square images are simply resized.
  """
  if not 0 < crop_pct <= 1:
    raise ValueError(f"crop_pct must be in (0, 1], not {crop_pct}.")
  height, width = images.shape[1:3]
  # The epsilon keeps e.g. 224 / 0.875 = 256 from flooring to 255.
  scale_size = max(size, math.floor(size / crop_pct + 1e-6))
  scale = scale_size / min(height, width)
  new_height = max(scale_size, round(height * scale))
  new_width = max(scale_size, round(width * scale))
  images = resize(images, (new_height, new_width), interpolation)
  top = (new_height - size) // 2
  left = (new_width - size) // 2
  return images[:, top:top + size, left:left + size]


def pad(images: np.ndarray, padding: int, mode: str = "constant") -> np.ndarray:
  """Pads height and width by `padding` pixels on every side.

  mode "constant" pads with zeros (black), "edge" repeats the border pixels.
  """
  if not padding:
    return images
  pad_width = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return np.pad(images, pad_width, mode=mode)


def crop(images: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
  """Crops a [size, size] window from each image, top-left corner at `offsets`.

  Args:
    images: [N, H, W, C].
    offsets: int [N, 2], the (top, left) corner of each window, in
      [0, H - size] x [0, W - size].
    size: side of the windows.

  Returns:
    [N, size, size, C].
  """
  # A strided view of every possible window, [N, H', W', C, size, size], then
  # one gather, not a Python loop of slice copies (BENCHMARKS.md, "Preprocessing").
  windows = sliding_window_view(images, (size, size), axis=(1, 2))
  crops = windows[np.arange(len(images)), offsets[:, 0], offsets[:, 1]]
  # The gather keeps the images' channels-last memory order, so for
  # contiguous input this makes no copy.
  return np.ascontiguousarray(np.moveaxis(crops, 1, -1))


def flip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Mirrors images left-right where the boolean [N] `flips` is True."""
  images = np.ascontiguousarray(images)
  # Viewing each pixel's channels as one opaque element lets numpy mirror whole
  # pixels instead of moving 3 channel values at a time (BENCHMARKS.md, "Preprocessing").
  pixels = images.view(np.dtype((np.void, images.shape[-1] * images.itemsize)))
  output = pixels.copy()
  output[flips] = pixels[flips, :, ::-1]
  return output.view(images.dtype).reshape(images.shape)


def normalize(images: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """(images - mean) / std per channel; a length-1 mean or std is broadcast."""
  width, channels = images.shape[-2:]
  mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
  scale = 1.0 / np.broadcast_to(np.asarray(std, np.float32), (channels,))
  # Broadcasting over a last axis of 3 runs numpy's inner loop 3 elements at a
  # time; constants tiled over whole rows of pixels run it a row at a time
  # (BENCHMARKS.md, "Preprocessing").
  rows = images.reshape(-1, width * channels)
  rows = (rows - np.tile(mean, width)) * np.tile(scale, width)
  return rows.reshape(images.shape)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """A decoded image as uint8 [H, W, C]: floats in [0, 1] and wider integers scaled."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype == np.uint8:
    return image
  if np.issubdtype(image.dtype, np.integer):
    image = image.astype(np.float32) / np.iinfo(image.dtype).max
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """Converts [..., C] images to `channels` channels.

  Grayscale is repeated to RGB so that models built for ImageNet apply
  unchanged; RGB becomes grayscale by luma; an alpha channel is dropped.
  """
  current = images.shape[-1]
  if current == channels:
    return images
  if current == 4:  # RGBA: drop alpha, then convert as RGB.
    return to_channels(images[..., :3], channels)
  if current == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if current == 3 and channels == 1:
    gray = images.astype(np.float32) @ _LUMA_WEIGHTS
    return gray[..., None]
  raise ValueError(f"Cannot convert {current} channels to {channels}.")
