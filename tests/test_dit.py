"""DiT: the paper's sizes, adaLN-Zero blocks, and weights from / to diffusers and DiT's files."""

import chex
import diffusers  # The oracle: a failed import fails the test.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # The oracle: a failed import fails the test.

import vitjax
from vitjax.convert import dit as dit_convert
from vitjax.convert import files
from vitjax.convert.mismatch import CheckpointMismatchError
from vitjax.models import dit, parts
from vitjax.tools import model_table

# A small diffusers DiT: 2 blocks, width 32, 8x8x4 inputs, patch 2, learned sigma, 10 classes.
SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
             num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _diffusers_dit(seed=0):
  """A randomly initialised DiTTransformer2DModel, every weight random (the zero-initialised
  ones too; N(0, 1/fan_in), biases N(0, 0.1^2)), with block 0's timestep / class embedder
  copied into every block as in the converted DiT checkpoints."""
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(**SMALL).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      fan_in = p[0].numel() if p.ndim > 1 and "embedding_table" not in name else 100
      p.copy_(torch.randn_like(p) * (fan_in ** -0.5 if p.ndim > 1 else 0.1))
    block0 = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(block0)
  return model


def _inputs(batch=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 17, 999][:batch])
  y = np.array([3, 10, 7][:batch])  # 10: the null class of classifier-free guidance.
  return x, t, y


def _run_diffusers(model, x, t, y):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _run_vitjax(model, params, x, t, y):
  prediction, _ = jax.jit(model.apply)({"params": params}, x, t, y)
  return np.asarray(prediction)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("dit") / "transformer"
  model = _diffusers_dit()
  model.save_pretrained(path)
  return model, path


def test_paper_sizes_parameters_and_gflops():
  """DiT's Table 4: parameters (M; DiT's code also counts its fixed `pos_embed`, which
  vitjax computes: 675,129,632 for XL/2) and Gflops at 256 pixels, to the table's two
  decimals (fvcore's count: one multiply-add each; it also counts the LayerNorms, about
  0.02% more than the matmuls vitjax counts)."""
  paper = {"XL/2": (675, 118.64), "B/2": (130, 23.01), "S/8": (33, 0.36)}
  for variant, (millions, gflops) in paper.items():
    model = vitjax.create_model("dit", variant=variant, image_size=32)
    shapes = vitjax.models.param_shapes(model)
    count = vitjax.models.count_params(shapes)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    macs = model_table.count_macs(
        lambda p, x: model.apply({"params": p}, x, jnp.zeros(1), jnp.zeros(1, jnp.int32)),
        shapes, x)
    assert round(count / 1e6) == millions, variant
    assert abs(macs / 1e9 - gflops) <= 0.005 + 3e-4 * gflops, (variant, macs / 1e9)
    if variant == "XL/2":  # DiT's train.py prints "DiT Parameters: 675,129,632".
      assert count + model.grid_size ** 2 * model.width == 675_129_632
      assert round(macs / 1e9, 1) == 118.6


def test_registered_names_build_the_paper_models():
  model = vitjax.create_model("dit_xlarge_patch2_256")
  assert (model.width, model.depth, model.num_heads, model.patch_size, model.image_size,
          model.num_classes, model.learn_sigma) == (1152, 28, 16, 2, 32, 1000, True)
  assert vitjax.create_model("dit_small_patch8_256").patch_size == 8
  assert vitjax.create_model("dit_xlarge_patch2_512").image_size == 64


def test_adaln_zero_starts_as_identity_and_condition_moves_it():
  """At initialisation every gate is zero: blocks are identities and the output is zero
  (the zero final layer); with random modulation weights the timestep and label matter."""
  model = vitjax.create_model("dit", width=64, depth=2, num_heads=2, patch_size=4,
                              image_size=16, num_classes=10)
  params = vitjax.models.init_params(model)
  apply = jax.jit(model.apply)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 4))
  prediction, out = apply({"params": params}, x, jnp.array([5, 500]), jnp.array([1, 2]))
  chex.assert_shape(prediction, (2, 16, 16, 8))
  assert not np.any(np.asarray(prediction))
  chex.assert_trees_all_close(out["block01"], out["block00"])  # The identity, twice.
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape) * 0.05,
                        params)
  base = apply({"params": params}, x, jnp.array([5, 5]), jnp.array([1, 1]))[0]
  other_t = apply({"params": params}, x, jnp.array([5, 900]), jnp.array([1, 1]))[0]
  other_y = apply({"params": params}, x, jnp.array([5, 5]), jnp.array([1, 10]))[0]
  chex.assert_trees_all_close(other_t[0], base[0])
  chex.assert_trees_all_close(other_y[0], base[0])
  assert np.abs(other_t[1] - base[1]).max() > 1e-3
  assert np.abs(other_y[1] - base[1]).max() > 1e-3


