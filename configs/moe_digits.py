r"""Mixtures of experts on the digits: the quickstart ViT with V-MoE or Soft MoE layers.

    python -m vitjax.train --config configs/moe_digits.py --workdir workdirs/vmoe_top1
    python -m vitjax.train --config configs/moe_digits.py:top_k=2,capacity_factor=0.5 \
        --workdir workdirs/vmoe_top2
    python -m vitjax.train --config configs/moe_digits.py:moe=soft --workdir workdirs/soft_moe
    python -m vitjax.train --config configs/moe_digits.py:moe=none --workdir workdirs/dense

The quickstart's ViT (mu/4: width 64, 4 blocks, 16 tokens) with 8 experts in blocks
1 and 3 (V-MoE's every-2; `moe=sparse`) or in the last two blocks (Soft MoE's last
half; `moe=soft`, 2 slots per expert: 16 slots for 16 tokens). At top-1 and capacity
factor 1.0, or top-2 at 0.5, the sparse layers run as many expert slots as the dense
MLP runs tokens, and Soft MoE's 16 slots as many: the same forward multiply-adds as
the dense model, up to the router (`python -m vitjax.tools.model_table` counts them).
Expected: each within about a point of the dense ViT's 98% test top-1 (4 seeds each:
experiments/moe.md). Expert parallel: `--config.mesh.expert=4` with 4 devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4 on a CPU) gives the same run.

Arguments after the colon: `moe` ('sparse', 'soft' or 'none': the dense ViT),
`experts`, `top_k`, `capacity_factor`, `steps`, `seed`.
"""

import os

from vitjax import config as config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
MOE_TYPES = ("sparse", "soft", "none")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, moe="sparse", experts=8, top_k=1, capacity_factor=1.0,
                             steps=1200, seed=0)
  moe = "none" if arg.moe is None else arg.moe  # The parser reads 'none' as None.
  if moe not in MOE_TYPES:
    raise config_lib.ConfigError(f"configs/moe_digits.py: moe={moe!r}; use one of: "
                                 f"{', '.join(MOE_TYPES)}.")
  config = config_lib.load_config(f"{QUICKSTART}:steps={arg.steps}")
  config.unlock()
  config.seed = arg.seed
  if moe != "none":
    model = dict(config.model)
    model.update(
        name="vmoe" if moe == "sparse" else "soft_moe",
        moe_type=moe,
        num_experts=arg.experts,
        # V-MoE: every other block (1, 3); Soft MoE: the last half (2, 3).
        moe_layers="every2" if moe == "sparse" else "last2",
        top_k=arg.top_k,
        capacity_factor=arg.capacity_factor,
        eval_capacity_factor=None,  # None: as in training.
        group_size=8,  # Images per routing group: 8 x 16 tokens.
        noise_std=None,  # None: 1 / experts (V-MoE).
        batch_priority=arg.top_k > 1,  # BPR where capacity is short of the choices.
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        slots_per_expert=max(1, 16 // arg.experts),  # Soft MoE: 16 slots for 16 tokens.
    )
    config.model = model
  config.lock()
  return config
