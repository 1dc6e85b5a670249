"""Post-LayerNorm outlier channels, then post-training quantization with and without RepQ-ViT.

    python experiments/ptq_outliers.py WORKDIR [--factor 32] [--channels 0,1,2,3]

ViTs trained on ImageNet have a few post-LayerNorm channels with ranges tens of times the
others (RepQ-ViT's Figure 1); the digits models do not (their largest channel range is
1.6-2.4x the median). This script gives a trained model such channels without changing
its function: in every block, channel c of each LayerNorm's scale and bias is multiplied
by `factor` and row c of the kernels that read it (query, key, value; the MLP's first
layer) divided by it (a power of two keeps the float model bitwise the same). It then
prints the test top-1 of the float model and of w8a8, w4a8, w4a4 with and without
`vit_quantizers` (RepQ-ViT + the log2 attention quantizer), calibrated as
`python -m vitjax.tools.quantize` calibrates (4 training batches of 32).
Results: experiments/adapt_compress.md.
"""

import argparse

import flax
import jax.numpy as jnp
import numpy as np

from vitjax import evaluate
from vitjax import quantize
from vitjax.tools import quantize as quantize_tool


def with_outliers(params, factor, channels):
  """`params` whose post-LayerNorm `channels` are `factor` times larger, same function."""
  flat = {k: np.array(v) for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(params), sep="/").items()}
  for norm, consumers in quantize.layer_norm_consumers(params).items():
    for c in channels:
      flat[f"{norm}/scale"][c] *= factor
      flat[f"{norm}/bias"][c] *= factor
      for layer in consumers:
        flat[f"{layer}/kernel"][c] /= factor
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--factor", type=float, default=32.0)
  parser.add_argument("--channels", default="0,1,2,3")
  args = parser.parse_args()
  channels = [int(c) for c in args.channels.split(",")]
  tool_args = quantize_tool.parse_args([args.workdir, "--scheme", "w8a8"])
  model, params, config, _ = quantize_tool.from_workdir(tool_args)
  calibration = quantize_tool.calibration_images(config, tool_args)
  test = quantize_tool.split_dataset(config, config.get("eval_split") or "test")
  top1 = lambda m, p: evaluate.run_evaluator("classification", m, p, test,
                                             batch_size=360)["top1"]
  outlier = with_outliers(params, args.factor, channels)
  change = jnp.max(jnp.abs(model.apply({"params": params}, calibration[0])[0]
                           - model.apply({"params": outlier}, calibration[0])[0]))
  print(f"{args.workdir}: channels {channels} x{args.factor:g} after every LayerNorm; "
        f"float logits change by {float(change):.1e}")
  print(f"float            {top1(model, params):.4f} (with outliers {top1(model, outlier):.4f})")
  for scheme in ("w8a8", "w4a8", "w4a4"):
    for vit_quantizers in (False, True):
      qmodel, qparams = quantize.quantize(model, outlier, calibration, scheme=scheme,
                                          vit_quantizers=vit_quantizers)
      label = f"{scheme} {'+ vit quantizers' if vit_quantizers else ''}"
      print(f"{label:<24} {top1(qmodel, qparams):.4f}")


if __name__ == "__main__":
  main()
