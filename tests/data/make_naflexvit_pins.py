"""Writes tests/data/naflexvit_{gap,map,siglip,parfac}.npz: tiny random timm NaFlexVit pins.

    /tmp/tvenv/bin/python tests/data/make_naflexvit_pins.py   # from the repository root

Made with timm 1.0.31 and torch 2.14.1 (CPU). Each file holds a tiny NaFlexVit with
random weights (every parameter drawn, so each one's mapping is tested), a padded
batch of four images of different patch grids (smaller and larger than the 6 x 6
position-embedding grid, and equal to it) in timm's NaFlex form, and timm's outputs:

    state/NAME           the state dict, float32
    input/patches        (B, N, p*p*C) patches, channels last (timm's batch_patchify)
    input/patch_coord    (B, N, 2) (row, column), input/patch_valid (B, N)
    output/tokens        (B, N, width) forward_features' patch tokens (registers dropped)
    output/pre_logits    (B, width), output/logits (B, classes)
    timm_config          the NaFlexVitCfg overrides, JSON

All arrays load with np.load(..., allow_pickle=False). tests/test_navit.py converts
each with vitjax.load_weights and compares (1e-4).
"""

import json
import os

import numpy as np
import timm
import torch
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg, batch_patchify

PATCH = 4
GRIDS = ((3, 8), (6, 6), (8, 5), (2, 3))  # (rows, cols) of each image's patch grid.
COMMON = dict(patch_size=PATCH, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
              pos_embed_grid_size=(6, 6))
PINS = {
    # naflexvit_base_patch16_gap's options: LayerScale, 4 registers, avg pool + fc_norm.
    "gap": dict(init_values=1e-5, global_pool="avg", reg_tokens=2, fc_norm=True),
    # naflexvit_base_patch16_map's: LayerScale, 1 register, MAP pooling.
    "map": dict(init_values=1e-5, global_pool="map", reg_tokens=1),
    # naflexvit_base_patch16_siglip's: tanh GELU, MAP, bilinear position embeddings.
    "siglip": dict(act_layer="gelu_tanh", global_pool="map", pos_embed_interp_mode="bilinear"),
    # naflexvit_base_patch16_parfac_gap's: factorized tables, aspect-preserving resize.
    "parfac": dict(init_values=1e-5, global_pool="avg", reg_tokens=2, fc_norm=True,
                   pos_embed="factorized", pos_embed_ar_preserving=True),
}


def make(name, options, seed):
  torch.manual_seed(seed)
  model = NaFlexVit(NaFlexVitCfg(**COMMON, **options), num_classes=7).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight") or ".norm" in pname and pname.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_((0.5 if "pos_embed" in pname else 0.2) * torch.randn_like(p))
  rng = np.random.default_rng(seed)
  length = max(r * c for r, c in GRIDS)
  patches = np.zeros((len(GRIDS), length, PATCH * PATCH * 3), np.float32)
  coords = np.zeros((len(GRIDS), length, 2), np.int64)
  valid = np.zeros((len(GRIDS), length), bool)
  for i, (rows, cols) in enumerate(GRIDS):
    image = torch.from_numpy(rng.normal(size=(1, 3, rows * PATCH, cols * PATCH)).astype(np.float32))
    flat, grid = batch_patchify(image, (PATCH, PATCH))
    n = rows * cols
    patches[i, :n] = flat[0].numpy()
    coords[i, :n] = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"),
                             -1).reshape(-1, 2)
    valid[i, :n] = True
  batch = {"patches": torch.from_numpy(patches), "patch_coord": torch.from_numpy(coords),
           "patch_valid": torch.from_numpy(valid)}
  with torch.no_grad():
    features = model.forward_features(**batch)
    tokens = features["patches"][:, model.num_prefix_tokens:]
    pre_logits = model.forward_head(**features, pre_logits=True)
    logits = model(batch)
  arrays = {f"state/{k}": v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
  arrays.update({"input/patches": patches, "input/patch_coord": coords.astype(np.int32),
                 "input/patch_valid": valid, "output/tokens": tokens.numpy(),
                 "output/pre_logits": pre_logits.numpy(), "output/logits": logits.numpy(),
                 "timm_config": np.array(json.dumps({**COMMON, **options,
                                                     "timm": timm.__version__}))})
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"naflexvit_{name}.npz")
  np.savez(path, **arrays)
  print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
  for seed, (name, options) in enumerate(PINS.items()):
    make(name, options, seed)
