"""Model registry: timm-style names and big_vision-style families, one lookup.

    create_model('vit_base_patch16_224')                  # timm name, timm defaults
    create_model('vit', variant='B/16', num_classes=10)   # big_vision style

The registry itself is `vitjax.models.registry`; this module registers vitjax's
families and names.
"""

from vitjax.models import dino
from vitjax.models import dit
from vitjax.models import jepa
from vitjax.models import mae
from vitjax.models import mixer
from vitjax.models import moe
from vitjax.models import navit
from vitjax.models import swin
from vitjax.models import two_towers
from vitjax.models import uvit
from vitjax.models import vit
from vitjax.models.registry import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
                                    INCEPTION_MEAN, INCEPTION_STD, ModelEntry,
                                    UnknownModelError, UnknownOptionError, closest_models,
                                    count_params, create_model, describe_family_default,
                                    dummy_input, families, family_default, init_params,
                                    list_models, model_entry, name_patterns, param_shapes,
                                    parameter_counts, register, register_family)

register_family("vit", vit.VisionTransformer, vit.decode_variant, vit.SIZES)
register_family("deit", vit.VisionTransformer, vit.decode_variant, vit.SIZES, distilled=True)
register_family("mixer", mixer.MlpMixer, mixer.decode_variant, mixer.SIZES)
register_family("mae", mae.MaskedAutoencoder, vit.decode_variant, vit.SIZES)
register_family("simmim", mae.SimMIM, vit.decode_variant, vit.SIZES)
register_family("navit", navit.NaViT, vit.decode_variant, vit.SIZES)
register_family("uvit", uvit.UViT, uvit.decode_variant, uvit.SIZES)
register_family("ijepa", jepa.IJEPA, vit.decode_variant, vit.SIZES)
register_family("dino", dino.DINO, vit.decode_variant, vit.SIZES)


def _register_vits():
  """timm's ViT and DeiT names, each with the defaults of timm's model of that name.

  Only names timm registers (tests/test_timm_names.py pins each one's parameter count to
  timm's); any other size, patch or resolution is a family member:
  create_model('vit', variant='L/8', image_size=384).
  """
  sizes = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g",
           "gigantic": "G"}
  vit_paper = "An Image is Worth 16x16 Words (Dosovitskiy et al., 2021)"
  dino_paper = "Emerging Properties in Self-Supervised Vision Transformers (Caron et al., 2021)"
  for name in ("vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch8_224",
               "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch32_224",
               "vit_small_patch32_384", "vit_base_patch8_224", "vit_base_patch16_224",
               "vit_base_patch16_384", "vit_base_patch32_224", "vit_base_patch32_384",
               "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch16_384",
               "vit_large_patch32_224", "vit_large_patch32_384", "vit_huge_patch14_224",
               "vit_giant_patch14_224", "vit_gigantic_patch14_224"):
    _, size_name, patch, resolution = name.split("_")
    config = dict(image_size=int(resolution),
                  **vit.decode_variant(f"{sizes[size_name]}/{patch[len('patch'):]}"))
    options = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD, paper=vit_paper)
    # Headless in timm, as their default weights are: the original ImageNet-21k ViT-L/32
    # and ViT-H/14, and DINO's ViT-S/8 (ImageNet mean and std).
    if name in ("vit_large_patch32_224", "vit_huge_patch14_224"):
      config["num_classes"] = 0
    if name == "vit_small_patch8_224":
      config["num_classes"] = 0
      options = dict(paper=dino_paper)
    register(name, vit.VisionTransformer, **options, **config)

  # Self-supervised ViTs without a head: DINOv2 (518 px; ViT-g is its own size, SwiGLU
  # MLP with biases), DINOv2 with registers (position embeddings of the patches only), and
  # I-JEPA's average-pooled encoders (no class token).
  dinov2_paper = "DINOv2: Learning Robust Visual Features without Supervision (Oquab et al., 2024)"
  registers_paper = "Vision Transformers Need Registers (Darcet et al., 2024)"
  for size_name, size in (("small", "S"), ("base", "B"), ("large", "L"), ("giant", None)):
    config = (vit.decode_variant(f"{size}/14") if size else
              dict(width=1536, depth=40, mlp_dim=4096, num_heads=24, patch_size=14,
                   mlp="swiglu", mlp_use_bias=True))
    config.update(image_size=518, layer_scale_init=1e-5, num_classes=0, posemb_resize="bicubic")
    register(f"vit_{size_name}_patch14_dinov2", vit.VisionTransformer, paper=dinov2_paper,
             **config)
    register(f"vit_{size_name}_patch14_reg4_dinov2", vit.VisionTransformer,
             paper=registers_paper, num_registers=4, class_posemb=False, **config)
  ijepa_paper = ("Self-Supervised Learning from Images with a Joint-Embedding Predictive "
                 "Architecture (Assran et al., 2023)")
  for size_name, size, patch, resolution in (("huge", "H", 14, 224), ("huge", "H", 16, 448),
                                             ("giant", "g", 16, 224)):
    register(f"vit_{size_name}_patch{patch}_gap_{resolution}", vit.VisionTransformer,
             paper=ijepa_paper, image_size=resolution, pool_type="gap", num_classes=0,
             posemb_resize="bicubic", **vit.decode_variant(f"{size}/{patch}"))

  # DeiT's eval crop is its own (224/256); timm's configs say 0.9.
  deit_paper = "Training data-efficient image transformers (Touvron et al., 2021)"
  for size_name, size, resolutions in (("tiny", "Ti", (224,)), ("small", "S", (224,)),
                                       ("base", "B", (224, 384))):
    for resolution in resolutions:
      for distilled in (False, True):
        tag = "_distilled" if distilled else ""
        register(f"deit_{size_name}{tag}_patch16_{resolution}", vit.VisionTransformer,
                 paper=deit_paper, crop_pct=0.875 if resolution == 224 else 1.0,
                 image_size=resolution, distilled=distilled,
                 **vit.decode_variant(f"{size}/16"))
  # DeiT III: LayerScale, and position embeddings of the patches only.
  deit3_paper = "DeiT III: Revenge of the ViT (Touvron et al., 2022)"
  for size_name, size, patch, resolutions in (
      ("small", "S", 16, (224, 384)), ("medium", "M", 16, (224,)),
      ("base", "B", 16, (224, 384)), ("large", "L", 16, (224, 384)), ("huge", "H", 14, (224,))):
    for resolution in resolutions:
      register(f"deit3_{size_name}_patch{patch}_{resolution}", vit.VisionTransformer,
               paper=deit3_paper, image_size=resolution, layer_scale_init=1e-6,
               class_posemb=False, posemb_resize="bicubic",
               **vit.decode_variant(f"{size}/{patch}"))


  # FlexiViT (timm's names): patch 16 at 240 px, position embeddings of the patches
  # only; `model.apply(..., patch_size=p)` runs them at any other patch size.
  flexivit_paper = "FlexiViT: One Model for All Patch Sizes (Beyer et al., 2023)"
  for size_name, size in (("small", "S"), ("base", "B"), ("large", "L")):
    register(f"flexivit_{size_name}", vit.VisionTransformer, mean=INCEPTION_MEAN,
             std=INCEPTION_STD, paper=flexivit_paper, crop_pct=0.95, image_size=240,
             class_posemb=False, posemb_resize="bicubic", **vit.decode_variant(f"{size}/16"))


