"""The Stable Diffusion VAE against diffusers' AutoencoderKL, the oracle, and its weight loading.

A small diffusers AutoencoderKL with every parameter random (norm scales and biases
too) is saved with save_pretrained and loaded by vitjax; the encoder's posterior, the
decoder and the whole forward pass must agree to 1e-4 in float32.
"""

import json
import shutil

import diffusers
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vitjax.convert import vae as convert_vae
from vitjax.convert.files import CheckpointError
from vitjax.convert.mismatch import CheckpointMismatchError
from vitjax.models import vae

SMALL = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
             latent_channels=4, sample_size=32)
SD_PARAMS = 83_653_863  # diffusers' AutoencoderKL with Stable Diffusion's config.


def _key(seed):
  # XLA's RNG: compiles in a fraction of threefry's (default) seconds on the CPU.
  return jax.random.key(seed, impl="rbg")


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
  """(diffusers model, its save_pretrained directory, NHWC test images)."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**SMALL).eval()
  with torch.no_grad():  # Defaults leave norms at 1 and biases at 0: make nothing trivial.
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
      else:
        p.add_(0.02 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("vae") / "small"
  model.save_pretrained(directory)
  # Not square, to catch a height/width swap.
  images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
  return model, directory, images


@pytest.fixture(scope="module")
def loaded(oracle):
  return convert_vae.load_diffusers_vae(oracle[1])


def test_encoder_decoder_and_forward_match_diffusers(oracle, loaded):
  torch_vae, _, images = oracle
  model, params = loaded
  assert model.block_out_channels == (32, 64) and model.norm_num_groups == 8

  # The decoder on latents of its own, of the size of SD's unscaled ones (std ~ 1 / 0.18).
  latents_in = np.random.RandomState(1).normal(0, 5, (2, 16, 12, 4)).astype(np.float32)

  @jax.jit
  def run(params, images, latents_in):
    variables = {"params": params}
    posterior = model.apply(variables, images, method="encode")
    decoded = model.apply(variables, latents_in, method="decode")
    reconstruction, out = model.apply(variables, images)
    return posterior, posterior.kl(), decoded, reconstruction, out["latents"]

  posterior, kl, decoded, reconstruction, latents = run(params, images, latents_in)
  with torch.no_grad():
    expected = torch_vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
    expected_decoded = torch_vae.decode(torch.from_numpy(latents_in.transpose(0, 3, 1, 2))).sample
    expected_forward = torch_vae(torch.from_numpy(images.transpose(0, 3, 1, 2))).sample
  assert posterior.mean.shape == (2, 16, 12, 4)
  np.testing.assert_allclose(posterior.mean, _nhwc(expected.mean), atol=1e-4, rtol=0)
  np.testing.assert_allclose(posterior.logvar, _nhwc(expected.logvar), atol=1e-4, rtol=0)
  np.testing.assert_allclose(kl, expected.kl().numpy(), rtol=1e-4)
  assert decoded.shape == images.shape
  assert np.abs(decoded).max() > 0.5  # Outputs of some size, not a near-zero match.
  np.testing.assert_allclose(decoded, _nhwc(expected_decoded), atol=1e-4, rtol=0)
  np.testing.assert_allclose(reconstruction, _nhwc(expected_forward), atol=1e-4, rtol=0)
  np.testing.assert_array_equal(latents, posterior.mean)  # The mode, without sample_posterior.


def test_posterior_sample_kl_and_mode():
  mean = np.array([[[[0.5, -1.0]]]], np.float32)
  posterior = vae.DiagonalGaussian(mean, np.log(np.array([[[[4.0, 0.25]]]], np.float32)))
  noise = jax.random.normal(_key(0), mean.shape)
  np.testing.assert_allclose(posterior.sample(_key(0)),
                             mean + np.array([2.0, 0.5]) * noise, rtol=1e-6)
  assert posterior.mode() is mean
  # 0.5 * sum(mean^2 + var - 1 - log var), per example.
  expected = 0.5 * (0.25 + 4 - 1 - np.log(4) + 1 + 0.25 - 1 - np.log(0.25))
  np.testing.assert_allclose(posterior.kl(), [expected], rtol=1e-6)


def test_sample_posterior_decodes_a_sample():
  model = vae.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, sample_size=16)
  rng = np.random.RandomState(0)  # Random parameters without compiling model.init.
  params = traverse_util.unflatten_dict(
      {name: rng.normal(0, 0.3, t.shape).astype(np.float32)
       for name, t in convert_vae.param_template(model).items()}, sep="/")
  images = rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)

  @jax.jit
  def run(params, images):
    variables = {"params": params}
    posterior = model.apply(variables, images, method="encode")
    reconstruction, out = model.apply(variables, images, sample_posterior=True,
                                      rngs={"sample": _key(1)})
    return posterior, out["latents"], reconstruction, model.apply(variables, out["latents"],
                                                                  method="decode")

  posterior, latents, reconstruction, decoded = run(params, images)
  np.testing.assert_allclose(reconstruction, decoded, atol=1e-6)
  noise = (latents - posterior.mean) / posterior.std  # Standard normal: 4096 draws.
  assert abs(float(noise.mean())) < 0.1 and 0.9 < float(noise.std()) < 1.1


def test_latent_scaling_round_trip():
  z = np.random.RandomState(0).normal(0, 5, (2, 4, 4, 4)).astype(np.float32)
  sd = vae.AutoencoderKL(**vae.CONFIGS["sd_vae"])  # Unbound: scaling needs no parameters.
  np.testing.assert_allclose(sd.scale(z), z * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(sd.unscale(sd.scale(z)), z, rtol=1e-5, atol=1e-6)
  assert vae.AutoencoderKL(**vae.CONFIGS["sdxl_vae"]).scaling_factor == 0.13025
  shifted = vae.AutoencoderKL(scaling_factor=0.3611, shift_factor=0.1159)  # SD3's values.
  np.testing.assert_allclose(shifted.scale(z), (z - 0.1159) * 0.3611, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(shifted.unscale(shifted.scale(z)), z, rtol=1e-5, atol=1e-5)


def test_sd_config_has_diffusers_parameters_names_and_shapes():
  model = vae.AutoencoderKL(**vae.CONFIGS["sd_vae"])
  assert model.downsample_factor == 8
  template = convert_vae.param_template(model)  # jax.eval_shape: nothing is allocated.
  assert sum(int(np.prod(t.shape)) for t in template.values()) == SD_PARAMS
  with torch.device("meta"):  # Shapes only.
    torch_vae = diffusers.AutoencoderKL(**vae.to_diffusers_config(model))
  assert sum(p.numel() for p in torch_vae.parameters()) == SD_PARAMS
  # Every diffusers name lands on a vitjax parameter of the right shape, and back.
  fake = {name: np.broadcast_to(np.float32(0), tuple(t.shape))
          for name, t in torch_vae.state_dict().items()}
  params = convert_vae.to_vitjax(fake)
  assert {n: p.shape for n, p in params.items()} == {n: t.shape for n, t in template.items()}
  assert set(convert_vae.from_vitjax(params)) == set(fake)
  config = dict(torch_vae.config)
  assert vae.from_diffusers_config(config) == model


@pytest.mark.parametrize("options", [dict(mid_block_add_attention=False),
                                     dict(use_quant_conv=False, use_post_quant_conv=False),
                                     dict(in_channels=1, out_channels=2, latent_channels=16)])
def test_config_options_give_diffusers_parameters(options):
  model = vae.from_diffusers_config({**SMALL, **options})
  with torch.device("meta"):
    torch_vae = diffusers.AutoencoderKL(**{**SMALL, **options})
  fake = {name: np.broadcast_to(np.float32(0), tuple(t.shape))
          for name, t in torch_vae.state_dict().items()}
  assert ({n: p.shape for n, p in convert_vae.to_vitjax(fake).items()}
          == {n: t.shape for n, t in convert_vae.param_template(model).items()})


def test_save_diffusers_vae_loads_in_diffusers(oracle, loaded, tmp_path):
  torch_vae, _, _ = oracle
  model, params = loaded
  convert_vae.save_diffusers_vae(model, params, tmp_path / "out")
  reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out")
  expected = torch_vae.state_dict()
  assert set(reloaded.state_dict()) == set(expected)
  for name, tensor in reloaded.state_dict().items():
    torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
  # A pipeline's directory: the VAE in vae/.
  shutil.copytree(tmp_path / "out", tmp_path / "pipeline" / "vae")
  again, again_params = convert_vae.load_diffusers_vae(tmp_path / "pipeline")
  assert again == model
  jax.tree_util.tree_map(np.testing.assert_array_equal, again_params, params)


def test_older_attention_names_load(oracle, loaded):
  """The hub's sd-vae-ft-* files name the attention query/key/value/proj_attn."""
  torch_vae, _, _ = oracle
  model, params = loaded
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for name, tensor in torch_vae.state_dict().items():
    for new_name, old_name in renames.items():
      name = name.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
    array = tensor.numpy()
    if ".attentions.0." in name and "group_norm" not in name and array.ndim == 2:
      array = array[:, :, None, None]  # And as 1x1 convolutions, as older conversions did.
    old[f"vae.{name}"] = array  # In a wrapper, as a pipeline's state dict has it.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         convert_vae.load_vae_state_dict(model, old), params)


