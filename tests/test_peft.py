"""LoRA in the `peft` library's format (vitjax.adapt.peft) and `python -m vitjax.tools.adapt`.

The oracle: a random transformers ViTForImageClassification wrapped by peft, its LoRA set to
random values (peft starts lora_B at zero). Nothing is downloaded.
Run: python -m pytest -q tests/test_peft.py
"""

import json
import os
import re
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

import vitjax
from vitjax import adapt
from vitjax import config as config_lib
from vitjax import train as train_lib
from vitjax.adapt import peft as peft_format
from vitjax.tools import adapt as adapt_tool

import peft as peft_lib  # The oracle: a failed import fails the test.
import safetensors.numpy as safetensors_numpy
import torch  # The oracle: a failed import fails the test.
import transformers  # The oracle: a failed import fails the test.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16,
            num_classes=10)
HF_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, patch_size=4, image_size=16, layer_norm_eps=1e-6,
               num_labels=10)
IMAGES = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
# The installed transformers' module names (transformers 5 renamed ViT's).
NAMES = peft_format.installed_names()
QUERY_VALUE = {"v4": ["query", "value"], "v5": ["q_proj", "v_proj"]}[NAMES]
OUT_AND_MLP = {"v4": ["dense"], "v5": ["o_proj", "fc1", "fc2"]}[NAMES]
CASES = {
    "query_value": dict(r=4, lora_alpha=8, target_modules=QUERY_VALUE),
    # Every kind of kernel (out: two fan-in axes), rsLoRA's scale, a trained classifier.
    "out_mlp_rslora_head": dict(r=3, lora_alpha=5, target_modules=OUT_AND_MLP, use_rslora=True,
                                lora_dropout=0.1, modules_to_save=["classifier"]),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  torch.manual_seed(0)
  hf = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY)).eval()
  directory = tmp_path_factory.mktemp("hf_base")
  hf.save_pretrained(directory)
  return directory


def hf_base(base_dir):
  return transformers.ViTForImageClassification.from_pretrained(base_dir).eval()


def hf_logits(model, images=IMAGES):
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()


@pytest.fixture(scope="module")
def vitjax_base(base_dir):
  model = vitjax.create_model("vit", **TINY)
  return model, vitjax.load_weights(model, base_dir)


def peft_adapter_dir(base_dir, directory, case, seed=1, random=True):
  """A peft LoRA adapter of `case` on the base model, saved; returns the PeftModel."""
  torch.manual_seed(seed)
  model = peft_lib.get_peft_model(hf_base(base_dir), peft_lib.LoraConfig(**CASES[case]))
  if random:  # peft starts lora_B at zero: every matrix random, so each one counts.
    with torch.no_grad():
      for name, value in model.named_parameters():
        if ".lora_" in name or "modules_to_save" in name:
          value.copy_(0.3 * torch.randn_like(value))
  model.eval().save_pretrained(directory)
  return model


