"""DINOv2 (with and without registers) from Hugging Face transformers into the vitjax ViT.

A small randomly initialised transformers model is the oracle: its state dict,
saved as .safetensors, loads with `vitjax.load_weights` into the ViT built from
options (registers, LayerScale, patch 14, bicubic position-embedding resizing),
and the features agree within 1e-4 in float32.
"""

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import vitjax

WIDTH, DEPTH, HEADS, IMAGE = 32, 2, 2, 56


def _hf_model(registers):
  options = dict(image_size=IMAGE, patch_size=14, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                 num_attention_heads=HEADS, mlp_ratio=4, layer_norm_eps=1e-6)
  torch.manual_seed(0)
  if registers:
    model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        num_register_tokens=registers, **options))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**options))
  with torch.no_grad():  # Away from the ones/zeros inits, so every tensor matters.
    for tensor in model.state_dict().values():
      tensor.add_(0.1 * torch.randn_like(tensor))
  return model.eval()


@pytest.mark.parametrize("registers", [4, 0])
def test_dinov2_features_match_transformers(registers, tmp_path):
  hf = _hf_model(registers)
  path = tmp_path / "dinov2.safetensors"
  safetensors.numpy.save_file({k: v.numpy() for k, v in hf.state_dict().items()}, str(path))
  model = vitjax.create_model(
      "vit", width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=4 * WIDTH, patch_size=14,
      image_size=IMAGE, num_registers=registers, layer_scale_init=1.0, num_classes=0,
      # Dinov2WithRegisters resizes with torch's antialiased bicubic, plain Dinov2Model
      # with its default one (Keys a=-0.75, no antialiasing).
      posemb_resize="bicubic" if registers else "bicubic_no_antialias")
  params = vitjax.load_weights(model, path)
  apply = jax.jit(model.apply)
  # The native grid, and a smaller and a larger one: both sides then resize the
  # position embeddings.
  for size in (IMAGE, 28, 70):
    images = np.random.default_rng(size).standard_normal((2, size, size, 3), np.float32)
    with torch.no_grad():
      want = hf(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    _, out = apply({"params": params}, images)
    np.testing.assert_allclose(out["encoded"], want.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["pre_logits"], want.pooler_output.numpy(), atol=1e-4)
    assert out["registers"].shape == (2, registers, WIDTH)
