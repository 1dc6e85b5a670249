r"""Input images/s of a config's training pipeline, on its own (no model, no trainer).

    python -m vitjax.data.throughput --config configs/quickstart.py
    python -m vitjax.data.throughput --config configs/imagenet.py --jpegs 512 \
        --batch_size 128 --steps 10

`--jpegs N` builds (once, in --jpeg_dir) a small TFDS dataset of N random-content
JPEGs at ImageNet's typical 500x375 and reads it instead of the config's dataset,
so ImageNet's decode + augmentation cost is measured without ImageNet.
`--mock N` reads `tfds.testing.mock_data` instead (tiny random images: measures
the pipeline's overhead, not decoding). Any `--config.key=value` overrides apply.
"""

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np


def _jpeg_builder_class():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  class VitjaxThroughputJpegs(tfds.core.GeneratorBasedBuilder):
    """Random smooth-noise JPEGs, 500x375 (landscape) or 375x500, 1000 classes."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []

    def __init__(self, *, num_examples=512, **kwargs):
      self._num_examples = num_examples
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3),
                                           encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=1000),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(self._num_examples),
              "validation": self._generate_examples(64)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(0)
      for index in range(count):
        # Upsampled noise compresses about like a photograph (~100 KB).
        coarse = rng.integers(0, 256, (48, 64, 3), np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        if index % 4 == 3:
          image = image.transpose(Image.ROTATE_90)
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=90)
        encoded.seek(0)  # Stored as these bytes: no TensorFlow needed.
        yield index, {"image": encoded, "label": index % 1000}

  return VitjaxThroughputJpegs


def measure(dataset, batch_size: int, steps: int, seed: int = 0) -> dict:
  """Images/s of `steps` training batches after one warm-up batch."""
  iterator = dataset.train_iter(batch_size, seed=seed)
  next(iterator)  # Threads start, files open, caches fill.
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  seconds = time.perf_counter() - start
  return {"images_per_second": steps * batch_size / seconds,
          "seconds_per_batch": seconds / steps}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch_size", type=int, default=None,
                      help="default: the config's batch_size")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--jpegs", type=int, default=0)
  parser.add_argument("--jpeg_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "vitjax_throughput"))
  parser.add_argument("--mock", type=int, default=0)
  args, overrides = parser.parse_known_args(argv)

  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vitjax import data  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(args.config)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  config_lib.apply_overrides(config, [o[len("--config."):] for o in overrides])
  batch_size = args.batch_size or config.batch_size

  if args.jpegs:
    builder = _jpeg_builder_class()(num_examples=args.jpegs, data_dir=args.jpeg_dir,
                                    file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare()
    config.dataset, config.data_dir = builder.name, args.jpeg_dir
    config.train_split, config.eval_split = "train", "validation"
  if args.mock:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=args.mock):
      dataset = data.get_dataset(config)
      result = measure(dataset, batch_size, args.steps)
  else:
    dataset = data.get_dataset(config)
    result = measure(dataset, batch_size, args.steps)
  print(f"{config.dataset}: {dataset.image_shape} batch {batch_size}, "
        f"{args.steps} batches, {os.cpu_count()} CPUs: "
        f"{result['images_per_second']:,.0f} images/s "
        f"({1000 * result['seconds_per_batch']:.1f} ms per batch)")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
