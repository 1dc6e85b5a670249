#!/usr/bin/env bash
# What vitjax measures on a GPU, for a session that has one (the `device` tool's
# machines: JAX, PyTorch, timm and Triton installed; no ml-collections, grain or tfds,
# none of which these steps import; `dit` also needs diffusers, which it checks first). Run from the repository root:
#
#   bash experiments/gpu_session.sh check       # kernels vs 'xla' on the GPU (~5 min)
#   bash experiments/gpu_session.sh attention   # bench_attention, ViT and long shapes
#   bash experiments/gpu_session.sh packed      # NaViT: packed (segment ids) vs padded
#   bash experiments/gpu_session.sh sweep       # Pallas tiles vs cuDNN on three shapes
#   bash experiments/gpu_session.sh throughput  # ViT-B/16 bf16 train + infer vs timm
#   bash experiments/gpu_session.sh merging     # ToMe: ViT-B/16 bf16 infer, r = 8, 13, 16
#   bash experiments/gpu_session.sh moe         # V-MoE B/16, Soft MoE S/16 vs their dense ViTs
#   bash experiments/gpu_session.sh dit         # DiT-XL/2 bf16 train + infer vs diffusers
#
# Each step fits one 10-minute device call; results go to $OUT (default gpu_results/),
# ready to paste into BENCHMARKS.md with the device line printed first.
set -uo pipefail
step=${1:?"which step: check, attention, packed, sweep, throughput, merging, moe or dit"}
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
python3 -c "import jax; print('jax', jax.__version__, jax.devices()[0].device_kind, '$(date -I)')" \
  | tee "$out/device.txt"

case "$step" in
  check)
    # fp32 matmuls at full precision on both sides: Triton's and XLA's default on a GPU is
    # TF32, which would hide a kernel error under its own rounding.
    JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -p no:cacheprovider \
      tests/test_flash_attention.py tests/test_ops.py 2>&1 | tee "$out/check.txt" ;;
  attention)
    python3 -m vitjax.tools.bench_attention --markdown --json "$out/attention.json" \
      2>&1 | tee "$out/attention.md" ;;
  sweep)
    python3 -m vitjax.tools.bench_attention --markdown --json "$out/sweep.json" \
      --shapes 256x197x12x64,16x1024x32x64,4x4096x16x128,4x4096x32x64 \
      --impl xla,cudnn,pallas,pallas:64x64x64x64x4x2,pallas:128x64x64x64x4x3,pallas:128x128x64x64x8x2,pallas:128x64x128x64x8x2,pallas:64x128x64x128x4x3 \
      2>&1 | tee "$out/sweep.md" ;;
  packed)
    # NaViT: images packed with segment ids beside the same images padded, one per row.
    python3 -m vitjax.tools.bench_attention --markdown --json "$out/packed.json" --packed \
      --shapes 32x1024x12x64,8x4096x12x64 --impl xla,cudnn,pallas 2>&1 | tee "$out/packed.md" ;;
  throughput)
    for mode in train infer; do
      python3 -m vitjax.tools.benchmark --model vit_base_patch16_224 --batch 256 \
        --mode "$mode" --dtype bfloat16 --markdown --json "$out/$mode.json" \
        2>&1 | tee "$out/$mode.md"
    done ;;
  merging)
    # Token merging: the merged and the plain model side by side (ToMe's Table: ViT-B/16).
    for r in 8 13 16; do
      python3 -m vitjax.tools.benchmark --model vit_base_patch16_224 --batch 256 \
        --mode infer --dtype bfloat16 --token_merging "r=$r" --markdown \
        --json "$out/merging_r$r.json" 2>&1 | tee "$out/merging_r$r.md"
    done ;;
  moe)
    # Mixtures of experts beside their dense counterparts (Soft MoE's Table 8: S/16, B/16).
    for model in vmoe_base_patch16_224_e8_every2 soft_moe_small_patch16_224_e128; do
      for mode in train infer; do
        python3 -m vitjax.tools.benchmark --model "$model" --batch 128 --mode "$mode" \
          --dtype bfloat16 --markdown --json "$out/${model}_$mode.json" \
          2>&1 | tee "$out/${model}_$mode.md"
      done
    done ;;
  dit)
    # DiT-XL/2 on 32x32x4 latents (256-pixel images) beside diffusers' DiTTransformer2DModel
    # holding the same weights (torch.compile, bf16 autocast); batch 32, DiT's per-GPU batch
    # (256 over 8 GPUs). The train step is the simple diffusion loss (MSE against the noise).
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" \
      || { echo "dit needs diffusers (pip install diffusers==0.42.1)" >&2; exit 1; }
    for mode in train infer; do
      python3 -m vitjax.tools.benchmark --model dit_xlarge_patch2_256 --batch 32 \
        --mode "$mode" --dtype bfloat16 --compare diffusers --markdown \
        --json "$out/dit_xl2_$mode.json" 2>&1 | tee "$out/dit_xl2_$mode.md"
    done ;;
  *) echo "unknown step '$step': check, attention, packed, sweep, throughput, merging, moe or dit" >&2; exit 2 ;;
esac