def _register_rope_vits():
  """RoPE ViTs: DeiT-III (LayerScale, class token) with 2-D RoPE, by timm's and naver's names.

  timm's `vit_{size}_patch16_rope[_mixed][_ape]_224` are ports of naver-ai/rope-vit's
  `rope_{axial,mixed}[_ape]_deit_{size}_patch16_LS` (registered here with `_224` for
  `_LS`): axial (theta 100) or mixed (learned, theta 10) frequencies, with ('_ape') or
  without learned absolute position embeddings. Those cover the patches only, in both
  (DeiT III's layout: timm's no_embed_class). LayerScale starts at timm's 1e-5 or naver's
  1e-4.
  """
  paper = "Rotary Position Embedding for Vision Transformer (Heo et al., 2024)"
  for size_name, size in (("small", "S"), ("base", "B"), ("large", "L")):
    for rope in ("axial", "mixed"):
      for ape in (False, True):
        config = dict(image_size=224, rope=rope, **vit.decode_variant(f"{size}/16"))
        config.update(dict(posemb="learn", class_posemb=False) if ape else dict(posemb="none"))
        tags = ("_mixed" if rope == "mixed" else "") + ("_ape" if ape else "")
        # Another resolution resizes the '_ape' embeddings as each source does: timm's
        # resample_abs_pos_embed (antialiased), naver's F.interpolate (not).
        register(f"vit_{size_name}_patch16_rope{tags}_224", vit.VisionTransformer,
                 paper=paper, posemb_resize="bicubic", layer_scale_init=1e-5, **config)
        register(f"rope_{rope}{'_ape' if ape else ''}_deit_{size_name}_patch16_224",
                 vit.VisionTransformer, paper=paper, posemb_resize="bicubic_no_antialias",
                 layer_scale_init=1e-4, **config)


def _register_illamas():
  paper = "Adapting LLaMA Decoder to Vision Transformer (Wang et al., 2024)"
  # The SwiGLU width is 2/3 of ViT's 4x MLP, rounded up to a multiple of 256 (LLaMA's
  # rule, as in the authors' code): 512, 1024, 2048, 2816.
  for size_name, size, mlp_dim in (("tiny", "Ti", 512), ("small", "S", 1024),
                                   ("base", "B", 2048), ("large", "L", 2816)):
    config = {**vit.decode_variant(f"{size}/16"), "mlp_dim": mlp_dim}
    for resolution in (224, 384):
      register(f"illama_{size_name}_patch16_{resolution}", vit.VisionTransformer, paper=paper,
               image_size=resolution, norm="rmsnorm", mlp="swiglu", mlp_use_bias=False,
               causal=True, class_token_position="last", rope="1d", **config)


def _register_mixers():
  paper = "MLP-Mixer: An all-MLP Architecture for Vision (Tolstikhin et al., 2021)"
  for size in ("s", "b", "l"):
    for patch in (16, 32):
      register(f"mixer_{size}{patch}_224", mixer.MlpMixer, mean=INCEPTION_MEAN,
               std=INCEPTION_STD, paper=paper, crop_pct=0.875, image_size=224,
               **mixer.decode_variant(f"{size.upper()}/{patch}"))


_register_vits()
_register_rope_vits()
_register_illamas()
_register_mixers()
swin.register_swins(register, mean=IMAGENET_MEAN, std=IMAGENET_STD)
navit.register_models(register, mean=INCEPTION_MEAN, std=INCEPTION_STD)
two_towers.register_two_towers(register, clip_mean=CLIP_MEAN, clip_std=CLIP_STD,
                                siglip_mean=INCEPTION_MEAN, siglip_std=INCEPTION_STD)
mae.register_models(register)
jepa.register_models(register)
dino.register_models(register)
moe.register_models(register, register_family, mean=INCEPTION_MEAN, std=INCEPTION_STD)
dit.register_models(register, register_family)
uvit.register_models(register, mean=INCEPTION_MEAN, std=INCEPTION_STD)
