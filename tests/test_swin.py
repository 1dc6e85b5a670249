"""Swin Transformer: parameter counts, parity with HF transformers, timm layouts, errors.

Randomly initialised transformers models are the numerical oracle; nothing is
downloaded. Run: python -m pytest -q tests/test_swin.py
"""

import re

import flax.linen
import jax
import numpy as np
import pytest

import vitjax
from vitjax.convert import CheckpointError, CheckpointMismatchError
from vitjax.convert.swin import load_swin_weights
from vitjax.models import count_params, param_shapes
from vitjax.models import swin

import torch  # The oracle: a failed import fails the test.
import transformers  # The oracle: a failed import fails the test.
import safetensors.torch as safetensors_torch  # The oracle: a failed import fails the test.

NUM_CLASSES = 5
# Stage maps 16 and 8 with 4x4 windows: both stages shift (odd blocks).
TINY = dict(image_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
            window_size=4)
# Stage maps 14, 7, 4: windows padded (14 -> 16, 7 -> 8), patch merging of an odd map,
# and a last stage no larger than the window (one window, no shift).
ODD = dict(TINY, image_size=56, depths=(2, 2, 2), num_heads=(2, 4, 8))


def tiny_model(config=TINY, **overrides):
  return swin.SwinTransformer(**{**config, "num_classes": NUM_CLASSES, **overrides})


def hf_swin(config, seed=0):
  """A randomly initialised SwinForImageClassification twin of `config`, in eval mode."""
  torch.manual_seed(seed)
  hf_config = transformers.SwinConfig(
      image_size=config["image_size"], patch_size=config["patch_size"],
      embed_dim=config["embed_dim"], depths=list(config["depths"]),
      num_heads=list(config["num_heads"]), window_size=config["window_size"],
      num_labels=NUM_CLASSES)
  model = transformers.SwinForImageClassification(hf_config).eval()
  # transformers starts the bias tables at zero and the norms at identity; make them count.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "relative_position_bias_table" in name:
        p.normal_(0.0, 1.0)
      elif "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
      elif name.startswith("classifier"):
        p.normal_(0.0, 0.5)
  return model


def hf_outputs(model, images):
  """Logits and each stage's output map before downsampling, NHWC."""
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
  with torch.no_grad():
    logits = model(pixels).logits.numpy()
    embeddings, grid = model.swin.embeddings(pixels)
    out = model.swin.encoder(embeddings, grid, output_hidden_states=True,
                             output_hidden_states_before_downsampling=True)
  stages = [h.numpy().transpose(0, 2, 3, 1) for h in out.reshaped_hidden_states[1:]]
  return logits, stages


class Twin:
  """An HF model saved to disk, its reference outputs, and the vitjax model's jitted apply."""

  def __init__(self, config, tmp_path_factory):
    size = config["image_size"]
    self.images = np.random.RandomState(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    self.hf = hf_swin(config)
    self.logits, self.stages = hf_outputs(self.hf, self.images)
    self.directory = tmp_path_factory.mktemp("hf_swin")
    self.hf.save_pretrained(self.directory)  # Hub names, model.safetensors.
    self.model = tiny_model(config)
    self._apply = jax.jit(self.model.apply)

  def apply(self, params):
    logits, out = self._apply({"params": params}, self.images)
    return np.asarray(logits), out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return Twin(TINY, tmp_path_factory)


def flat(params):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def registered():
  entries = {}
  swin.register_swins(lambda name, module, **kwargs: entries.setdefault(name, (module, kwargs)))
  return entries


@pytest.mark.parametrize("name, expected", [
    ("swin_tiny_patch4_window7_224", 28_288_354),
    ("swin_small_patch4_window7_224", 49_606_258),
    ("swin_base_patch4_window7_224", 87_768_224),
    ("swin_large_patch4_window7_224", 196_532_476),
])
def test_param_counts_match_timm(name, expected):
  module, kwargs = registered()[name]
  config = {k: v for k, v in kwargs.items() if k not in ("mean", "std", "paper")}
  # timm counts the bias tables, not the buffers (relative_position_index, attn_mask).
  assert count_params(param_shapes(module(**config))) == expected


def test_registration_names():
  assert sorted(registered()) == sorted([
      "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
      "swin_base_patch4_window7_224", "swin_base_patch4_window12_384",
      "swin_large_patch4_window7_224", "swin_large_patch4_window12_384"])


@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_hf_logits_and_stages_match(container, tiny, tmp_path):
  if container == "safetensors":
    path = tiny.directory
  else:  # transformers >= 5 names in memory (attention.q_proj, mlp.fc1, ...), a torch file.
    path = tmp_path / "pytorch_model.bin"
    torch.save(tiny.hf.state_dict(), path)
  params = load_swin_weights(tiny.model, path)
  logits, out = tiny.apply(params)
  assert np.abs(tiny.logits).max() > 0.1  # The comparison means something.
  np.testing.assert_allclose(logits, tiny.logits, atol=1e-4, rtol=0)
  assert [k for k in out if k.startswith("stage")] == ["stage1", "stage2"]
  for ours, theirs in zip((out["stage1"], out["stage2"]), tiny.stages):
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out["logits"]), logits)
  assert out["pre_logits"].shape == (2, 64)


