"""Weight conversion: HF transformers and timm state dicts, big_vision .npz, errors.

Randomly initialised transformers models are the numerical oracle; nothing is
downloaded. Run: python -m pytest -q tests/test_convert.py
"""

import os
import pickle
import re
import zipfile

import flax.linen
import jax
import numpy as np
import pytest

import vitjax
from vitjax.convert import CheckpointError, CheckpointMismatchError, hf_config
from vitjax.models import init_params
from vitjax.models.posemb import resize_posemb

import torch  # The oracle: a failed import fails the test.
import transformers  # The oracle: a failed import fails the test.
import safetensors.torch as safetensors_torch  # The oracle: a failed import fails the test.

TINY = dict(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32)
HF_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, patch_size=8, image_size=32, layer_norm_eps=1e-6)
NUM_CLASSES = 5


def tiny_model(**overrides):
  return vitjax.create_model("vit", **{**TINY, "num_classes": NUM_CLASSES, **overrides})


def random_params(model, seed=0):
  # Eager init: for models this small, faster than compiling init_params.
  images = np.zeros((1, model.image_size, model.image_size, 3), np.float32)
  return jax.device_get(flax.linen.unbox(model.init(jax.random.PRNGKey(seed), images)["params"]))


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def hf_model(kind, seed=0):
  """A randomly initialised transformers model in eval mode, and its vitjax twin's options."""
  torch.manual_seed(seed)
  if kind == "vit":
    config = transformers.ViTConfig(**HF_TINY, num_labels=NUM_CLASSES)
    return transformers.ViTForImageClassification(config).eval(), {}
  if kind == "vit_pooler":
    config = transformers.ViTConfig(**HF_TINY)
    model = transformers.ViTModel(config, add_pooling_layer=True).eval()
    return model, dict(num_classes=0, representation_size=64)
  config = transformers.DeiTConfig(**HF_TINY, num_labels=NUM_CLASSES)
  if kind == "deit_teacher":
    return transformers.DeiTForImageClassificationWithTeacher(config).eval(), dict(distilled=True)
  assert kind == "deit_single_head", kind
  return transformers.DeiTForImageClassification(config).eval(), dict(distilled=True)


def hf_logits(model, images):
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
  logits = out.pooler_output if isinstance(model, transformers.ViTModel) else out.logits
  return logits.numpy()


def vitjax_logits(model, params, images):
  logits, _ = model.apply({"params": params}, images)
  return np.asarray(logits)


