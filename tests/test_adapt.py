"""vitjax.adapt: LoRA, visual prompts, AdaptFormer adapters, BitFit, and their training."""

import os
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from vitjax import adapt
from vitjax import config as config_lib
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train import optim
from vitjax.train import trainer as trainer_lib

import cli_checks
from test_train import tiny_config  # A 1-block ViT on 8x8 digits, a few steps.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16,
            num_classes=10)
IMAGES = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))


def tiny_model(**overrides):
  return vitjax.create_model("vit", **{**TINY, **overrides})


def base_params(model):
  return nn.unbox(model.init(jax.random.PRNGKey(1), IMAGES)["params"])


def pre_logits(model, params, images=IMAGES):
  # Not the logits: a fresh head is zero, which would make any two models agree.
  return model.apply({"params": params}, images)[1]["pre_logits"]


def randomised(params, names=("lora_b", "adapter_up_kernel"), scale=0.1):
  """`params` with the zero-initialised adapter halves set to random values."""
  def fill(path, value):
    name = getattr(path[-1], "key", "")
    if name not in names:
      return value
    key = jax.random.PRNGKey(abs(hash(jax.tree_util.keystr(path))) % 2**31)
    return scale * jax.random.normal(key, value.shape, value.dtype)
  return jax.tree_util.tree_map_with_path(fill, params)


@pytest.mark.parametrize("peft", [
    dict(lora=dict(rank=2)),
    dict(lora=dict(rank=3, targets="query|key|value|out$|Dense_[01]$")),
    dict(adapter=dict(dim=4)),
])
def test_zero_initialised_adapters_leave_the_output_unchanged(peft):
  model = tiny_model()
  base = base_params(model)
  adapted = adapt.adapted(model, peft)
  params = adapt.init_from(adapted, base, jax.random.PRNGKey(2), IMAGES)
  assert any(adapt.is_adapter(n) for n in adapt._flat(params))
  chex.assert_trees_all_close(pre_logits(adapted, params), pre_logits(model, base), atol=0)
  # ... and trained (non-zero) ones change it.
  moved = pre_logits(adapted, randomised(params))
  assert float(jnp.max(jnp.abs(moved - pre_logits(model, base)))) > 1e-3


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lora_merge_equals_the_adapted_model_and_unmerge_restores_it(scan_layers):
  model = tiny_model(scan_layers=scan_layers)
  peft = dict(lora=dict(rank=2, alpha=5.0, targets="query|value|out$|Dense_[01]$"))
  adapted = adapt.adapted(model, peft)
  params = randomised(nn.unbox(adapted.init(jax.random.PRNGKey(3), IMAGES)["params"]))
  merged = adapt.merge(params, peft)
  assert not any(adapt.is_adapter(n) for n in adapt._flat(merged))
  chex.assert_trees_all_equal_shapes(merged, base_params(model))
  chex.assert_trees_all_close(pre_logits(model, merged), pre_logits(adapted, params),
                              atol=2e-5)
  restored = adapt.unmerge(merged, adapt.adapter_only(params), peft)
  chex.assert_trees_all_close(restored, params, atol=1e-6)


def test_lora_shapes_follow_each_kernel():
  adapted = adapt.adapted(tiny_model(), dict(lora=dict(rank=3, targets="query|out$|Dense_0$")))
  params = nn.unbox(adapted.init(jax.random.PRNGKey(0), IMAGES)["params"])
  block = params["Transformer"]["encoderblock_0"]
  attention = block["MultiHeadDotProductAttention_0"]
  chex.assert_shape([attention["query"]["lora_a"], attention["query"]["lora_b"]],
                    [(32, 3), (3, 2, 16)])  # kernel (width, heads, head_dim)
  chex.assert_shape([attention["out"]["lora_a"], attention["out"]["lora_b"]],
                    [(2, 16, 3), (3, 32)])  # kernel (heads, head_dim, width)
  chex.assert_shape([block["MlpBlock_0"]["Dense_0"]["lora_a"]], [(32, 3)])
  assert "lora_a" not in attention["key"] and "lora_a" not in attention["value"]
  np.testing.assert_array_equal(attention["query"]["lora_b"], 0)