def apply(model, params, images=IMAGES):
  logits, out = model.apply({"params": params}, images)
  return np.asarray(logits), out


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_merges_and_exports_as_peft_computes(case, base_dir, vitjax_base,
                                                                tmp_path):
  model, base = vitjax_base
  hf = peft_adapter_dir(base_dir, tmp_path / "peft", case)
  expected = hf_logits(hf)

  params, peft = peft_format.load_peft(tmp_path / "peft", base, None, model)
  adapted = adapt.adapted(model, peft)
  np.testing.assert_allclose(apply(adapted, params)[0], expected, atol=1e-4, rtol=0)
  assert peft["lora"]["rank"] == CASES[case]["r"]

  # Merged: the plain vitjax model against peft's merge_and_unload().
  merged = adapt.merge(params, peft)
  np.testing.assert_allclose(apply(model, merged)[0], hf_logits(hf.merge_and_unload()),
                             atol=1e-4, rtol=0)
  chex.assert_trees_all_close(adapt.unmerge(merged, adapt.adapter_only(params), peft), params,
                              atol=1e-6)

  # Round trip: vitjax's export into peft on the base model.
  peft_format.export_peft(tmp_path / "exported", params, peft, model)
  reloaded = peft_lib.PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "exported")
  np.testing.assert_allclose(hf_logits(reloaded.eval()), expected, atol=1e-4, rtol=0)
  # The tensors of peft's own file under the same keys (rsLoRA is written as plain LoRA of
  # the same scale), and the classifier, which config.peft.train ('^head/') trains.
  ours = safetensors_numpy.load_file(tmp_path / "exported" / peft_format.WEIGHTS_NAME)
  theirs = safetensors_numpy.load_file(tmp_path / "peft" / peft_format.WEIGHTS_NAME)
  assert set(ours) - set(theirs) <= {"base_model.model.classifier.weight",
                                     "base_model.model.classifier.bias"}
  chex.assert_trees_all_close({k: ours[k] for k in theirs}, theirs, atol=1e-6)
  config = json.loads((tmp_path / "exported" / peft_format.CONFIG_NAME).read_text())
  assert config["target_modules"] == sorted(CASES[case]["target_modules"])
  assert config["modules_to_save"] == ["classifier"]  # config.peft.train: '^head/'.


def test_peft_default_init_leaves_the_model_unchanged(base_dir, vitjax_base, tmp_path):
  model, base = vitjax_base
  peft_adapter_dir(base_dir, tmp_path, "query_value", random=False)  # lora_B = 0.
  params, peft = peft_format.load_peft(tmp_path, base, None, model)
  assert peft["lora"]["targets"] == (
      "encoderblock[^/]*/MultiHeadDotProductAttention_0/(query|value)$")
  assert np.abs(params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
                ["query"]["lora_a"]).min() > 0
  # pre_logits, not logits: they do not go through the (unchanged) head.
  chex.assert_trees_all_close(apply(adapt.adapted(model, peft), params)[1]["pre_logits"],
                              apply(model, base)[1]["pre_logits"], atol=1e-6)


def test_transformers_4_names_scan_layers_and_some_blocks(base_dir, vitjax_base, tmp_path):
  model, base = vitjax_base
  peft_adapter_dir(base_dir, tmp_path / "peft", "query_value")
  params, peft = peft_format.load_peft(tmp_path / "peft", base, None, model)

  # transformers 4's (the hub's) module names, written and read.
  config, tensors = peft_format.peft_adapter(params, peft, model, names="v4")
  assert config["target_modules"] == ["query", "value"]
  assert "base_model.model.vit.encoder.layer.1.attention.attention.value.lora_B.weight" in tensors
  config_v5, tensors_v5 = peft_format.peft_adapter(params, peft, model, names="v5")
  assert config_v5["target_modules"] == ["q_proj", "v_proj"]
  old = tmp_path / "v4"
  peft_format.export_peft(old, params, peft, model, names="v4")
  again, peft_again = peft_format.load_peft(old, base, None, model)
  chex.assert_trees_all_close(again, params, atol=0)
  assert peft_again == peft

  # scan_layers=True: the same adapter, stacked; the same export.
  scanned = vitjax.create_model("vit", **TINY, scan_layers=True)
  stacked, _ = peft_format.load_peft(old, vitjax.load_weights(scanned, base_dir), peft, scanned)
  assert stacked["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]["query"][
      "lora_a"].shape == (2, 32, 4)
  np.testing.assert_allclose(apply(adapt.adapted(scanned, peft), stacked)[0],
                             apply(adapt.adapted(model, peft), params)[0], atol=1e-5)
  chex.assert_trees_all_close(peft_format.peft_adapter(stacked, peft, scanned, names="v5")[1],
                              tensors_v5, atol=0)

  # LoRA in one block only: full module names, and a targets regex naming the block.
  only = {k: v for k, v in tensors_v5.items() if "layers.1." not in k}
  shutil.copytree(tmp_path / "peft", tmp_path / "one_block")
  safetensors_numpy.save_file(only, tmp_path / "one_block" / peft_format.WEIGHTS_NAME)
  one, peft_one = peft_format.load_peft(tmp_path / "one_block", base, None, model)
  assert peft_one["lora"]["targets"] == (
      "encoderblock_(0)/MultiHeadDotProductAttention_0/(query|value)$")
  assert "lora_a" not in one["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"][
      "query"]
  config_one, _ = peft_format.peft_adapter(one, peft_one, model, names="v5")
  assert config_one["target_modules"] == ["layers.0.attention.q_proj",
                                          "layers.0.attention.v_proj"]
  with pytest.raises(ValueError, match="LoRA in some blocks only; a scan_layers=True"):
    peft_format.load_peft(tmp_path / "one_block", vitjax.load_weights(scanned, base_dir), None,
                          scanned)