def test_mismatched_checkpoint_says_what_differs(oracle):
  state_dict = {k: v.numpy() for k, v in oracle[0].state_dict().items()}
  deeper = vae.AutoencoderKL(**{**vae.config_from_diffusers(SMALL), "layers_per_block": 2})
  with pytest.raises(CheckpointMismatchError) as error:
    convert_vae.load_vae_state_dict(deeper, state_dict)
  message = str(error.value)
  assert "Missing (in the model, not in the checkpoint)" in message
  assert "encoder/down_blocks_0/resnets_1/conv1/kernel (3, 3, 32, 32)" in message
  assert "layers_per_block=1; the model layers_per_block=2" in message

  wider = vae.AutoencoderKL(**{**vae.config_from_diffusers(SMALL),
                               "block_out_channels": (32, 128)})
  with pytest.raises(CheckpointMismatchError) as error:
    convert_vae.load_vae_state_dict(wider, state_dict)
  message = str(error.value)
  assert "Shapes differ" in message
  assert "decoder/conv_in/kernel: checkpoint (3, 3, 4, 64), model (3, 3, 4, 128)" in message
  assert "block_out_channels=(32, 64); the model block_out_channels=(32, 128)" in message


def test_directory_whose_config_does_not_fit_its_weights(oracle, tmp_path):
  directory = tmp_path / "edited"
  shutil.copytree(oracle[1], directory)
  config = json.loads((directory / "config.json").read_text())
  config["latent_channels"] = 8
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointMismatchError, match=r"(?s)diffusion_pytorch_model\.safetensors "
                     r"does not fit.*latent_channels=4; the model latent_channels=8"):
    convert_vae.load_diffusers_vae(directory)