@pytest.mark.parametrize("pool_type", ["token", "gap"])
def test_shallow_prompts_are_registers_with_learned_values(pool_type):
  # VPT-shallow puts n learned tokens after the class token, without position
  # embeddings, and drops them before pooling: exactly what n registers are.
  model = tiny_model(pool_type=pool_type)
  adapted = adapt.adapted(model, dict(prompts=dict(num_tokens=3)))
  params = nn.unbox(adapted.init(jax.random.PRNGKey(4), IMAGES)["params"])
  with_registers = tiny_model(pool_type=pool_type, num_registers=3)
  as_registers = {k: v for k, v in params.items() if k != "Transformer"}
  as_registers["Transformer"] = {k: v for k, v in params["Transformer"].items()
                                 if k != "vpt_prompts"}
  as_registers["reg"] = params["Transformer"]["vpt_prompts"]
  logits, out = adapted.apply({"params": params}, IMAGES)
  chex.assert_trees_all_close(out["pre_logits"], pre_logits(with_registers, as_registers),
                              atol=1e-5)
  assert out["tokens"].shape == (2, 16, 32) and logits.shape == (2, 10)


def test_deep_prompts_replace_each_blocks_prompt_outputs():
  # Depth 1: the one block's prompts are the shallow prompts.
  deep = adapt.adapted(tiny_model(depth=1), dict(prompts=dict(num_tokens=2, deep=True)))
  params = nn.unbox(deep.init(jax.random.PRNGKey(5), IMAGES)["params"])
  assert "vpt_prompts" not in params["Transformer"]
  shallow = adapt.adapted(tiny_model(depth=1), dict(prompts=dict(num_tokens=2)))
  moved = {**params, "Transformer": {k: v for k, v in params["Transformer"].items()}}
  moved["Transformer"]["encoderblock_0"] = {
      k: v for k, v in params["Transformer"]["encoderblock_0"].items() if k != "vpt_prompts"}
  moved["Transformer"]["vpt_prompts"] = params["Transformer"]["encoderblock_0"]["vpt_prompts"]
  chex.assert_trees_all_close(pre_logits(deep, params), pre_logits(shallow, moved), atol=1e-6)
  # Depth 2, scanned or not: one prompt set per block.
  for scan_layers in (False, True):
    deep2 = adapt.adapted(tiny_model(scan_layers=scan_layers),
                          dict(prompts=dict(num_tokens=2, deep=True)))
    shapes = jax.tree_util.tree_map(np.shape, nn.unbox(deep2.init(
        jax.random.PRNGKey(5), IMAGES)["params"]))
    if scan_layers:
      assert shapes["Transformer"]["encoderblock"]["vpt_prompts"] == (2, 1, 2, 32)
    else:
      assert shapes["Transformer"]["encoderblock_1"]["vpt_prompts"] == (1, 2, 32)


def test_zero_prompts_are_the_base_model():
  model = tiny_model()
  base = base_params(model)
  adapted = adapt.adapted(model, dict(prompts=dict(num_tokens=0), lora=dict(rank=0)))
  chex.assert_trees_all_equal(adapted.apply({"params": base}, IMAGES)[0],
                              model.apply({"params": base}, IMAGES)[0])


@pytest.mark.parametrize("peft,message", [
    (dict(lora=dict(rank=-1)), "config.peft.lora.rank=-1"),
    (dict(lora=dict(rank=2, targets="(")), "not a regular expression"),
    (dict(lora=dict(rank=2, targets="nothing_like_this")), "matches no dense layer"),
    (dict(lora=dict(rank=2, rnak=3)), "Unknown config.peft.lora key"),
    (dict(prompts=dict(num_tokens=2, dropout=1.5)), "dropout rate in [0, 1)"),
    (dict(adapter=dict(dim=2, targets="nowhere")), "matches no module"),
])
def test_bad_peft_configs_name_the_key(peft, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    adapt.adapted(tiny_model(), peft).init(jax.random.PRNGKey(0), IMAGES)


def test_prompts_refuse_per_token_state():
  adapted = adapt.adapted(tiny_model(rope="axial", posemb="none"),
                          dict(prompts=dict(num_tokens=2)))
  with pytest.raises(ValueError, match="per-token state"):
    adapted.init(jax.random.PRNGKey(0), IMAGES)


def _opt_config(peft, freeze=None):
  config = config_lib.load_config(QUICKSTART)
  config.peft.update(peft)
  config.optimizer.freeze = freeze
  return config


@pytest.mark.parametrize("peft,trained", [
    (dict(lora=dict(rank=2)), {"lora_a", "lora_b", "head/kernel", "head/bias"}),
    (dict(train="^head/|/bias$"), {"bias", "head/kernel"}),
    (dict(prompts=dict(num_tokens=2), train="^head/kernel$"), {"vpt_prompts", "head/kernel"}),
])
def test_only_adapters_and_train_names_train_and_hold_optimizer_state(peft, trained):
  model = tiny_model()
  if adapt.has_adapters(peft):
    model = adapt.adapted(model, peft)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), IMAGES)["params"])
  tx, _ = optim.make_optimizer(_opt_config(peft), params)
  state = tx.init(params)
  flat = adapt._flat(params)
  expected = {name for name in flat if any(name == t or name.endswith("/" + t)
                                           for t in trained)}
  # Adam's moments exist for the trained parameters only.
  state_size = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
  assert state_size == 2 * sum(flat[name].size for name in expected)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  for _ in range(2):  # The warmup's first learning rate is 0.
    updates, state = tx.update(grads, state, params)
  moved = {name for name, u in adapt._flat(updates).items() if np.any(np.asarray(u) != 0)}
  assert moved == expected