def _edited(source, destination, **changes):
  shutil.copytree(source, destination)
  path = destination / peft_format.CONFIG_NAME
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))
  return destination


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "trained biases"),
    (dict(rank_pattern={"q_proj": 8}), "one rank and one alpha"),
    (dict(modules_to_save=["layernorm"]), "modules_to_save=\\['layernorm'\\]"),
    (dict(peft_type="IA3"), "LoRA adapters"),
    (dict(r=2), "rank 4; the config says r=2"),
])
def test_load_peft_refuses_what_vitjax_lora_does_not_do(changes, message, base_dir, vitjax_base,
                                                        tmp_path):
  model, base = vitjax_base
  peft_adapter_dir(base_dir, tmp_path / "peft", "query_value")
  with pytest.raises(ValueError, match=message):
    peft_format.load_peft(_edited(tmp_path / "peft", tmp_path / "bad", **changes), base, None,
                          model)


def test_load_peft_checks_a_given_config_and_exports_refuse_clearly(base_dir, vitjax_base,
                                                                    tmp_path):
  model, base = vitjax_base
  peft_adapter_dir(base_dir, tmp_path, "query_value")
  with pytest.raises(ValueError, match="config.peft.lora has rank=2"):
    peft_format.load_peft(tmp_path, base, dict(lora=dict(rank=2, alpha=8)), model)
  with pytest.raises(ValueError, match="puts LoRA on 2 layers, the adapter has 4"):
    peft_format.load_peft(tmp_path, base, dict(lora=dict(rank=4, alpha=8, targets="query$")),
                          model)
  params, peft = peft_format.load_peft(
      tmp_path, base, dict(lora=dict(rank=4, alpha=8, targets="query|value")), model)
  with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
    peft_format.load_peft(tmp_path / "missing", base, None, model)

  with pytest.raises(ValueError, match="also trains 'Transformer/encoder_norm/bias'; peft's LoRA"):
    peft_format.peft_adapter(params, {**peft, "train": "^head/|/bias$"}, model)
  with pytest.raises(ValueError, match="LoRA only"):
    peft_format.peft_adapter(params, {**peft, "prompts": dict(num_tokens=2)}, model)
  with pytest.raises(ValueError, match="no transformers ViT twin: .*pool_type='token'"):
    peft_format.peft_adapter(params, peft, vitjax.create_model("vit", **TINY, pool_type="gap"))
  mixer = vitjax.create_model("mixer_s16_224")
  with pytest.raises(ValueError, match="MlpMixer has no transformers twin"):
    peft_format.peft_adapter(params, peft, mixer)