def hub_names(state_dict):
  """transformers >= 5 module names -> the names of the files on the hub (any version)."""
  renames = [(r"^((?:vit|deit)\.)?layers\.(\d+)\.", r"\1encoder.layer.\2."),
             (r"attention\.([qkv])_proj", lambda m: "attention.attention." +
              {"q": "query", "k": "key", "v": "value"}[m[1]]),
             (r"attention\.o_proj", "attention.output.dense"),
             (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense")]
  out = {}
  for name, tensor in state_dict.items():
    for pattern, replacement in renames:
      name = re.sub(pattern, replacement, name)
    out[name] = tensor.contiguous()
  return out


def timm_state_dict(hf_state_dict):
  """timm's VisionTransformer names, made from hub-named HF weights: q, k, v fused."""
  sd = {re.sub(r"^(vit|deit)\.", "", k): v for k, v in hf_state_dict.items()}
  out = {"patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "cls_token": sd["embeddings.cls_token"],
         "pos_embed": sd["embeddings.position_embeddings"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  if "embeddings.distillation_token" in sd:
    out["dist_token"] = sd["embeddings.distillation_token"]
  for i in range(HF_TINY["num_hidden_layers"]):
    hf, timm = f"encoder.layer.{i}.", f"blocks.{i}."
    for leaf in ("weight", "bias"):
      out[timm + "norm1." + leaf] = sd[hf + "layernorm_before." + leaf]
      out[timm + "attn.qkv." + leaf] = torch.cat(
          [sd[f"{hf}attention.attention.{p}.{leaf}"] for p in ("query", "key", "value")])
      out[timm + "attn.proj." + leaf] = sd[hf + "attention.output.dense." + leaf]
      out[timm + "norm2." + leaf] = sd[hf + "layernorm_after." + leaf]
      out[timm + "mlp.fc1." + leaf] = sd[hf + "intermediate.dense." + leaf]
      out[timm + "mlp.fc2." + leaf] = sd[hf + "output.dense." + leaf]
  heads = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
  for hf, timm in heads.items():
    for leaf in ("weight", "bias"):
      if f"{hf}.{leaf}" in sd:
        out[f"{timm}.{leaf}"] = sd[f"{hf}.{leaf}"]
  return out


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- Hugging Face transformers and timm --------------------------------------------------------

@pytest.mark.parametrize("kind", ["vit", "vit_pooler", "deit_teacher"])
@pytest.mark.parametrize("container", ["safetensors", "bin", "pth_wrapped"])
def test_hf_logits_match(kind, container, images, tmp_path):
  hf, options = hf_model(kind)
  if container == "safetensors":  # Hub names, as published.
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(hub_names(hf.state_dict()), path)
  elif container == "bin":  # The in-memory names of this transformers version.
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf.state_dict(), path)
  else:  # A training checkpoint: {'model': state_dict, ...}.
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": hub_names(hf.state_dict()), "epoch": 3}, path)
  model = tiny_model(**options)
  params = vitjax.load_weights(model, path)
  np.testing.assert_allclose(vitjax_logits(model, params, images), hf_logits(hf, images),
                             atol=1e-4, rtol=0)


def test_hf_deit_single_head(images, tmp_path):
  # DeiTForImageClassification keeps the distillation token but classifies from the class
  # token alone; vitjax's distilled models average two heads, so only the backbone matches.
  hf, options = hf_model("deit_single_head")
  path = tmp_path / "deit.safetensors"
  safetensors_torch.save_file(hub_names(hf.state_dict()), path)
  model = tiny_model(**options)
  with pytest.raises(CheckpointMismatchError, match=r"(?s)head_dist/kernel \(64, 5\).*"
                     r"distillation token but a single head.*head='reinit'"):
    vitjax.load_weights(model, path)
  params = vitjax.load_weights(model, path, head="reinit")
  _, out = model.apply({"params": params}, images)
  with torch.no_grad():
    hidden = hf.deit(torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(out["encoded"]), hidden, atol=1e-4, rtol=0)
  classifier = hf.classifier.weight.detach().numpy(), hf.classifier.bias.detach().numpy()
  np.testing.assert_allclose(np.asarray(out["encoded"][:, 0]) @ classifier[0].T + classifier[1],
                             hf_logits(hf, images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("container", ["directory", "bin"])
def test_hf_vit_model_without_pooler_dino(container, images, tmp_path):
  # DINO v1's ViTs on the hub (facebook/dino-vits16, ...) are ViTModels without a pooler
  # (add_pooling_layer=False), LayerNorm epsilon 1e-6, q, k, v biases: a headless ViT
  # with a class token.
  torch.manual_seed(0)
  hf = transformers.ViTModel(transformers.ViTConfig(**HF_TINY), add_pooling_layer=False).eval()
  if container == "directory":  # save_pretrained: the hub's names.
    hf.save_pretrained(tmp_path)
    path = tmp_path
  else:  # The in-memory names of this transformers version.
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf.state_dict(), path)
  model = tiny_model(num_classes=0, pool_type="token")
  _, out = model.apply({"params": vitjax.load_weights(model, path)}, images)
  with torch.no_grad():
    hidden = hf(torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(out["encoded"]), hidden, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out["pre_logits"]), hidden[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "deit_teacher"])
def test_timm_logits_match(kind, images, tmp_path):
  hf, options = hf_model(kind)
  path = tmp_path / "timm.pth"
  state_dict = timm_state_dict(hub_names(hf.state_dict()))
  if kind == "deit_teacher":  # Saved from inside DistributedDataParallel.
    state_dict = {"module." + k: v for k, v in state_dict.items()}
  torch.save({"state_dict": state_dict, "epoch": 300}, path)
  model = tiny_model(**options)
  params = vitjax.load_weights(model, path)
  np.testing.assert_allclose(vitjax_logits(model, params, images), hf_logits(hf, images),
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "vit_pooler", "deit_teacher"])
def test_export_hf_loads_in_transformers(kind, images, tmp_path):
  hf, options = hf_model(kind, seed=1)
  model = tiny_model(**options)
  params = random_params(tiny_model(**options, head_zeroinit=False), seed=1)
  vitjax.save_weights(params, tmp_path / "model.safetensors", format="hf")
  config = transformers.AutoConfig.for_model(**hf_config(model))
  config.save_pretrained(tmp_path)
  exported, info = type(hf).from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info  # No missing, unexpected or mismatched names.
  np.testing.assert_allclose(hf_logits(exported.eval(), images),
                             vitjax_logits(model, params, images), atol=1e-4, rtol=0)
  assert_trees_equal(vitjax.load_weights(model, tmp_path), params)  # A model directory.


def test_export_timm_names(tmp_path):
  hf, options = hf_model("deit_teacher")
  model = tiny_model(**options)
  path = tmp_path / "model.safetensors"
  safetensors_torch.save_file(hub_names(hf.state_dict()), path)
  vitjax.save_weights(vitjax.load_weights(model, path), tmp_path / "timm.safetensors",
                      format="timm")
  exported = safetensors_torch.load_file(tmp_path / "timm.safetensors")
  expected = timm_state_dict(hub_names(hf.state_dict()))
  assert sorted(exported) == sorted(expected)
  for name, tensor in expected.items():
    torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)


def timm_attention_pool(sd, tokens, num_heads):
  """timm's AttentionPoolLatent (one latent, pool='token'), written out in torch."""
  batch, length, width = tokens.shape
  linear = lambda name, x: x @ sd[name + ".weight"].T + sd[name + ".bias"]
  split = lambda x: x.reshape(batch, -1, num_heads, width // num_heads).transpose(1, 2)
  q = split(linear("attn_pool.q", sd["attn_pool.latent"].expand(batch, -1, -1)))
  k, v = map(split, linear("attn_pool.kv", tokens).chunk(2, dim=-1))
  x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
  x = linear("attn_pool.proj", x.transpose(1, 2).reshape(batch, 1, width))
  y = torch.nn.functional.layer_norm(x, (width,), sd["attn_pool.norm.weight"],
                                     sd["attn_pool.norm.bias"], eps=1e-6)
  y = linear("attn_pool.mlp.fc2", torch.nn.functional.gelu(linear("attn_pool.mlp.fc1", y)))
  return (x + y)[:, 0]


@pytest.mark.parametrize("pool_type", ["map", "gap"])
def test_export_timm_without_class_token(pool_type, images, tmp_path):
  model = tiny_model(pool_type=pool_type, head_zeroinit=False)
  params = random_params(model)
  vitjax.save_weights(params, tmp_path / "timm.safetensors", format="timm")
  sd = safetensors_torch.load_file(tmp_path / "timm.safetensors")
  assert "cls_token" not in sd and sd["pos_embed"].shape == (1, 16, 64)
  assert_trees_equal(vitjax.load_weights(model, tmp_path / "timm.safetensors"), params)
  if pool_type == "map":
    _, out = model.apply({"params": params}, images)
    pooled = timm_attention_pool(sd, torch.from_numpy(np.array(out["encoded"])),
                                 TINY["num_heads"])
    np.testing.assert_allclose(pooled.numpy(), np.asarray(out["head_input"]), atol=1e-5,
                               rtol=0)


def test_bfloat16_safetensors(tmp_path):
  hf, _ = hf_model("vit")
  state_dict = {k: v.to(torch.bfloat16) for k, v in hub_names(hf.state_dict()).items()}
  safetensors_torch.save_file(state_dict, tmp_path / "bf16.safetensors")
  model = tiny_model(param_dtype=jax.numpy.bfloat16)
  params = vitjax.load_weights(model, tmp_path / "bf16.safetensors")
  kernel = params["embedding"]["kernel"]
  assert kernel.dtype == jax.numpy.bfloat16
  expected = state_dict["vit.embeddings.patch_embeddings.projection.weight"].float().numpy()
  np.testing.assert_array_equal(kernel.astype(np.float32), expected.transpose(2, 3, 1, 0))


# --- big_vision .npz ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_params():
  return random_params(tiny_model(head_zeroinit=False))


def flat(params):
  return {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_npz_round_trip_is_exact(vit_params, tmp_path):
  vitjax.save_weights(vit_params, tmp_path / "vit.npz")
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # Written atomically.
  assert_trees_equal(vitjax.load_weights(tiny_model(), tmp_path / "vit.npz"), vit_params)


def test_npz_augreg_layout(vit_params, images, tmp_path):
  # The vision_transformer / AugReg names, and a flax optimizer wrapper around them.
  old_names = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
               "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
  arrays = {}
  for name, value in flat(vit_params).items():
    parts = name.split("/")
    if name == "pos_embedding":
      parts = ["Transformer", "posembed_input", "pos_embedding"]
    parts = [old_names.get(p, p) if parts[0] == "Transformer" else p for p in parts]
    arrays["opt/target/" + "/".join(parts)] = value
  arrays["opt/state/step"] = np.array(10)
  # Adam moments have the parameters' names: the weights are the ones under opt/target/.
  arrays["opt/state/param_states/mu/embedding/kernel"] = np.zeros((8, 8, 3, 64), np.float32)
  np.savez(tmp_path / "augreg.npz", **arrays)
  model = tiny_model()
  params = vitjax.load_weights(model, tmp_path / "augreg.npz")
  assert_trees_equal(params, vit_params)
  np.testing.assert_array_equal(vitjax_logits(model, params, images),
                                vitjax_logits(model, vit_params, images))


def test_npz_grid_only_posemb(vit_params, images, tmp_path):
  # Modern big_vision: position embeddings for the patches only, the class token's
  # own position embedding folded into it; and blocks stacked by scan=True.
  arrays = flat(vit_params)
  posemb = arrays.pop("pos_embedding")
  arrays["cls"] = arrays["cls"] + posemb[:, :1]
  arrays["pos_embedding"] = posemb[:, 1:]
  for name in [n for n in arrays if n.startswith("Transformer/encoderblock_0/")]:
    rest = name.split("/", 2)[2]
    arrays["Transformer/encoderblock/" + rest] = np.stack(
        [arrays.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(TINY["depth"])])
  np.savez(tmp_path / "big_vision.npz", **{"params/" + k: v for k, v in arrays.items()})
  model = tiny_model()
  params = vitjax.load_weights(model, tmp_path / "big_vision.npz")
  np.testing.assert_allclose(vitjax_logits(model, params, images),
                             vitjax_logits(model, vit_params, images), atol=1e-5, rtol=0)


def test_resolution_change_resizes_posemb(vit_params, tmp_path):
  vitjax.save_weights(vit_params, tmp_path / "vit32.npz")
  model = tiny_model(image_size=48)
  params = vitjax.load_weights(model, tmp_path / "vit32.npz")
  assert params["pos_embedding"].shape == (1, 1 + 6 * 6, 64)
  np.testing.assert_array_equal(params["pos_embedding"],
                                resize_posemb(vit_params["pos_embedding"], (6, 6), 1))
  vit_params = dict(vit_params, pos_embedding=params["pos_embedding"])
  assert_trees_equal(params, vit_params)
  model.apply({"params": params}, np.zeros((1, 48, 48, 3), np.float32))


# --- Mismatches ----------------------------------------------------------------------------------

def test_head_mismatch_error_and_reinit(vit_params, tmp_path):
  vitjax.save_weights(vit_params, tmp_path / "vit.npz")
  model = tiny_model(num_classes=10, head_zeroinit=False)
  with pytest.raises(CheckpointMismatchError) as error:
    vitjax.load_weights(model, tmp_path / "vit.npz")
  message = str(error.value)
  assert "head/kernel: checkpoint (64, 5), model (64, 10)" in message
  assert "head/bias: checkpoint (5,), model (10,)" in message
  assert "head='reinit'" in message and "encoderblock" not in message
  params = vitjax.load_weights(model, tmp_path / "vit.npz", head="reinit", rng=3)
  # The head init_params(model, rng) would give.
  assert_trees_equal(params["head"], jax.device_get(init_params(model, rng=3)["head"]))
  assert_trees_equal({k: v for k, v in params.items() if k != "head"},
                     {k: v for k, v in vit_params.items() if k != "head"})


def test_depth_mismatch_lists_missing_and_unexpected(tmp_path):
  vitjax.save_weights(random_params(tiny_model(depth=3)), tmp_path / "deep.npz")
  with pytest.raises(CheckpointMismatchError) as error:
    vitjax.load_weights(tiny_model(depth=2), tmp_path / "deep.npz")
  message = str(error.value)
  assert "Unexpected (in the checkpoint, not in the model) (16)" in message
  assert "Transformer/encoderblock_2/MlpBlock_0/Dense_0/kernel (64, 128)" in message
  assert "head='reinit'" not in message and "3 blocks, the model depth=2" in message
  vitjax.save_weights(random_params(tiny_model(depth=1)), tmp_path / "shallow.npz")
  with pytest.raises(CheckpointMismatchError, match=r"Missing \(in the model, not in the "
                     r"checkpoint\) \(16\):\n  Transformer/encoderblock_1/LayerNorm_0/bias"):
    vitjax.load_weights(tiny_model(depth=2), tmp_path / "shallow.npz")


def test_unknown_layout(tmp_path):
  np.savez(tmp_path / "other.npz", **{"encoder/conv1/w": np.zeros(3), "fc/b": np.zeros(2)})
  with pytest.raises(CheckpointError, match=r"other\.npz.*Found: encoder/conv1/w, fc/b.*timm"):
    vitjax.load_weights(tiny_model(), tmp_path / "other.npz")


# --- Bad files ---------------------------------------------------------------------------------

def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here.npz"):
    vitjax.load_weights(tiny_model(), tmp_path / "nothing_here.npz")


@pytest.mark.parametrize("name", ["random.npz", "random.safetensors", "random.pth"])
def test_random_bytes(name, tmp_path):
  path = tmp_path / name
  path.write_bytes(np.random.RandomState(0).bytes(4096))
  with pytest.raises(CheckpointError, match=re.escape(str(path))):
    vitjax.load_weights(tiny_model(), path)


@pytest.mark.parametrize("name", ["vit.npz", "vit.safetensors", "vit.pth"])
def test_truncated_file(name, vit_params, tmp_path):
  full = tmp_path / ("full_" + name)
  if name.endswith(".npz"):
    vitjax.save_weights(vit_params, full)
  else:
    hf, _ = hf_model("vit")
    state_dict = hub_names(hf.state_dict())
    if name.endswith(".pth"):
      torch.save(state_dict, full)
    else:
      safetensors_torch.save_file(state_dict, full)
  path = tmp_path / name
  path.write_bytes(full.read_bytes()[:-5000])
  with pytest.raises(CheckpointError, match=re.escape(str(path))):
    vitjax.load_weights(tiny_model(), path)


class _Payload:
  """Unpickling this creates a file: the stand-in for arbitrary code execution."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return open, (self.marker, "w")


@pytest.mark.parametrize("name,container", [("evil.pth", "pickle"), ("evil.npz", "pickle"),
                                            ("evil.bin", "torch")])
def test_never_unpickles(name, container, tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / name
  payload = {"patch_embed.proj.weight": _Payload(marker)}
  if container == "pickle":
    path.write_bytes(pickle.dumps(payload, protocol=2))
  else:
    torch.save(payload, path)
    assert zipfile.is_zipfile(path)
  with pytest.raises(CheckpointError, match=re.escape(str(path))):
    vitjax.load_weights(tiny_model(), path)
  assert not marker.exists()
  # The payload is live: plain pickle would have run it.
  control = tmp_path / "control"
  pickle.loads(pickle.dumps(_Payload(control))).close()
  assert control.exists()


def test_timm_registers_and_layer_scale_round_trip(tmp_path):
  """timm's vit_*_reg4_* names (reg_token, ls1/ls2.gamma), its pos_embed with or without
  the class token's entry (no_embed_class), against vitjax's own params."""
  model = tiny_model(num_registers=2, layer_scale_init=0.5)
  params = jax.tree_util.tree_map(np.asarray, init_params(model))
  path = tmp_path / "timm.safetensors"
  vitjax.save_weights(params, path, format="timm")
  state_dict = safetensors_torch.load_file(path)
  block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
  expected = (["cls_token", "reg_token", "pos_embed"]
              + [f"{m}.{leaf}" for m in ["patch_embed.proj", "norm", "head"]
                 for leaf in ("weight", "bias")]
              + [f"blocks.{i}.{m}.{leaf}" for i in range(2) for m in block
                 for leaf in ("weight", "bias")]
              + [f"blocks.{i}.ls{k}.gamma" for i in range(2) for k in (1, 2)])
  assert sorted(state_dict) == sorted(expected)
  assert tuple(state_dict["reg_token"].shape) == (1, 2, 64)
  np.testing.assert_array_equal(state_dict["blocks.1.ls2.gamma"].numpy(),
                                params["Transformer"]["encoderblock_1"]["LayerScale_1"]["scale"])
  back = vitjax.load_weights(model, path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # no_embed_class: the grid only; the class token then has no position embedding.
  state_dict["pos_embed"] = state_dict["pos_embed"][:, 1:].contiguous()
  safetensors_torch.save_file(state_dict, path)
  grid_only = vitjax.load_weights(model, path)["pos_embedding"]
  np.testing.assert_array_equal(grid_only[:, 1:], params["pos_embedding"][:, 1:])
  np.testing.assert_array_equal(grid_only[:, 0], 0.0)