def test_adapter_file_round_trip_and_refusals(tmp_path):
  peft = dict(lora=dict(rank=2), adapter=dict(dim=3))
  adapted = adapt.adapted(tiny_model(), peft)
  params = randomised(nn.unbox(adapted.init(jax.random.PRNGKey(6), IMAGES)["params"]))
  path = tmp_path / "adapter.safetensors"
  adapt.save_adapter(path, params, peft, model_name="vit")
  fresh = nn.unbox(adapted.init(jax.random.PRNGKey(7), IMAGES)["params"])
  loaded, config = adapt.load_adapter(path, fresh)
  assert config["lora"]["rank"] == 2 and config["adapter"]["dim"] == 3
  # The adapters and the head come from the file; everything else stays.
  flat_loaded, flat_params, flat_fresh = map(adapt._flat, (loaded, params, fresh))
  for name, value in flat_loaded.items():
    source = flat_params if adapt.is_adapter(name) or name.startswith("head/") else flat_fresh
    np.testing.assert_array_equal(value, source[name], err_msg=name)
  corrupt = tmp_path / "corrupt.safetensors"
  corrupt.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match="not a readable safetensors adapter"):
    adapt.load_adapter(corrupt, fresh)
  other = adapt.adapted(tiny_model(), dict(lora=dict(rank=4), adapter=dict(dim=3)))
  with pytest.raises(ValueError, match=r"lora_a has shape \(32, 2\); the model's is \(32, 4\)"):
    adapt.load_adapter(path, nn.unbox(other.init(jax.random.PRNGKey(0), IMAGES)["params"]))
  with pytest.raises(ValueError, match="parameters this model lacks"):
    adapt.load_adapter(path, base_params(tiny_model()))


def test_lora_training_from_a_pretrained_run_changes_only_the_adapter_and_head(tmp_path):
  pretrained = str(tmp_path / "pretrained")
  trainer_lib.train(tiny_config(total_steps=3), pretrained, progress=False)
  base = checkpoints_lib.load_params(pretrained, 3)
  config = tiny_config(**{"total_steps": 3, "peft.lora.rank": 2, "init": pretrained,
                          "optimizer.learning_rate": 0.1})
  workdir = str(tmp_path / "lora")
  result = trainer_lib.train(config, workdir, progress=False)
  assert "eval/top1" in result
  params = adapt._flat(checkpoints_lib.load_params(workdir, 3))
  for name, value in adapt._flat(base).items():
    if name.startswith("head/"):
      continue
    np.testing.assert_array_equal(params[name], value, err_msg=name)  # Frozen, bitwise.
  lora_b = [v for n, v in params.items() if n.endswith("lora_b")]
  assert len(lora_b) == 2 and all(np.any(np.asarray(v) != 0) for v in lora_b)


def test_a_bad_peft_value_stops_the_cli_before_anything_is_written(tmp_path):
  cli_checks.assert_train_rejects(
      "configs/quickstart.py", "peft.lora.rank=-1", tmp_path / "run",
      contains="config.peft.lora.rank=-1: a whole number >= 0 is needed")
