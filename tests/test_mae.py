"""MAE and SimMIM: parity with Hugging Face's ViTMAE, masking, losses, layer decay, training."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import config as config_lib
from vitjax import train as train_lib
from vitjax.train import checkpoints
from vitjax.models import mae
from vitjax.train import optim

TINY_ENCODER = dict(image_size=32, patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96)


def _hf_mae(norm_pix_loss):
  import torch  # The oracle: a failed import fails the test.
  import transformers  # The oracle: a failed import fails the test.
  torch.manual_seed(0)
  config = transformers.ViTMAEConfig(
      image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=96, decoder_hidden_size=32,
      decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=64,
      mask_ratio=0.75, norm_pix_loss=norm_pix_loss, layer_norm_eps=1e-6,
      attn_implementation="eager")
  model = transformers.ViTMAEForPreTraining(config).eval()
  with torch.no_grad():  # Random init leaves these at zero; make them count.
    for tensor in (model.decoder.mask_token, model.vit.embeddings.cls_token):
      tensor.normal_()
  return model


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_vitmae_parity_features_reconstruction_loss(tmp_path, norm_pix_loss):
  import torch  # The oracle: a failed import fails the test.
  import safetensors.torch as safetensors_torch  # The oracle: a failed import fails the test.
  hf = _hf_mae(norm_pix_loss)
  path = str(tmp_path / "mae.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, path)
  model = vitjax.create_model("mae", **TINY_ENCODER, decoder_width=32, decoder_depth=2,
                              decoder_num_heads=2, decoder_mlp_dim=64,
                              norm_pix_loss=norm_pix_loss)
  params = vitjax.load_weights(model, path)
  images = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
  noise = np.random.RandomState(1).rand(3, 16).astype(np.float32)
  with torch.no_grad():
    pixels, torch_noise = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(noise)
    expected = hf(pixels, noise=torch_noise)
    features = hf.vit(pixels, noise=torch_noise).last_hidden_state.numpy()
  predictions, out = model.apply({"params": params}, images, noise=noise)
  np.testing.assert_array_equal(out["mask"], expected.mask.numpy())
  np.testing.assert_allclose(out["encoded"], features, atol=1e-4, rtol=0)
  np.testing.assert_allclose(predictions, expected.logits.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["loss"], expected.loss.item(), atol=1e-4, rtol=1e-4)

  # The published position embeddings are MAE's sin-cos; HF's random init leaves zeros.
  np.testing.assert_allclose(mae.mae_sincos_2d(4, 4, 48)[0],
                             _hf_sincos(torch, 4, 48), atol=1e-6)
  # Fine-tuning: a plain ViT loading the same file is the MAE encoder on the whole image.
  vit = vitjax.create_model("vit", **TINY_ENCODER, num_classes=0)
  _, vit_out = vit.apply({"params": vitjax.load_weights(vit, path)}, images)
  none, mae_out = model.apply({"params": params}, images)
  assert none is None
  np.testing.assert_allclose(vit_out["pre_logits"], mae_out["pre_logits"], atol=1e-5)


def _hf_sincos(torch, grid, width):
  from transformers.models.vit_mae import modeling_vit_mae  # pylint: disable=g-import-not-at-top
  embedding = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid, grid, width,
                                                                      cls_token=True)
  half = width // 2  # HF rotates its halves into the published checkpoints' layout.
  return torch.cat([embedding[..., half:], embedding[..., :half]], -1).numpy()


def test_masking_keeps_round_n_visible_patches_per_example_and_varies():
  model = vitjax.create_model("mae", image_size=16, patch_size=4, width=32, depth=1,
                              num_heads=2, mlp_dim=64, decoder_width=32, decoder_depth=1,
                              decoder_num_heads=2, mask_ratio=0.6)
  params = vitjax.init_params(model)
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
  predictions, out = model.apply({"params": params}, images, train=True,
                                 rngs={"random": jax.random.PRNGKey(1)})
  visible = round(16 * (1 - 0.6))  # 6
  assert out["encoded"].shape == (8, 1 + visible, 32)
  np.testing.assert_array_equal(out["mask"].sum(axis=1), 16 - visible)
  assert len({tuple(row) for row in np.asarray(out["mask"])}) > 1
  assert predictions.shape == (8, 16, 4 * 4 * 3)
  # Another rng, another mask; the same rng, the same one.
  again = model.apply({"params": params}, images, train=True,
                      rngs={"random": jax.random.PRNGKey(1)})[1]["mask"]
  other = model.apply({"params": params}, images, train=True,
                      rngs={"random": jax.random.PRNGKey(2)})[1]["mask"]
  np.testing.assert_array_equal(again, out["mask"])
  assert not np.array_equal(other, out["mask"])
  with pytest.raises(ValueError, match="mask_ratio"):
    mae.num_visible(16, 1.0)


def test_loss_counts_masked_patches_only():
  rng = np.random.RandomState(0)
  predictions, targets = rng.randn(2, 16, 12), rng.randn(2, 16, 12)
  mask = (rng.rand(2, 16) < 0.75).astype(np.float32)
  loss = mae.masked_patch_loss(predictions, targets, mask)
  changed_visible = np.where(mask[..., None] == 0, 100.0, predictions)
  np.testing.assert_allclose(mae.masked_patch_loss(changed_visible, targets, mask), loss,
                             rtol=1e-6)
  changed_masked = np.where(mask[..., None] == 1, predictions + 1.0, predictions)
  assert abs(float(mae.masked_patch_loss(changed_masked, targets, mask)) - float(loss)) > 0.1
  expected = (((predictions - targets) ** 2).mean(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_simmim_against_numpy_reference():
  model = vitjax.create_model("simmim", image_size=16, patch_size=4, width=32, depth=1,
                              num_heads=2, mlp_dim=64, mask_patch_size=8, mask_ratio=0.6)
  params = vitjax.init_params(model)
  images = np.random.RandomState(0).randn(4, 16, 16, 3).astype(np.float32)
  mask = mae.block_mask(jax.random.PRNGKey(3), 4, 4, 2, 0.6)
  # Whole 8x8-pixel blocks (2x2 patches), ceil(4 * 0.6) = 3 of the 4, per example.
  cells = np.asarray(mask).reshape(4, 2, 2, 2, 2)
  assert (cells == cells[:, :, :1, :, :1]).all()
  np.testing.assert_array_equal(np.asarray(mask).sum(1), 3 * 4)
  predictions, out = model.apply({"params": params}, images, mask=mask)

  # Reference, in pixels: L1 over masked pixels and channels, as SimMIM's code computes it.
  predictions, mask = np.asarray(predictions), np.asarray(mask)
  reconstruction = np.zeros_like(images)
  pixel_mask = np.zeros(images.shape[:3] + (1,), np.float32)
  for n in range(16):
    row, column = divmod(n, 4)
    window = np.s_[:, row * 4:(row + 1) * 4, column * 4:(column + 1) * 4]
    reconstruction[window] = predictions[:, n].reshape(4, 4, 4, 3)
    pixel_mask[window] = mask[:, n, None, None, None]
  expected = (np.abs(reconstruction - images) * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
  np.testing.assert_allclose(out["loss"], expected, rtol=1e-4)
  # Masked patches enter the encoder as the mask token: their pixels do not matter.
  scrambled = images + 5.0 * np.repeat(np.repeat(mask.reshape(4, 4, 4), 4, 1), 4, 2)[..., None]
  np.testing.assert_allclose(model.apply({"params": params}, scrambled, mask=mask)[1]["encoded"],
                             out["encoded"], atol=1e-5)


def test_layer_decay_multipliers_and_composition_with_lr_multipliers():
  model = vitjax.create_model("vit", image_size=8, patch_size=4, width=32, depth=2,
                              num_heads=2, mlp_dim=64, num_classes=3)
  params = vitjax.init_params(model)
  factors = optim.layer_decay_multipliers(params, 0.5)
  assert factors["embedding"]["kernel"] == factors["cls"] == factors["pos_embedding"] == 0.125
  assert factors["Transformer"]["encoderblock_0"]["LayerNorm_0"]["scale"] == 0.25
  assert factors["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"] == 0.5
  assert factors["Transformer"]["encoder_norm"]["scale"] == factors["head"]["kernel"] == 1.0

  scanned = vitjax.create_model("vit", image_size=8, patch_size=4, width=32, depth=2,
                                num_heads=2, mlp_dim=64, num_classes=3, scan_layers=True)
  stacked = optim.layer_decay_multipliers(vitjax.init_params(scanned), 0.5)
  np.testing.assert_allclose(
      stacked["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].ravel(), [0.25, 0.5])

  # Through the optimizer: plain SGD's update is -lr * factor * gradient.
  config = config_lib.load_config("configs/mae_finetune_digits.py:scratch")
  config.unlock()
  config.optimizer.update(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=None,
                          warmup_steps=0, schedule="constant", learning_rate=1.0,
                          layer_decay=0.5, lr_multipliers=(("^head/", 3.0),))
  tx, _ = optim.make_optimizer(config, params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["cls"].ravel()[0]) == -0.125
  assert float(updates["Transformer"]["encoderblock_1"]["LayerNorm_1"]["bias"][0]) == -0.5
  assert float(updates["head"]["kernel"][0, 0]) == -3.0


def _tiny(config_spec, **model):
  config = config_lib.load_config(config_spec)
  config.unlock()
  config.model.update(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4,
                      **model)
  config.update(batch_size=16, eval_batch_size=180, total_steps=2, log_every=1, eval_every=0,
                checkpoint_every=0)
  config.optimizer.warmup_steps = 1
  return config


def test_mae_and_simmim_train_and_the_encoder_fine_tunes(tmp_path):
  png = str(tmp_path / "reconstruction.png")
  config = _tiny("configs/mae_digits.py", decoder_width=32, decoder_depth=1,
                 decoder_num_heads=2)
  config.evaluators = {"reconstruction": {"png_path": png}}
  workdir = str(tmp_path / "mae")
  result = train_lib.train(config, workdir, progress=False)
  assert np.isfinite(result["eval/reconstruction_loss"]) and os.path.getsize(png) > 0
  with open(result["metrics"]) as f:
    logged = [json.loads(line) for line in f]
  assert any(abs(r.get("train/masked_fraction", 0) - 0.75) < 1e-6 for r in logged)

  # A ViT of the encoder's size loads the workdir's encoder (fresh head), as fine-tuning does.
  vit = vitjax.create_model("vit", image_size=16, patch_size=4, width=32, depth=1,
                            num_heads=2, mlp_dim=64, num_classes=10)
  loaded = vitjax.load_weights(vit, workdir, head="reinit")
  trained = mae.encoder_params(checkpoints.load_params(workdir))
  np.testing.assert_array_equal(loaded["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]
                                ["kernel"], trained["Transformer"]["encoderblock_0"]["MlpBlock_0"]
                                ["Dense_0"]["kernel"])
  np.testing.assert_array_equal(loaded["pos_embedding"], trained["pos_embedding"])

  config = _tiny("configs/simmim_digits.py")
  assert config.task == "simmim" and config.model.mask_patch_size == 8
  config.evaluators = None  # The task's default: reconstruction.
  result = train_lib.train(config, str(tmp_path / "simmim"), progress=False)
  assert np.isfinite(result["eval/reconstruction_loss"])

  config.model.name = "mae"
  del config.model["mask_patch_size"]
  with pytest.raises(ValueError, match="trains a SimMIM"):
    train_lib.train(config, str(tmp_path / "wrong"), progress=False)