def test_hf_odd_sizes_match(tmp_path_factory):
  twin = Twin(ODD, tmp_path_factory)
  assert swin.stage_windows(56, 4, 4, 3) == [(14, 4, 2), (7, 4, 2), (4, 4, 0)]
  logits, out = twin.apply(load_swin_weights(twin.model, twin.directory))
  np.testing.assert_allclose(logits, twin.logits, atol=1e-4, rtol=0)
  for k, theirs in enumerate(twin.stages):
    np.testing.assert_allclose(np.asarray(out[f"stage{k + 1}"]), theirs, atol=1e-4, rtol=1e-4)


def timm_state_dict(hub_state_dict, new_layout):
  """HF hub names -> timm's, written out independently of vitjax.

  new_layout: timm >= 0.9 (downsample opens stages 1.., head.fc); else older timm
  (downsample closes stages ..n-2, head), which also saved its buffers.
  """
  sd = {re.sub(r"^swin\.", "", k): v for k, v in hub_state_dict.items()}
  out = {}
  for name, x in sd.items():
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.*)", name)
    if m:
      stage = int(m[1]) + 1 if new_layout else int(m[1])
      out[f"layers.{stage}.downsample.{m[2]}"] = x
      continue
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", name)
    if m:
      hub_block, block, rest = name[:-len(m[3])], f"layers.{m[1]}.blocks.{m[2]}.", m[3]
      if rest.startswith(("attention.self.key", "attention.self.value")):
        continue
      if rest.startswith("attention.self.query"):
        leaf = rest.rsplit(".", 1)[1]
        parts = [sd[f"{hub_block}attention.self.{p}.{leaf}"] for p in ("query", "key", "value")]
        out[block + "attn.qkv." + leaf] = torch.cat(parts, 0)
        continue
      for hub, timm in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                        ("attention.self.", "attn."), ("attention.output.dense", "attn.proj"),
                        ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
        if rest.startswith(hub):
          rest = timm + rest[len(hub):]
          break
      out[block + rest] = x
      continue
    name = (name.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
            .replace("embeddings.norm", "patch_embed.norm").replace("layernorm.", "norm.")
            .replace("classifier.", "head.fc." if new_layout else "head."))
    out[name] = x
  if not new_layout:  # Buffers that old timm saved, which the loader ignores.
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
  return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("new_layout", [True, False], ids=["timm>=0.9", "timm<0.9"])
def test_timm_layouts_match(new_layout, tiny, tmp_path):
  hub = safetensors_torch.load_file(tiny.directory / "model.safetensors")
  state_dict = timm_state_dict(hub, new_layout)
  assert any(k.startswith("layers.1.downsample" if new_layout else "layers.0.downsample")
             for k in state_dict)
  if new_layout:
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state_dict, path)
  else:
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state_dict}, path)  # As the Microsoft release wraps it.
  params = load_swin_weights(tiny.model, path)
  np.testing.assert_allclose(tiny.apply(params)[0], tiny.logits, atol=1e-4, rtol=0)
  reference = flat(load_swin_weights(tiny.model, tiny.directory))
  assert all(np.array_equal(v, reference[k]) for k, v in flat(params).items())


