"""Writes tests/data/timm_flexivit_pins.npz: a tiny timm FlexiViT, its input and its logits.

timm is not in vitjax's test extras, so its outputs are pinned. Generated with timm
1.0.31, torch 2.14.1 (CPU), numpy 2.4.6, in a separate virtualenv:

    /tmp/tvenv/bin/python tests/data/make_timm_flexivit_pins.py

The model is timm's VisionTransformer with the settings of its `flexivit_*` models
(class token, position embeddings of the patches only: no_embed_class=True), tiny:
32 px images, patch 8, width 32, depth 2, 2 heads, MLP 64, 10 classes, every
parameter drawn at random (seed 0). Its logits at patch 8, and at patches 4 and 16 the
way timm loads a FlexiViT state dict into a model of another patch size: the same
state dict through timm's `checkpoint_filter_fn` into the model built with that
patch_size, which resamples the patch embedding (`resample_patch_embed`: PI-resize,
bicubic, antialiased) and the position embeddings to the new grid
(`resample_abs_pos_embed`: bicubic, antialiased).

Keys: 'state_dict/NAME' (float32, timm names), 'images' (2, 3, 32, 32) NCHW,
'logits_p8', 'logits_p4', 'logits_p16' (2, 10).
"""

import os

import numpy as np
import timm
from timm.models import vision_transformer
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_flexivit_pins.npz")
TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10,
            no_embed_class=True)


def build(patch_size):
  return vision_transformer.VisionTransformer(patch_size=patch_size, **TINY).eval()


def main():
  assert timm.__version__ == "1.0.31", timm.__version__
  torch.manual_seed(0)
  model = build(8)
  with torch.no_grad():
    for parameter in model.parameters():  # Random everywhere, zero-initialised parts too.
      parameter.copy_(torch.randn_like(parameter) * 0.3)
  state_dict = {name: value.detach().clone() for name, value in model.state_dict().items()}
  images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  arrays = {f"state_dict/{name}": value.numpy().astype(np.float32)
            for name, value in state_dict.items()}
  arrays["images"] = images.numpy()
  with torch.no_grad():
    arrays["logits_p8"] = model(images).numpy()
    for patch_size in (4, 16):
      other = build(patch_size)
      other.load_state_dict(vision_transformer.checkpoint_filter_fn(dict(state_dict), other))
      arrays[f"logits_p{patch_size}"] = other(images).numpy()
  np.savez_compressed(OUT, **arrays)
  print(f"Wrote {OUT} ({os.path.getsize(OUT)} bytes):",
        {k: v.shape for k, v in arrays.items() if not k.startswith("state_dict/")})


if __name__ == "__main__":
  main()
