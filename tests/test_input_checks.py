"""`model.apply` checks its images: NHWC, the channels, whole patches (or dynamic_img_pad).

One tiny model per family (ViT, Mixer, Swin, MAE, SimMIM, the image tower of TwoTowers);
each wrong input must raise a ValueError that names the problem and the fix.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax

# 16x16 images, 4x4 patches: a 4x4 grid. head_zeroinit=False: logits that are not all zeros,
# so that comparing them means something.
VIT = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16,
           num_classes=3, head_zeroinit=False)
MIXER = dict(hidden_dim=16, depth=1, tokens_mlp_dim=8, channels_mlp_dim=32, patch_size=4,
             image_size=16, num_classes=3, head_zeroinit=False)
SWIN = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, patch_size=4,
            image_size=16, num_classes=3, head_zeroinit=False)
MAE = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16,
           decoder_width=8, decoder_depth=1, decoder_num_heads=2)
SIMMIM = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16,
              mask_patch_size=8)
TOWERS = dict(image_model="vit", image=VIT, embed_dim=8,
              text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, max_length=8))
# (name, options) for vitjax.create_model, one per family.
FAMILIES = {
    "vit": ("vit", VIT),
    "mixer": ("mixer", MIXER),
    "swin": ("swin_tiny_patch4_window7_224", SWIN),
    "mae": ("mae", MAE),
    "simmim": ("simmim", SIMMIM),
}


def _model(family, **overrides):
  name, options = FAMILIES[family]
  return vitjax.create_model(name, **{**options, **overrides})


def _images(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(model, images):
  return jax.jit(model.init)(jax.random.PRNGKey(0), images)


@pytest.fixture(scope="module", name="built")
def fixture_built():
  """family -> (model, variables) for 3-channel 16x16 images."""
  return {family: (model, _init(model, _images(1, 16, 16, 3)))
          for family, model in ((f, _model(f)) for f in FAMILIES)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nchw_images_are_named_with_the_transpose(family, built):
  model, variables = built[family]
  with pytest.raises(ValueError, match=r"looks like NCHW.*x\.transpose\(0, 2, 3, 1\)"):
    model.apply(variables, _images(2, 3, 16, 16))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_image_without_a_batch_dimension(family, built):
  model, variables = built[family]
  with pytest.raises(ValueError, match=r"add a batch dimension: x\[None\]"):
    model.apply(variables, _images(16, 16, 3))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrong_channel_count_names_what_the_model_takes(family, built):
  model, variables = built[family]
  with pytest.raises(ValueError, match=r"built for 3-channel images.*got 1 channels"):
    model.apply(variables, _images(2, 16, 16, 1))


def test_the_parameters_decide_the_channels_not_the_field():
  gray = _model("vit", in_channels=1)
  variables = _init(gray, _images(1, 16, 16, 1))
  rgb_field = _model("vit")  # in_channels=3, but the kernel takes 1 channel.
  logits, _ = rgb_field.apply(variables, _images(2, 16, 16, 1))
  assert logits.shape == (2, 3)
  with pytest.raises(ValueError, match="patch embedding's kernel takes 1"):
    rgb_field.apply(variables, _images(2, 16, 16, 3))
  with pytest.raises(ValueError, match="in_channels=3"):  # Before parameters: the field.
    _init(rgb_field, _images(1, 16, 16, 1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_image_smaller_than_a_patch(family, built):
  model, variables = built[family]
  with pytest.raises(ValueError, match=r"at least one 4x4 patch; got 3x16"):
    model.apply(variables, _images(2, 3, 16, 3))


@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_a_partial_patch_is_an_error_that_names_dynamic_img_pad(family, built):
  model, variables = built[family]
  # A VALID convolution would crop 18x18 to 16x16 without a word.
  with pytest.raises(ValueError, match=r"18x18 images are not a whole number of 4x4 patches.*"
                     r"dynamic_img_pad=True.*20x20"):
    model.apply(variables, _images(2, 18, 18, 3))


@pytest.mark.parametrize("family", ["mae", "simmim"])
def test_masked_image_models_take_their_image_size_only(family, built):
  model, variables = built[family]
  with pytest.raises(ValueError, match="takes 16x16 images, got 20x20"):
    model.apply(variables, _images(2, 20, 20, 3))


def _assert_padded_like_timm(padding, plain, images):
  """`padding` on `images` equals `plain` on them zero-padded at the bottom and right."""
  height, width = images.shape[1:3]
  explicit = jnp.pad(images, ((0, 0), (0, -height % 4), (0, -width % 4), (0, 0)))
  variables = _init(plain, explicit)
  expected = plain.apply(variables, explicit)
  got = padding.apply(variables, images)
  chex.assert_trees_all_close(got, expected, atol=1e-6)
  return got


@pytest.mark.parametrize("family,image_size", [("vit", 16), ("mixer", 20)])
def test_dynamic_img_pad_equals_the_zero_padded_image(family, image_size):
  # The Mixer's token-mixing MLP is sized for the padded grid; ViT resizes its posemb.
  plain = _model(family, image_size=image_size)
  padding = _model(family, image_size=image_size, dynamic_img_pad=True)
  images = _images(2, 18, 18, 3)
  logits, out = _assert_padded_like_timm(padding, plain, images)
  assert out["stem"].shape[1] == 25 and logits.shape == (2, 3)  # 5x5 patches, none dropped.
  assert not np.allclose(logits[0], logits[1])  # The images decide the logits.


def test_swin_pads_any_size_to_whole_patches():
  # Swin pads to whole windows anyway (as HF transformers does), so it pads the stem too.
  model = _model("swin")
  logits, out = _assert_padded_like_timm(model, model, _images(2, 18, 21, 3))
  assert out["stem"].shape[1:3] == (5, 6) and logits.shape == (2, 3)


def test_dynamic_img_pad_is_a_model_option():
  assert vitjax.create_model("vit_tiny_patch16_224", dynamic_img_pad=True).dynamic_img_pad
  assert vitjax.create_model("mixer_s16_224", dynamic_img_pad=True).dynamic_img_pad
  assert not vitjax.create_model("vit_tiny_patch16_224").dynamic_img_pad


def test_checks_hold_under_jit(built):
  model, variables = built["vit"]
  with pytest.raises(ValueError, match="looks like NCHW"):
    jax.jit(model.apply)(variables, _images(2, 3, 16, 16))


def test_two_towers_image_tower_checks_and_pads():
  towers = vitjax.create_model("two_towers", **TOWERS)
  texts = jnp.ones((2, 8), jnp.int32)
  variables = _init(towers, _images(1, 16, 16, 3))
  with pytest.raises(ValueError, match="looks like NCHW"):
    towers.apply(variables, _images(2, 3, 16, 16), texts)
  with pytest.raises(ValueError, match="dynamic_img_pad"):
    towers.apply(variables, _images(2, 18, 18, 3), texts)
  padding = vitjax.create_model("two_towers", **dict(
      TOWERS, image=dict(TOWERS["image"], dynamic_img_pad=True)))
  images = _images(2, 18, 18, 3)
  explicit = jnp.pad(images, ((0, 0), (0, 2), (0, 2), (0, 0)))
  chex.assert_trees_all_close(padding.apply(variables, images, texts)[0],
                              towers.apply(variables, explicit, texts)[0], atol=1e-6)
