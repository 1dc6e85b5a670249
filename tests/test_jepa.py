"""I-JEPA: the context encoder and predictor, the targets, Hugging Face IJepaModel weights,
and fine-tuning a ViT from I-JEPA and DINO checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax.convert import CheckpointMismatchError, save_weights
from vitjax.models import count_params, init_params, jepa, param_shapes

import torch  # The oracle: a failed import fails the test.
import transformers  # The oracle: a failed import fails the test.
import safetensors.torch as safetensors_torch  # The oracle: a failed import fails the test.

TINY = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
PREDICTOR = dict(predictor_width=16, predictor_depth=2)
# The ViT that is the same function as the I-JEPA's encoder.
ENCODER_OPTIONS = dict(pool_type="gap", num_classes=0, posemb="sincos2d")


@pytest.fixture(scope="module")
def ijepa():
  model = vitjax.create_model("ijepa", **TINY, **PREDICTOR)
  return model, init_params(model)


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def blocks(seed, batch=2, num_patches=16, context=6, num_blocks=3, block_size=3):
  """(context_index (B, Kc), target_index (B, M, Kt)): disjoint random patches per example."""
  rng = np.random.RandomState(seed)
  order = np.stack([rng.permutation(num_patches) for _ in range(batch)])
  targets = order[:, context:context + num_blocks * block_size]
  return (order[:, :context].astype(np.int32),
          targets.reshape(batch, num_blocks, block_size).astype(np.int32))


def test_encoder_is_a_vit_and_init_creates_the_predictor(ijepa, images):
  model, params = ijepa
  assert set(params) - set(jepa.encoder_params(params)) == {"predictor"}
  assert {"embed", "mask_token", "Transformer", "projection"} == set(params["predictor"])
  vit = vitjax.create_model("vit", **TINY, **ENCODER_OPTIONS)
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(jepa.encoder_params(params)) == shapes(param_shapes(vit))
  # Without indices: the encoder on the whole image, as a ViT returns it.
  features, out = model.apply({"params": params}, images)
  vit_features, vit_out = vit.apply({"params": jepa.encoder_params(params)}, images)
  np.testing.assert_array_equal(out["tokens"], vit_out["tokens"])
  np.testing.assert_array_equal(features, vit_features)
  assert out["tokens"].shape == (2, 16, 32)
  np.testing.assert_allclose(out["pre_logits"], out["tokens"].mean(axis=1), atol=1e-6)


def test_context_is_encoded_alone_and_predictions_cover_each_target(ijepa, images):
  model, params = ijepa
  context_index, target_index = blocks(0)
  predictions, out = model.apply({"params": params}, images, context_index=context_index,
                                 target_index=target_index)
  assert predictions.shape == (2, 3, 3, 32) and predictions.dtype == jnp.float32
  vit = vitjax.create_model("vit", **TINY, **ENCODER_OPTIONS)
  _, context = vit.apply({"params": jepa.encoder_params(params)}, images, keep=context_index)
  np.testing.assert_allclose(out["context"], context["tokens"], atol=1e-6)
  assert out["context"].shape == (2, 6, 32)
  # The pixels of the patches outside the context change nothing.
  outside = np.ones((2, 4, 4), bool)
  for b in range(2):
    outside[b].flat[context_index[b]] = False
  pixels = np.repeat(np.repeat(outside, 4, axis=1), 4, axis=2)[..., None]
  changed = np.where(pixels, images + 1.0, images)
  again, _ = model.apply({"params": params}, changed, context_index=context_index,
                         target_index=target_index)
  np.testing.assert_allclose(again, predictions, atol=1e-6)
  # Those of a context patch do.
  moved, _ = model.apply({"params": params}, images + 1.0, context_index=context_index,
                         target_index=target_index)
  assert np.abs(moved - predictions).max() > 1e-3


def test_each_target_block_is_predicted_on_its_own(ijepa, images):
  model, params = ijepa
  context_index, target_index = blocks(1)
  predict = lambda x, c, t: model.apply({"params": params}, x, context_index=c,
                                        target_index=t)[0]
  predictions = predict(images, context_index, target_index)
  for m in range(3):  # A block alone, as in the batch of blocks.
    np.testing.assert_allclose(predict(images, context_index, target_index[:, m:m + 1]),
                               predictions[:, m:m + 1], atol=1e-5)
  np.testing.assert_allclose(predict(images[1:], context_index[1:], target_index[1:]),
                             predictions[1:], atol=1e-5)
  # Within a block, the order of the patches carries nothing: their positions do.
  shuffled = target_index[:, :, ::-1]
  np.testing.assert_allclose(predict(images, context_index, shuffled),
                             predictions[:, :, ::-1], atol=1e-5)
  assert np.abs(predictions[:, :, 0] - predictions[:, :, 1]).max() > 1e-4


def test_mismatched_indices_are_errors(ijepa, images):
  model, params = ijepa
  context_index, target_index = blocks(0)
  with pytest.raises(ValueError, match="both context_index"):
    model.apply({"params": params}, images, context_index=context_index)
  with pytest.raises(ValueError, match="target_index"):
    model.apply({"params": params}, images, context_index=context_index,
                target_index=target_index[:, 0])


def test_target_features_are_layer_normed_without_affine_and_gathered():
  rng = np.random.RandomState(0)
  tokens = rng.randn(2, 16, 8).astype(np.float32) * 3 + 1
  _, target_index = blocks(2)
  got = jepa.target_features(jnp.asarray(tokens), jnp.asarray(target_index))
  normed = torch.nn.functional.layer_norm(torch.from_numpy(tokens), (8,)).numpy()
  expected = np.stack([normed[b][target_index[b]] for b in range(2)])
  assert got.shape == (2, 3, 3, 8)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_family_and_the_papers_models():
  model = vitjax.create_model("ijepa", variant="mu/4", image_size=16, patch_size=2)
  assert (model.width, model.depth, model.patch_size, model.pool_type, model.num_classes,
          model.posemb) == (64, 4, 2, "gap", 0, "sincos2d")
  assert model.predictor_options == (32, 4, 4, 128)  # Half the width, at most 12 deep.
  assert vitjax.create_model("ijepa", variant="L/16").predictor_options == (384, 12, 16, 1536)
  expected = {"ijepa_vit_huge_patch14_224": (1280, 32, 14, 224, 12),
              "ijepa_vit_huge_patch16_448": (1280, 32, 16, 448, 12),
              "ijepa_vit_giant_patch16_224": (1408, 40, 16, 224, 16)}
  for name, (width, depth, patch, resolution, predictor_depth) in expected.items():
    model = vitjax.create_model(name)
    assert (model.width, model.depth, model.patch_size, model.image_size) == (
        width, depth, patch, resolution), name
    assert model.predictor_options == (384, predictor_depth, 16, 1536), name
  # ViT-H/14's encoder is timm's I-JEPA encoder with fixed position embeddings; the
  # predictor: input and output projections, mask token, 12 blocks of width 384, norm.
  shapes = param_shapes(vitjax.create_model("ijepa_vit_huge_patch14_224", scan_layers=True))
  timm_encoder = param_shapes(vitjax.create_model("vit_huge_patch14_gap_224", scan_layers=True,
                                                  posemb="sincos2d"))
  assert count_params(jepa.encoder_params(shapes)) == count_params(timm_encoder)
  block = 4 * (384 * 384 + 384) + 2 * 2 * 384 + 2 * 384 * 1536 + 1536 + 384
  predictor = (1280 * 384 + 384) + 384 + 12 * block + 2 * 384 + (384 * 1280 + 1280)
  assert count_params(shapes["predictor"]) == predictor == 22_279_424


# --- Hugging Face IJepaModel -----------------------------------------------------------------

HF_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               image_size=16, patch_size=4, layer_norm_eps=1e-6)
# HF stores I-JEPA's fixed position embeddings as a parameter: posemb='learn' holds them.
HF_OPTIONS = dict(pool_type="gap", num_classes=0, posemb="learn",
                  posemb_resize="bicubic_no_antialias")


def hf_hidden_states(model, images, **kwargs):
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2)), **kwargs).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def hf_ijepa():
  torch.manual_seed(0)
  return transformers.IJepaModel(transformers.IJepaConfig(**HF_TINY)).eval()


@pytest.mark.parametrize("container", ["directory", "state_dict"])
def test_hf_ijepa_loads_into_a_vit_and_an_ijepa(hf_ijepa, container, images, tmp_path):
  if container == "directory":  # save_pretrained: the hub's names.
    hf_ijepa.save_pretrained(tmp_path)
    path = tmp_path
  else:  # The in-memory names of this transformers version.
    path = tmp_path / "ijepa.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf_ijepa.state_dict().items()},
                                path)
  expected = hf_hidden_states(hf_ijepa, images)
  vit = vitjax.create_model("vit", **TINY, **HF_OPTIONS, layer_norm_eps=1e-6)
  params = vitjax.load_weights(vit, path)
  _, out = vit.apply({"params": params}, images)
  np.testing.assert_allclose(out["tokens"], expected, atol=1e-4, rtol=0)
  # Another resolution: HF's interpolate_pos_encoding, torch's bicubic without antialiasing.
  larger = np.random.RandomState(1).uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
  _, out = vit.apply({"params": params}, larger)
  np.testing.assert_allclose(out["tokens"], hf_hidden_states(
      hf_ijepa, larger, interpolate_pos_encoding=True), atol=1e-4, rtol=0)

  # IJepaModel is the encoder alone: an IJEPA takes a fresh predictor with head='reinit'.
  model = vitjax.create_model("ijepa", **TINY, **PREDICTOR, posemb="learn")
  with pytest.raises(CheckpointMismatchError, match="head='reinit' initialises them afresh"):
    vitjax.load_weights(model, path)
  params = vitjax.load_weights(model, path, head="reinit")
  assert "predictor" in params
  _, out = model.apply({"params": params}, images)
  np.testing.assert_allclose(out["tokens"], expected, atol=1e-4, rtol=0)
  context_index, target_index = blocks(0)
  predictions, _ = model.apply({"params": params}, images, context_index=context_index,
                               target_index=target_index)
  assert np.isfinite(predictions).all()
  # The stored position embeddings need posemb='learn'.
  with pytest.raises(CheckpointMismatchError, match="posemb='learn'"):
    vitjax.load_weights(vitjax.create_model("ijepa", **TINY, **PREDICTOR), path, head="reinit")


def test_hf_ijepa_classifier_on_the_mean_token(images, tmp_path):
  torch.manual_seed(0)
  hf = transformers.IJepaForImageClassification(
      transformers.IJepaConfig(**HF_TINY, num_labels=5)).eval()
  with torch.no_grad():
    hf.classifier.weight.normal_()  # Random init makes tiny logits; make them count.
  path = tmp_path / "classifier.safetensors"
  safetensors_torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, path)
  model = vitjax.create_model("vit", **TINY, **{**HF_OPTIONS, "num_classes": 5})
  logits, _ = model.apply({"params": vitjax.load_weights(model, path)}, images)
  with torch.no_grad():
    expected = hf(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


# --- Fine-tuning after self-supervised pre-training --------------------------------------------

def test_vit_takes_the_encoder_of_an_ijepa_checkpoint(ijepa, images, tmp_path):
  model, params = ijepa
  path = tmp_path / "ijepa.npz"
  save_weights(params, path)
  vit = vitjax.create_model("vit", **TINY, **ENCODER_OPTIONS)
  loaded = vitjax.load_weights(vit, path)
  assert "predictor" not in loaded
  _, out = vit.apply({"params": loaded}, images)
  _, expected = model.apply({"params": params}, images)
  np.testing.assert_allclose(out["tokens"], expected["tokens"], atol=1e-6)
  # An IJEPA keeps its predictor.
  again = vitjax.load_weights(model, path)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(params))
  # The encoder's own options are needed: no class token, fixed position embeddings.
  with pytest.raises(CheckpointMismatchError, match="pool_type='gap'"):
    vitjax.load_weights(vitjax.create_model("vit", **TINY, **{**ENCODER_OPTIONS,
                                                               "pool_type": "token"}), path)
  with pytest.raises(CheckpointMismatchError, match="posemb='sincos2d'"):
    vitjax.load_weights(vitjax.create_model("vit", **TINY, **{**ENCODER_OPTIONS,
                                                               "posemb": "learn"}), path)


def test_vit_takes_the_backbone_of_a_dino_checkpoint(images, tmp_path):
  dino = vitjax.create_model("dino", **TINY, patch_head="separate", head_out_dim=16,
                             head_hidden_dim=16, head_bottleneck_dim=8)
  params = init_params(dino)
  assert {"dino_head", "ibot_head", "mask_token"} <= set(params)
  path = tmp_path / "dino.npz"
  save_weights(params, path)
  vit = vitjax.create_model("vit", **TINY, num_classes=0)
  loaded = vitjax.load_weights(vit, path)
  assert not {"dino_head", "ibot_head", "mask_token"} & set(loaded)
  _, out = vit.apply({"params": loaded}, images)
  _, expected = dino.apply({"params": params}, images)
  np.testing.assert_allclose(out["encoded"], expected["encoded"], atol=1e-6)
