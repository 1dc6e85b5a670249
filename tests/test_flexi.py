"""FlexiViT's PI-resize: the paper's invariance, and timm's `resample_patch_embed` pinned.

timm needs torchvision, which is not in the test extras: its outputs for a seeded
kernel are pinned below, computed with timm 1.0.31 (torch 2.14.1) in a separate
virtualenv as

    kernel = np.random.default_rng(0).normal(size=(4, 4, 2, 3)).astype(np.float32)
    ref = timm.layers.resample_patch_embed(torch.tensor(kernel.transpose(3, 2, 0, 1)),
                                           new_size, interpolation, antialias=True)
    ref = ref.numpy().transpose(2, 3, 1, 0)     # back to (h, w, in, out)
    (ref.sum(), abs(ref).sum(), ref[:, 0, 1, 2])
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models import flexi

TIMM_RESAMPLE_PATCH_EMBED = {
    ((6, 6), "bilinear"): (11.276918, 107.570541,
                           [0.217034, 0.103722, 0.074545, 0.41108, 0.66185, 0.828487]),
    ((3, 3), "bilinear"): (11.276926, 96.498550, [0.708027, 0.514937, 1.056794]),
    ((7, 5), "bilinear"): (11.276936, 110.329002, [0.198278, 0.146925, 0.064761, 0.237617,
                                                   0.456305, 0.740789, 0.918591]),
    ((6, 6), "bicubic"): (11.276927, 86.294159,
                          [0.184789, 0.117861, 0.119285, 0.353746, 0.557651, 0.672079]),
}


def embed(images, kernel, patch_size):
  return jax.lax.conv_general_dilated(images, kernel, (patch_size, patch_size), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("new_patch_size", [6, 8])
def test_resized_patches_with_the_pi_resized_kernel_give_the_same_tokens(method, new_patch_size):
  """The FlexiViT paper's invariance: <resize(x), PI-resize(w)> = <x, w> when growing."""
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 8, 12, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 3, 5)), jnp.float32)
  resized_images = flexi.resize_patches(images, 4, new_patch_size, method)
  chex.assert_shape(resized_images, (2, 2 * new_patch_size, 3 * new_patch_size, 3))
  new_kernel = flexi.pi_resize_patch_kernel(kernel, new_patch_size, method)
  chex.assert_shape(new_kernel, (new_patch_size, new_patch_size, 3, 5))
  chex.assert_trees_all_close(embed(resized_images, new_kernel, new_patch_size),
                              embed(images, kernel, 4), atol=2e-5)
  # Resizing the kernel like an image instead does not keep the tokens.
  naive = jax.image.resize(kernel, new_kernel.shape, "linear")
  assert not np.allclose(embed(resized_images, naive, new_patch_size),
                         embed(images, kernel, 4), atol=1e-2)


@pytest.mark.parametrize("new_size,method", sorted(TIMM_RESAMPLE_PATCH_EMBED))
def test_pi_resize_equals_timms_resample_patch_embed(new_size, method):
  kernel = np.random.default_rng(0).normal(size=(4, 4, 2, 3)).astype(np.float32)
  resized = np.asarray(flexi.pi_resize_patch_kernel(jnp.asarray(kernel), new_size, method))
  total, absolute, column = TIMM_RESAMPLE_PATCH_EMBED[(new_size, method)]
  chex.assert_shape(resized, new_size + (2, 3))
  np.testing.assert_allclose(resized.sum(), total, atol=1e-4)
  np.testing.assert_allclose(np.abs(resized).sum(), absolute, rtol=1e-5)
  np.testing.assert_allclose(resized[:, 0, 1, 2], column, atol=1e-5)


def test_pi_resize_is_jittable_keeps_the_dtype_and_the_same_size_is_identity():
  kernel = jnp.ones((4, 4, 3, 2), jnp.bfloat16)
  assert flexi.pi_resize_patch_kernel(kernel, 4) is kernel
  resized = jax.jit(lambda k: flexi.pi_resize_patch_kernel(k, (6, 6)))(kernel)
  assert resized.dtype == jnp.bfloat16 and resized.shape == (6, 6, 3, 2)
  with pytest.raises(ValueError, match="method must be one of"):
    flexi.resize_matrix((4, 4), (6, 6), "area")


def test_a_vit_runs_at_any_patch_size_with_its_own_weights():
  """`model.apply(..., patch_size=p)`: PI-resized embedding, position embeddings to the grid."""
  import vitjax  # pylint: disable=g-import-not-at-top
  model = vitjax.create_model("vit", variant="mu/4", image_size=16, num_classes=10)
  params = {"params": vitjax.init_params(model)}
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  apply = jax.jit(model.apply, static_argnames="patch_size")
  logits, out = apply(params, images)
  same_logits, same = apply(params, images, patch_size=4)  # The model's own: unchanged.
  chex.assert_trees_all_equal((logits, out["head_input"]), (same_logits, same["head_input"]))
  # Each 4x4 patch resized to 8x8, cut at 8: the same tokens, so the same features.
  _, resized = apply(params, flexi.resize_patches(images, 4, 8), patch_size=8)
  chex.assert_trees_all_close(resized["head_input"], out["head_input"], atol=1e-5)
  _, finer = apply(params, images, patch_size=2)  # An 8x8 grid from the 4x4 model.
  chex.assert_shape(finer["tokens"], (2, 64, model.width))
  assert np.isfinite(np.asarray(finer["head_input"])).all()
  with pytest.raises(ValueError, match="not a whole number of 5x5 patches"):
    model.apply(params, images, patch_size=5)
  with pytest.raises(ValueError, match="patch_size must be a positive int"):
    model.apply(params, images, patch_size=0)