def test_what_cannot_be_loaded_is_named(oracle, tmp_path):
  with pytest.raises(CheckpointError, match="without config.json"):
    convert_vae.load_diffusers_vae(tmp_path)
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  shutil.copy(oracle[1] / "config.json", pickled)
  (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointError, match="a pickle, which vitjax does not read"):
    convert_vae.load_diffusers_vae(pickled)
  attention_blocks = tmp_path / "attention_blocks"
  attention_blocks.mkdir()
  config = {**SMALL, "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}
  (attention_blocks / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="AttnDownEncoderBlock2D .vitjax builds "
                     "DownEncoderBlock2D only"):
    convert_vae.load_diffusers_vae(attention_blocks)
  model = vae.AutoencoderKL(**vae.config_from_diffusers(SMALL))
  with pytest.raises(CheckpointError, match="original LDM"):
    convert_vae.load_vae_state_dict(
        model, {"first_stage_model.encoder.down.0.block.0.norm1.weight": np.ones(32)})
  with pytest.raises(CheckpointError, match="not a diffusers AutoencoderKL"):
    convert_vae.load_vae_state_dict(model, {"patch_embed.proj.weight": np.ones((8, 3, 4, 4))})


def test_nchw_input_is_named(loaded):
  model, params = loaded
  with pytest.raises(ValueError, match="looks like NCHW"):
    model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)), method="encode")