def test_label_dropout_uses_the_null_class_while_training():
  model = vitjax.create_model("dit", width=64, depth=1, num_heads=2, patch_size=4,
                              image_size=8, num_classes=10, class_dropout_prob=0.5)
  params = vitjax.models.init_params(model)
  assert params["y_embedder"]["embedding_table"].shape == (11, 64)  # The null class's row.
  labels = jnp.arange(64) % 10
  x, t = jnp.zeros((64, 8, 8, 4)), jnp.zeros(64)
  condition = lambda labels, **kwargs: model.apply({"params": params}, x, t, labels,
                                                   **kwargs)[1]["condition"]
  c_eval = condition(labels)
  c_train = condition(labels, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  c_null = condition(jnp.full(64, 10))
  dropped = np.all(np.isclose(c_train, c_null), axis=-1)
  kept = np.all(np.isclose(c_train, c_eval), axis=-1)
  assert np.all(dropped | kept) and 16 < dropped.sum() < 48
  forced = condition(labels, force_drop=labels < 5)
  chex.assert_trees_all_close(forced[:5], c_null[:5])
  chex.assert_trees_all_close(forced[5:10], c_eval[5:10])


def test_adaln_block_needs_a_condition():
  model = vitjax.create_model("dit", width=64, depth=1, num_heads=2, patch_size=4)
  block = model.block_factory()()
  x = jnp.zeros((1, 4, 64))
  with pytest.raises(ValueError, match="token_state\\['condition'\\]"):
    block.init(jax.random.PRNGKey(0), x, {})
  variables = block.init(jax.random.PRNGKey(0), x, {parts.CONDITION: jnp.ones((1, 64))})
  assert set(variables["params"]) == {"adaLN_modulation", "MultiHeadDotProductAttention_0",
                                      "MlpBlock_0"}  # The norms have no parameters.


def test_diffusers_dit_loads_with_parity(diffusers_dir):
  torch_model, path = diffusers_dir
  model, params = dit_convert.load_dit(path)
  assert (model.freq_shift, model.mlp_norm_eps, model.learn_sigma) == (1.0, 1e-5, True)
  x, t, y = _inputs()
  np.testing.assert_allclose(_run_vitjax(model, params, x, t, y),
                             _run_diffusers(torch_model, x, t, y), atol=1e-4, rtol=1e-4)


def test_export_to_diffusers_round_trips(diffusers_dir, tmp_path):
  torch_model, path = diffusers_dir
  model, params = dit_convert.load_dit(path)
  params = jax.tree.map(lambda p: p + 0.01, params)  # Not the weights it loaded.
  dit_convert.save_diffusers(model, params, tmp_path / "exported")
  exported = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
  x, t, y = _inputs(seed=1)
  np.testing.assert_allclose(_run_diffusers(exported, x, t, y),
                             _run_vitjax(model, params, x, t, y), atol=1e-4, rtol=1e-4)
  _, reloaded = dit_convert.load_dit(tmp_path / "exported")
  chex.assert_trees_all_equal(reloaded, params)
  del torch_model


def test_official_checkpoint_loads(diffusers_dir, tmp_path):
  """DiT's own layout (fused qkv, `blocks.{i}`, one embedder, `pos_embed`) as a .pt file:
  the same weights as the diffusers directory, under DiT's names."""
  _, path = diffusers_dir
  _, params = dit_convert.load_dit(path)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in
        files.read_arrays(path)[0].items()}
  official = {
      "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
      "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
      "pos_embed": torch.from_numpy(dit.mae_sincos_2d(4, 4, 32)[:, 1:]),
      "final_layer.linear.weight": sd["proj_out_2.weight"],
      "final_layer.linear.bias": sd["proj_out_2.bias"],
      "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
      "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
  }
  emb = "transformer_blocks.0.norm1.emb."
  for leaf in ("weight", "bias"):
    official[f"t_embedder.mlp.0.{leaf}"] = sd[emb + f"timestep_embedder.linear_1.{leaf}"]
    official[f"t_embedder.mlp.2.{leaf}"] = sd[emb + f"timestep_embedder.linear_2.{leaf}"]
    for i in range(2):
      block = f"transformer_blocks.{i}."
      official[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(
          [sd[block + f"attn1.to_{n}.{leaf}"] for n in "qkv"])
      official[f"blocks.{i}.attn.proj.{leaf}"] = sd[block + f"attn1.to_out.0.{leaf}"]
      official[f"blocks.{i}.mlp.fc1.{leaf}"] = sd[block + f"ff.net.0.proj.{leaf}"]
      official[f"blocks.{i}.mlp.fc2.{leaf}"] = sd[block + f"ff.net.2.{leaf}"]
      official[f"blocks.{i}.adaLN_modulation.1.{leaf}"] = sd[block + f"norm1.linear.{leaf}"]
  official["y_embedder.embedding_table.weight"] = sd[emb + "class_embedder.embedding_table.weight"]
  torch.save(official, tmp_path / "DiT-tiny.pt")
  with pytest.raises(files.CheckpointError, match="none of DiT's sizes"):
    dit_convert.load_dit(tmp_path / "DiT-tiny.pt")  # Its heads: not in the shapes.
  model = vitjax.create_model("dit", width=32, depth=2, num_heads=2, patch_size=2,
                              image_size=8, num_classes=10)
  _, loaded = dit_convert.load_dit(tmp_path / "DiT-tiny.pt", model=model)
  chex.assert_trees_all_equal(loaded, params)
  # load_weights reads both layouts for a DiT it is given.
  chex.assert_trees_all_equal(vitjax.load_weights(model, tmp_path / "DiT-tiny.pt"), params)


def test_checkpoints_that_do_not_fit_are_refused(diffusers_dir, tmp_path):
  _, path = diffusers_dir
  wrong = vitjax.create_model("dit", variant="S/2", image_size=8, num_classes=10)
  with pytest.raises(CheckpointMismatchError, match="Shapes differ") as error:
    vitjax.load_weights(wrong, path)
  assert "load_dit(path) without model=" in str(error.value)
  torch_model = _diffusers_dit(seed=1)
  with torch.no_grad():  # Block 1 with an embedder of its own: not a DiT.
    torch_model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
  torch_model.save_pretrained(tmp_path / "untied")
  with pytest.raises(files.CheckpointError, match="its own timestep / class embedder"):
    dit_convert.load_dit(tmp_path / "untied")