# --- python -m vitjax.tools.adapt ---------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny LoRA run (2 steps) of a ViT with a class token: transformers has its twin."""
  workdir = tmp_path_factory.mktemp("adapt_cli") / "lora"
  config = config_lib.load_config(QUICKSTART + ":image_size=8,variant=mu/4")
  config_lib.apply_overrides(config, [
      "batch_size=16", "eval_batch_size=200", "total_steps=2", "log_every=2", "eval_every=2",
      "checkpoint_every=2", "optimizer.warmup_steps=1", "model.pool_type=token",
      "peft.lora.rank=2", "peft.lora.targets=query|value|Dense_0$"])
  with config.unlocked():
    config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    config.evaluators = {}  # Only the checkpoint is needed.
  train_lib.train(config, str(workdir), progress=False)
  return workdir


def test_adapt_cli_writes_adapter_merged_weights_and_peft(workdir, tmp_path, capsys):
  config = adapt_tool.read_config(str(workdir))
  model = adapt_tool.build_model(config, str(workdir))
  _, params = adapt_tool.read_params(str(workdir))

  assert adapt_tool.main([str(workdir), "--adapter", str(tmp_path / "a.safetensors")]) == 0
  loaded, peft = adapt.load_adapter(tmp_path / "a.safetensors", params)
  chex.assert_trees_all_close(loaded, params, atol=0)
  assert peft["lora"]["rank"] == 2

  assert adapt_tool.main([str(workdir), "--merged", str(tmp_path / "m.npz")]) == 0
  base = adapt.base_model(model)
  merged = vitjax.load_weights(base, tmp_path / "m.npz")
  chex.assert_trees_all_close(merged, adapt.merge(params, config.peft), atol=0)
  images = IMAGES[:, :8, :8]
  np.testing.assert_allclose(apply(base, merged, images)[0], apply(model, params, images)[0],
                             atol=1e-5)

  assert adapt_tool.main([str(workdir), "--peft", str(tmp_path / "p")]) == 0
  back, peft = peft_format.load_peft(tmp_path / "p", merged, config.peft, model)
  # peft's LoRA on the merged kernels: the LoRA matrices and the head come back exactly.
  chex.assert_trees_all_close(adapt.adapter_only(back, peft), adapt.adapter_only(params, peft),
                              atol=0)
  printed = capsys.readouterr().out
  assert "a.safetensors" in printed and "m.npz" in printed and "target_modules" in printed

  # In process: outputs that exist, a missing directory, a wrong suffix, several or no outputs.
  for argv, message in [
      (["--adapter", str(tmp_path / "a.safetensors")], "already exists"),
      (["--merged", str(tmp_path / "nowhere" / "m.npz")], "no directory"),
      (["--merged", str(tmp_path / "m.safetensors")], "'*.npz'"),
      (["--adapter", str(tmp_path / "x.safetensors"), "--peft", str(tmp_path / "y")],
       "not allowed with"),
      ([], "one of the arguments"),
  ]:
    assert adapt_tool.main([str(workdir), *argv]) == 2, argv
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
  assert not os.path.exists(tmp_path / "x.safetensors")
  assert not os.path.exists(tmp_path / "y")

  plain = tmp_path / "plain"  # A workdir whose config.peft has no adapters.
  shutil.copytree(workdir, plain)
  saved = json.loads((plain / "config.json").read_text())
  saved["peft"]["lora"]["rank"] = 0
  (plain / "config.json").write_text(json.dumps(saved))
  assert adapt_tool.main([str(plain), "--adapter", str(tmp_path / "b.safetensors")]) == 2
  assert "no adapters" in capsys.readouterr().err
  saved["peft"]["prompts"]["num_tokens"] = 2  # Prompts: nothing to merge them into.
  (plain / "config.json").write_text(json.dumps(saved))
  assert adapt_tool.main([str(plain), "--merged", str(tmp_path / "b.npz")]) == 2
  assert "only LoRA merges" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "b.safetensors") and not os.path.exists(tmp_path / "b.npz")


def test_adapt_cli_rejects_a_missing_workdir_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "vitjax.tools.adapt", str(tmp_path / "missing"), "--peft",
       str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert re.search("missing.*(no such|not a) ", result.stderr), result.stderr
  assert not os.path.exists(tmp_path / "out")
