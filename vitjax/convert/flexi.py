"""FlexiViT checkpoints: big_vision's layout, and patch embeddings made for another patch size.

big_vision's FlexiViTs (big_vision/models/proj/flexi/vit.py; the FlexiViT-{S,B,L}
.npz files) keep the patch-embedding kernel at 32x32 and learned position
embeddings for a 7x7 grid of the patches only (the class token has none), and
resize both to whatever patch size a call asks for. A VisionTransformer with
`BIG_VISION_FLEXIVIT`'s fields holds those parameters as they are:

    model = vitjax.create_model('flexivit_base', **BIG_VISION_FLEXIVIT)
    params = vitjax.load_weights(model, 'flexivit_b_i1k.npz')
    logits, _ = model.apply({'params': params}, images_240px, patch_size=16)

Or `load_weights` converts once, into a model stored at another size (timm's way):
into `flexivit_base` (patch 16 at 240 px) the kernel is PI-resized to 16x16 with the
model's `patch_resize` and the position embeddings resized to its 15x15 grid with its
`posemb_resize`. For exactly the conversion of big_vision's `load` and timm's .npz
loader (TF's bilinear resize, no antialiasing), build the model with
patch_resize='bilinear_no_antialias', posemb_resize='bilinear'.

One difference stays: big_vision resizes the position embeddings at each call with
jax.image.resize's antialiasing, which acts only when the grid shrinks below 7x7
(patches above 34 px at 240 px); vitjax's 'bilinear' does not antialias.
"""

import numpy as np

from vitjax.models import flexi

# VisionTransformer fields for big_vision's FlexiViT parameters, unconverted: the 32x32
# kernel, position embeddings for the 7x7 grid (224 px / 32) of the patches only, and
# big_vision's resize methods (tf.image.resize for the kernel, bilinear for the grid).
BIG_VISION_FLEXIVIT = dict(patch_size=32, image_size=224, class_posemb=False,
                           posemb_resize="bilinear", patch_resize="bilinear_no_antialias")

_KERNEL = "embedding/kernel"


def fit_patch_embedding(params, model, template):
  """`params` with a patch-embedding kernel of another patch size PI-resized to the model's.

  Only the kernel's height and width may differ (channels and width equal); the
  resize is `model.patch_resize`'s (vitjax.models.flexi). Anything else passes
  through, for the mismatch check to report.
  """
  kernel, want = params.get(_KERNEL), template.get(_KERNEL)
  if kernel is None or want is None or np.ndim(kernel) != 4 or len(want.shape) != 4:
    return params
  if np.shape(kernel) == tuple(want.shape) or np.shape(kernel)[2:] != tuple(want.shape[2:]):
    return params
  resized = flexi.pi_resize_for(np.asarray(kernel, np.float32), tuple(want.shape[:2]),
                                getattr(model, "patch_resize", "bilinear"))
  return {**params, _KERNEL: np.asarray(resized)}