def test_pallas_window_attention_matches_xla(tiny):
  params = load_swin_weights(tiny.model, tiny.directory)
  pallas = tiny.model.clone(attention_impl="pallas")
  logits, out = jax.jit(pallas.apply)({"params": params}, tiny.images)
  np.testing.assert_allclose(np.asarray(logits), tiny.logits, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out["stage2"]), tiny.stages[1], atol=1e-4, rtol=1e-4)


def random_params(model, seed=0):
  # Compiling model.init costs more than the whole forward pass of these tiny models.
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: rng.normal(0.0, 0.2, s.shape).astype(s.dtype), param_shapes(model))


def test_train_mode_drop_path_uses_dropout_rng():
  model = tiny_model(image_size=32, depths=(1, 1), drop_path_rate=0.5)
  images = np.random.RandomState(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  variables = {"params": random_params(model)}
  apply = jax.jit(lambda rng: model.apply(variables, images, train=True,
                                          rngs={"dropout": rng})[1]["pre_logits"])
  a, b, a_again = (np.asarray(apply(jax.random.PRNGKey(seed))) for seed in (1, 2, 1))
  assert np.all(np.isfinite(a))
  assert not np.allclose(a, b)  # Different branches dropped.
  np.testing.assert_array_equal(a, a_again)
  with pytest.raises(flax.errors.InvalidRngError):  # Tracing is enough to find out.
    jax.eval_shape(lambda: model.apply(variables, images, train=True))


def test_window_clipped_to_small_maps():
  # 32 px: maps 8 and 4 under 8x8 windows: stage 1 is one window, stage 2 one clipped
  # window (4x4, so a 7x7 table, as timm); neither shifts.
  assert swin.stage_windows(32, 4, 8, 2) == [(8, 8, 0), (4, 4, 0)]
  model = tiny_model(image_size=32, window_size=8)
  params = random_params(model)
  assert params["stage1"]["block1"]["relative_position_bias_table"].shape == (15 * 15, 2)
  assert params["stage2"]["block1"]["relative_position_bias_table"].shape == (7 * 7, 4)
  images = np.random.RandomState(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  logits, out = jax.jit(model.apply)({"params": params}, images)
  assert logits.shape == (1, NUM_CLASSES) and out["stage2"].shape == (1, 4, 4, 64)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_window_helpers():
  x = np.arange(2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
  windows = swin.window_partition(x, 4)
  assert windows.shape == (8, 16, 3)
  np.testing.assert_array_equal(windows[1].reshape(4, 4, 3), x[0, :4, 4:])  # Row-major.
  np.testing.assert_array_equal(swin.window_reverse(windows, 4, 8, 8), x)
  index = swin.relative_position_index(3)
  assert index.shape == (9, 9) and index.min() == 0 and index.max() == 24
  assert np.all(np.diag(index) == 12)  # Zero offset is the centre of the 5x5 table.
  mask = swin.shifted_window_mask(8, 8, 4, 2)
  assert mask.shape == (4, 16, 16)
  assert mask[0].all()  # The first window holds one region only.
  assert mask[3].sum() == 4 * 4 * 4  # The last one four 2x2 regions.


def test_mismatch_errors_are_helpful(tiny, tmp_path):
  with pytest.raises(CheckpointMismatchError) as error:
    load_swin_weights(tiny_model(num_classes=10), tiny.directory)
  message = str(error.value)
  assert "head/kernel: checkpoint (64, 5), model (64, 10)" in message
  assert "head='reinit'" in message
  params = flat(load_swin_weights(tiny_model(num_classes=10), tiny.directory, head="reinit"))
  reference = flat(load_swin_weights(tiny.model, tiny.directory))
  assert params["head/kernel"].shape == (64, 10)
  assert all(np.array_equal(params[k], v) for k, v in reference.items() if not k.startswith("head"))

  with pytest.raises(CheckpointMismatchError) as error:
    load_swin_weights(tiny_model(depths=(2, 3)), tiny.directory)
  message = str(error.value)
  assert "Missing" in message and "stage2/block2/LayerNorm_0/scale" in message
  assert "depths=(2, 2), the model depths=(2, 3)" in message

  # Another window loads (the bias tables are resized, see below); other heads do not.
  with pytest.raises(CheckpointMismatchError) as error:
    load_swin_weights(tiny_model(num_heads=(4, 4)), tiny.directory)
  message = str(error.value)
  assert "stage1/block0/relative_position_bias_table: checkpoint (49, 2), model (49, 4)" in message
  assert "Stage 1: the checkpoint has 2 attention heads, the model 4" in message

  vit_like = tmp_path / "vit.safetensors"
  safetensors_torch.save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
                               "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, vit_like)
  with pytest.raises(CheckpointError, match="not a Swin Transformer"):
    load_swin_weights(tiny.model, vit_like)
  with pytest.raises(ValueError, match="head="):
    load_swin_weights(tiny.model, tiny.directory, head="keep")


def test_vitjax_load_weights_dispatches_swin(tiny, tmp_path):
  by_name = vitjax.load_weights(tiny.model, tiny.directory)
  np.testing.assert_allclose(tiny.apply(by_name)[0], tiny.logits, atol=1e-4, rtol=0)
  # A Swin checkpoint given to a ViT is named as such.
  with pytest.raises(CheckpointError, match="holds a Swin Transformer"):
    vitjax.load_weights(vitjax.create_model("vit", variant="Ti/16", image_size=64), tiny.directory)


@pytest.mark.parametrize("format", ["hf", "timm"])
def test_export_loads_back_in_transformers_and_vitjax(format, tiny, tmp_path):
  params = load_swin_weights(tiny.model, tiny.directory)
  path = tmp_path / "exported.safetensors"
  vitjax.save_weights(params, path, format=format)
  exported = safetensors_torch.load_file(path)
  if format == "hf":
    # The same names as the hub checkpoint, which transformers itself wrote.
    hub = safetensors_torch.load_file(tiny.directory / "model.safetensors")
    assert sorted(exported) == sorted(k for k in hub if not k.endswith("relative_position_index"))
    # Hub names are what from_pretrained reads in every transformers version (>= 5 renames
    # them in memory, so load_state_dict would want its own names there).
    directory = tmp_path / "hf"
    tiny.hf.config.save_pretrained(directory)
    path.rename(directory / "model.safetensors")
    model, info = transformers.SwinForImageClassification.from_pretrained(
        directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_allclose(hf_outputs(model.eval(), tiny.images)[0], tiny.logits, atol=1e-4)
    path = directory / "model.safetensors"
  else:  # timm >= 0.9 names, written out independently above.
    want = timm_state_dict(safetensors_torch.load_file(tiny.directory / "model.safetensors"),
                           new_layout=True)
    assert sorted(exported) == sorted(k for k in want if not k.endswith("_index"))
  back = flat(load_swin_weights(tiny.model, path))
  assert all(np.array_equal(v, back[k]) for k, v in flat(params).items())


def test_bias_tables_resize_for_another_window(tiny, tmp_path):
  """224/w7 weights into a 384/w12 model, in miniature: 4x4 windows into 6x6 ones."""
  model = tiny_model(TINY, window_size=6, image_size=96)
  params = flat(load_swin_weights(model, tiny.directory))
  hub = safetensors_torch.load_file(tiny.directory / "model.safetensors")
  table = hub["swin.encoder.layers.0.blocks.1.attention.self.relative_position_bias_table"]
  side, heads = 7, table.shape[1]
  # timm's resize: the (2w-1)^2 table as an image per head, bicubic.
  want = torch.nn.functional.interpolate(
      table.T.reshape(1, heads, side, side), size=(11, 11), mode="bicubic",
      align_corners=False)[0].reshape(heads, -1).T
  np.testing.assert_allclose(params["stage1/block1/relative_position_bias_table"], want.numpy(),
                             atol=1e-5)
  assert params["stage2/block0/relative_position_bias_table"].shape == (121, 4)
