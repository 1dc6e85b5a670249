"""A timm-style name is timm's model: built with timm's defaults, timm's parameter count.

The rest of the registry reads as timm's names too (vit_*, deit_*, swin_*, ...): a name
there that timm does not register must be a paper's own, listed with whose it is. Sizes,
patches and resolutions nobody published are family members instead:
create_model('vit', variant='G/8', image_size=384).
"""

import dataclasses

import pytest

import vitjax
from vitjax import models

# sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()): timm's
# default model of each name (num_classes and input size from its default pretrained
# config), timm 1.0.31 with torch 2.13.0 (CPU), measured 2026-12-02. timm is not imported
# here; to remeasure, run that expression in an environment with timm installed.
TIMM_PARAMS = {
    "flexivit_base": 86_589_160,  # timm 1.0.31 with torch 2.14.1, 2026-12-02.
    "flexivit_large": 304_355_304,
    "flexivit_small": 22_061_416,
    "deit3_base_patch16_224": 86_585_320,
    "deit3_base_patch16_384": 86_877_160,
    "deit3_huge_patch14_224": 632_126_440,
    "deit3_large_patch16_224": 304_374_760,
    "deit3_large_patch16_384": 304_763_880,
    "deit3_medium_patch16_224": 38_849_512,
    "deit3_small_patch16_224": 22_059_496,
    "deit3_small_patch16_384": 22_205_416,
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit_base_distilled_patch16_384": 87_630_032,
    "deit_base_patch16_224": 86_567_656,
    "deit_base_patch16_384": 86_859_496,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_small_patch16_224": 22_050_664,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_tiny_patch16_224": 5_717_416,
    "mixer_b16_224": 59_880_472,
    "mixer_b32_224": 60_293_428,
    "mixer_l16_224": 208_196_168,
    "mixer_l32_224": 206_939_264,
    "mixer_s16_224": 18_528_264,
    "mixer_s32_224": 19_104_624,
    "naflexvit_base_patch16_gap": 86_633_704,  # timm 1.0.31 with torch 2.14.1, 2026-12-02.
    "naflexvit_base_patch16_map": 93_718_504,
    "naflexvit_base_patch16_par_gap": 86_633_704,
    "naflexvit_base_patch16_parfac_gap": 86_461_672,
    "naflexvit_base_patch16_siglip": 92_930_304,
    "naflexvit_so400m_patch16_siglip": 427_888_064,
    "swin_base_patch4_window12_384": 87_903_584,
    "swin_base_patch4_window7_224": 87_768_224,
    "swin_large_patch4_window12_384": 196_735_516,
    "swin_large_patch4_window7_224": 196_532_476,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_tiny_patch4_window7_224": 28_288_354,
    "vit_base_patch14_dinov2": 86_579_712,
    "vit_base_patch14_reg4_dinov2": 86_582_016,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch16_384": 86_859_496,
    "vit_base_patch16_rope_224": 86_434_792,
    "vit_base_patch16_rope_ape_224": 86_585_320,
    "vit_base_patch16_rope_mixed_224": 86_444_008,
    "vit_base_patch16_rope_mixed_ape_224": 86_594_536,
    "vit_base_patch32_224": 88_224_232,
    "vit_base_patch32_384": 88_297_192,
    "vit_base_patch8_224": 86_576_872,
    "vit_giant_patch14_224": 1_012_611_432,
    "vit_giant_patch14_dinov2": 1_136_479_232,
    "vit_giant_patch14_reg4_dinov2": 1_136_483_840,
    "vit_giant_patch16_gap_224": 1_011_368_576,
    "vit_gigantic_patch14_224": 1_844_440_680,
    "vit_huge_patch14_224": 630_764_800,
    "vit_huge_patch14_gap_224": 630_762_240,
    "vit_huge_patch16_gap_448": 631_668_480,
    "vit_large_patch14_224": 304_203_752,
    "vit_large_patch14_dinov2": 304_367_616,
    "vit_large_patch14_reg4_dinov2": 304_370_688,
    "vit_large_patch16_224": 304_326_632,
    "vit_large_patch16_384": 304_715_752,
    "vit_large_patch16_rope_224": 304_174_056,
    "vit_large_patch16_rope_ape_224": 304_374_760,
    "vit_large_patch16_rope_mixed_224": 304_198_632,
    "vit_large_patch16_rope_mixed_ape_224": 304_399_336,
    "vit_large_patch32_224": 305_510_400,
    "vit_large_patch32_384": 306_632_680,
    "vit_small_patch14_dinov2": 22_056_192,
    "vit_small_patch14_reg4_dinov2": 22_057_344,
    "vit_small_patch16_224": 22_050_664,
    "vit_small_patch16_384": 22_196_584,
    "vit_small_patch16_rope_224": 21_984_232,
    "vit_small_patch16_rope_ape_224": 22_059_496,
    "vit_small_patch16_rope_mixed_224": 21_988_840,
    "vit_small_patch16_rope_mixed_ape_224": 22_064_104,
    "vit_small_patch32_224": 22_878_952,
    "vit_small_patch32_384": 22_915_432,
    "vit_small_patch8_224": 21_670_272,
    "vit_tiny_patch16_224": 5_717_416,
    "vit_tiny_patch16_384": 5_790_376,
}

# First words of timm's names (timm 1.0.31) for the families a ViT codebase might port: a
# vitjax name that starts with one of them reads as timm's.
TIMM_PREFIXES = ("vit", "deit", "deit3", "mixer", "swin", "swinv2", "beit", "beitv2", "beit3",
                 "cait", "eva", "eva02", "flexivit", "naflexvit", "gmixer", "gmlp", "resmlp",
                 "xcit", "levit", "pit", "crossvit", "convit", "tnt", "twins", "volo", "hiera",
                 "samvit", "aimv2", "davit", "maxvit", "mvitv2", "nest", "coat", "convnext",
                 "resnet", "resnetv2")

# Names in that namespace that timm does not register, each a paper's own: name -> whose
# name it is. None at present (iLLaMA's, naver's rope_*, MAE's and CLIP's names start
# with words timm does not use).
PAPER_NAMES = {}


def _has_timm_prefix(name):
  return name.split("_")[0] in TIMM_PREFIXES and "_" in name  # 'vit' alone is a family.


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_shared_names_have_the_parameter_count_of_timms_default_model(name):
  model = vitjax.create_model(name)
  # scan_layers stacks the blocks' parameters along one more axis (the same count) and
  # traces one block instead of `depth`: 3 (ViT-B) to 9 (ViT-g) times faster to evaluate.
  if "scan_layers" in {f.name for f in dataclasses.fields(model)}:
    model = model.clone(scan_layers=True)
  assert models.count_params(models.param_shapes(model)) == TIMM_PARAMS[name]


def test_timm_style_names_are_timms_or_a_papers_own():
  names = [n for n in vitjax.list_models() if _has_timm_prefix(n)]
  unexplained = sorted(set(names) - set(TIMM_PARAMS) - set(PAPER_NAMES))
  assert not unexplained, (
      f"{unexplained} look like timm names but timm does not register them: pin timm's "
      "parameter count in TIMM_PARAMS, list a paper's own name in PAPER_NAMES, or reach "
      "the combination through a family (create_model('vit', variant=...)).")
  for name, whose in PAPER_NAMES.items():
    assert whose and models.model_entry(name).paper, name
