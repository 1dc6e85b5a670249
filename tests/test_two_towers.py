"""Two towers (CLIP / SigLIP / LiT): HF parity, the losses, zero-shot and retrieval, LiT training."""

import json
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util

import vitjax
from vitjax.convert import clip as clip_convert
from vitjax.convert import files
from vitjax.evaluate import retrieval as retrieval_lib
from vitjax.evaluate import zeroshot as zeroshot_lib
from vitjax.text import ByteTokenizer
from vitjax.train.tasks import contrastive

import torch  # The oracle: a failed import fails the test.
import transformers  # The oracle: a failed import fails the test.


def _save_state_dict(module, path):
  files.write_safetensors({k: v.detach().numpy() for k, v in module.state_dict().items()},
                          path, metadata={"format": "pt"})


def _hf_inputs(vocab_size, length, eos_token_id, batch=3):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
  ids = rng.integers(3, vocab_size - 1, size=(batch, length))
  ids[0, 5:] = 0  # A short text: EOS then padding.
  ids[0, 4] = eos_token_id
  ids[1:, -1] = eos_token_id
  return images, ids


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_clip_and_siglip_parity(kind, tmp_path):
  """Random HF CLIPModel / SiglipModel -> .safetensors -> load_weights: same embeddings, logits."""
  towers = dict(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=16),
                vision_config=dict(image_size=32, patch_size=8, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4))
  torch.manual_seed(0)
  towers["text_config"].update(eos_token_id=99, bos_token_id=98, pad_token_id=0)
  if kind == "clip":
    config = transformers.CLIPConfig(**towers, projection_dim=24)
    hf_model = transformers.CLIPModel(config).eval()
  else:
    config = transformers.SiglipConfig(**towers)
    hf_model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # Non-trivial values: HF initialises both to zero.
      hf_model.logit_scale.fill_(2.3)
      hf_model.logit_bias.fill_(-1.5)
  _save_state_dict(hf_model, tmp_path / "model.safetensors")
  images, ids = _hf_inputs(100, 12 if kind == "clip" else 16, 99)
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images))

  model = clip_convert.model_from_hf_config(config)
  params = vitjax.load_weights(model, tmp_path / "model.safetensors")
  logits, out = jax.jit(model.apply)({"params": params},
                                     jnp.asarray(images.transpose(0, 2, 3, 1)),
                                     jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(out["img"], expected.image_embeds.numpy(), atol=1e-4)
  np.testing.assert_allclose(out["txt"], expected.text_embeds.numpy(), atol=1e-4)
  np.testing.assert_allclose(logits, expected.logits_per_image.numpy(), atol=1e-4, rtol=1e-4)


def test_two_towers_encode_one_side_and_registered_names():
  tiny = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
  model = vitjax.create_model("siglip_mu", embed_dim=32, image=dict(
      tiny, image_size=8, patch_size=4, pool_type="gap"), text=dict(tiny, max_length=8))
  params = vitjax.init_params(model)
  assert {"img", "txt", "t", "b"} == set(params)
  np.testing.assert_allclose(params["t"], [np.log(10.0)], rtol=1e-6)
  np.testing.assert_allclose(params["b"], [-10.0])
  tokens = jnp.asarray(ByteTokenizer(8).encode(["a 7", "a 1"]))
  logits, out = jax.jit(model.apply)({"params": params}, None, tokens)
  assert logits is None and "img" not in out
  np.testing.assert_allclose(jnp.linalg.norm(out["txt"], axis=-1), 1.0, rtol=1e-5)
  assert "clip_vit_base_patch16" in vitjax.list_models("clip_*")
  assert "siglip_base_patch16_224" in vitjax.list_models("siglip_*")


def _reference_losses(logits):
  """NumPy: CLIP's symmetric cross-entropy and SigLIP's pairwise sigmoid loss."""
  logits = np.asarray(logits, np.float64)
  n = len(logits)

  def cross_entropy(x):
    x = x - x.max(axis=1, keepdims=True)
    return np.mean(-(np.diag(x) - np.log(np.exp(x).sum(axis=1))))

  softmax = (cross_entropy(logits) + cross_entropy(logits.T)) / 2
  z = 2 * np.eye(n) - 1
  sigmoid = np.sum(np.log1p(np.exp(-z * logits))) / n
  return softmax, sigmoid


def test_losses_match_numpy_reference():
  logits = np.random.default_rng(0).normal(scale=3.0, size=(6, 6)).astype(np.float32)
  softmax, sigmoid = _reference_losses(logits)
  np.testing.assert_allclose(contrastive.softmax_loss(jnp.asarray(logits)), softmax, rtol=1e-5)
  np.testing.assert_allclose(contrastive.sigmoid_loss(jnp.asarray(logits)), sigmoid, rtol=1e-5)


def test_sigmoid_loss_on_a_batch_sharded_over_devices_equals_reference():
  """The loss of the global batch, with embeddings split over the devices' batch axis."""
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(1)
  n = 4 * len(devices)
  img, txt = (rng.normal(size=(n, 8)).astype(np.float32) for _ in range(2))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  loss = jax.jit(lambda a, b: contrastive.sigmoid_loss(10.0 * a @ b.T - 5.0))(
      jax.device_put(img, sharding), jax.device_put(txt, sharding))
  np.testing.assert_allclose(loss, _reference_losses(10.0 * img @ txt.T - 5.0)[1], rtol=1e-5)


def test_recall_at_k_on_known_embeddings():
  # 3 distinct captions; images 0-1 paired with caption 0, 2 with 1, 3 with 2.
  texts = np.eye(3, dtype=np.float32)
  images = np.array([[1, 0, 0], [0, 0.9, 0.1], [0, 1, 0], [0.8, 0, 0.6]], np.float32)
  metrics = retrieval_lib.recall_at_k(images, texts, np.array([0, 0, 1, 2]), ks=(1, 2))
  # Image->text hits at 1: images 0 and 2; image 1's caption is 3rd, image 3's is 2nd.
  assert metrics["i2t_recall@1"] == 0.5 and metrics["i2t_recall@2"] == 0.75
  # Text->image at 1: caption 0 -> image 0 (hit), 1 -> image 2 (hit), 2 -> image 3 (hit).
  assert metrics["t2i_recall@1"] == 1.0


class _OneHotTowers:
  """A stand-in two-tower model whose embeddings are known: a digit's class direction."""

  def apply(self, variables, images, texts):
    del variables
    out = {}
    if images is not None:  # The class is the image's mean pixel value, 0..9.
      label = jnp.round(images.mean(axis=(1, 2, 3))).astype(jnp.int32)
      out["img"] = jax.nn.one_hot(label, 10)
    if texts is not None:  # The class is the caption's last digit byte.
      digits = jnp.where((texts >= 48 + 3) & (texts <= 57 + 3), texts - 48 - 3, -1)
      out["txt"] = jax.nn.one_hot(digits.max(axis=1), 10)
    return None, out

  def __hash__(self):
    return 0


class _Dataset:
  def __init__(self, labels, tokenizer, template):
    self.labels, self.tokenizer = np.asarray(labels), tokenizer
    self.template = template

  def eval_iter(self, batch_size, **_):
    for start in range(0, len(self.labels), batch_size):
      labels = np.zeros(batch_size, np.int32)
      chunk = self.labels[start:start + batch_size]
      labels[:len(chunk)] = chunk
      images = np.broadcast_to(labels[:, None, None, None], (batch_size, 4, 4, 3))
      texts = self.tokenizer.encode([self.template.format(digit=l) for l in labels])
      yield {"image": images.astype(np.float32), "label": labels,
             "mask": np.arange(batch_size) < len(chunk), "text": texts}


def test_zeroshot_and_retrieval_evaluators_on_a_known_model():
  tokenizer = ByteTokenizer(16)
  labels = [3, 1, 4, 1, 5, 9, 2]
  dataset = _Dataset(labels, tokenizer, "a {digit}")
  model = _OneHotTowers()
  metrics = zeroshot_lib.zeroshot(model, None, dataset, batch_size=4,
                                  class_names=[str(i) for i in range(10)],
                                  templates=["a {digit}", "the number {digit}"],
                                  tokenizer=tokenizer)
  assert metrics == {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0}
  metrics = retrieval_lib.retrieval(model, None, dataset, batch_size=4, ks=(1,))
  assert metrics == {"i2t_recall@1": 1.0, "t2i_recall@1": 1.0}
  # A wrong label set: the images of '1' classified as '2' are misses.
  dataset.labels = np.array(labels)
  classes = np.eye(10)[[0, 2, 1, 3, 4, 5, 6, 7, 8, 9]]  # Classes 1 and 2 swapped.
  encoded = zeroshot_lib.encode_eval_split(model, None, dataset.eval_iter(4))
  swapped = zeroshot_lib.accuracy_from_embeddings(encoded["img"], encoded["label"], classes)
  assert swapped["zeroshot_top1"] == pytest.approx(4 / 7)


def test_captioned_dataset_is_deterministic_by_step():
  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/lit_digits.py:steps=2")
  task = contrastive.Contrastive(config)
  dataset = task.dataset()
  first = [b["text"] for _, b in zip(range(3), dataset.train_iter(8, seed=0))]
  resumed = next(dataset.train_iter(8, seed=0, start_step=2))["text"]
  np.testing.assert_array_equal(first[2], resumed)
  batch = next(dataset.train_iter(8, seed=0))
  captions = dataset.tokenizer.decode(batch["text"])
  for label, caption in zip(batch["label"], captions):
    assert caption in contrastive.class_captions(contrastive.DIGIT_NAMES,
                                                 contrastive.DIGIT_TEMPLATES)[label]


def test_lit_training_keeps_the_locked_image_tower_bitwise(tmp_path):
  """A few LiT steps through vitjax.train.train: the image tower is loaded and never changes."""
  from vitjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vitjax.train import checkpoints, trainer  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/lit_digits.py:steps=3")
  with config.unlocked():  # Tiny towers for speed.
    config.model.image = dict(config.model.image, depth=1, width=32, mlp_dim=64)
    config.model.text = dict(config.model.text, depth=1, width=32, mlp_dim=64)
    config.model.embed_dim = 32
  config.batch_size = 16
  config.eval_batch_size = 120
  image_model = vitjax.create_model("vit", **dict(config.model.image, num_classes=10))
  pretrained = vitjax.init_params(image_model, rng=7)
  vitjax.save_weights(pretrained, tmp_path / "vit.npz")
  config.init = str(tmp_path / "vit.npz")  # An image model's: the image tower's.
  result = trainer.train(config, str(tmp_path / "run"), progress=False)
  assert 0.0 <= result["eval/zeroshot_top1"] <= 1.0 and "eval/i2t_recall@1" in result
  params = checkpoints.load_params(str(tmp_path / "run"))
  flat = traverse_util.flatten_dict(params["img"], sep="/")
  expected = traverse_util.flatten_dict(pretrained, sep="/")
  assert set(flat) == set(expected) - {"head/kernel", "head/bias"}  # LiT: no image head.
  for name, value in flat.items():
    np.testing.assert_array_equal(np.asarray(value), expected[name], err_msg=name)
  # The text tower did train: only it can have moved the weights.
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    updates = [row["train/update_norm"] for row in map(json.loads, f) if "train/update_norm" in row]
  assert updates and all(norm > 0 for norm in updates)
