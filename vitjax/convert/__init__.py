"""Weights in and out: big_vision/AugReg .npz, timm and HF transformers state dicts.

    params = load_weights(model, 'ViT-B_16.npz')                # or .safetensors, .pth, .bin
    params = load_weights(model, 'deit.pth', head='reinit')     # new classes: a fresh head
    save_weights(params, 'vit.npz')                             # big_vision layout
    save_weights(params, 'model.safetensors', format='hf')      # loads in transformers
    params = scan_params(params, depth=12)                      # stacked: scan_layers=True
    params = unscan_params(params)                              # one entry per block again
    params = load_weights(navit, 'model.safetensors')           # NaViT: SigLIP 2 NaFlex, timm
                                                                # NaFlexVit (convert.naflex)

Files are recognised by their contents and never unpickled.
"""

from vitjax.convert.big_vision import scan_params, unscan_params
from vitjax.convert.checkpoint import (CheckpointMismatchError, hf_config, load_weights,
                                       save_weights)
from vitjax.convert.files import CheckpointError
from vitjax.convert import naflex  # NaViT weights; load_weights dispatches to it.

__all__ = ["CheckpointError", "CheckpointMismatchError", "hf_config", "load_weights",
           "save_weights", "scan_params", "unscan_params"]
