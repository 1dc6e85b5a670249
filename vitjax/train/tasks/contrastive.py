"""Image-text contrastive learning: CLIP's softmax loss, SigLIP's sigmoid loss, LiT.

    config.task = 'contrastive'
    config.model = dict(name='siglip_mu', ...)          # a vitjax.models.two_towers model
    config.contrastive = dict(loss='sigmoid', ...)      # or 'softmax' (CLIP)
    config.init = 'vit.npz'                             # LiT: a pre-trained image tower,
    config.optimizer.freeze = '^img/'                   # ... locked

Image-text data with captions of its own (WebDataset shards with `.txt` or
img2dataset's `.json`, `--config.dataset=wds:PATTERN`) trains on those captions.
Labelled image datasets become image-text datasets here: each training example
gets a caption from a template ("a photo of the digit seven", "a handwritten 7")
filled with its class name, the template drawn from (seed, step, position) so a
run is deterministic and resumes exactly. Evaluation batches keep their labels
(zero-shot classification) and get one caption each (retrieval).

The losses take the global batch: under jit over arrays sharded on the batch
axis, `zimg @ ztxt.T` is the full [B, B] similarity matrix (XLA gathers the other
devices' embeddings), so they are correct on any mesh.
"""

import numpy as np
import jax
import jax.numpy as jnp
import optax

from vitjax.text import get_tokenizer
from vitjax.train.tasks.base import Task

# Caption templates for digits; '{name}' is the class word, '{digit}' the numeral.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {name}.",
    "a handwritten {digit}.",
    "the number {name}, written by hand.",
    "a blurry low resolution image of a {digit}.",
    "a scan of the digit {digit}.",
    "a drawing of the number {name}.",
    "{name}",
    "an 8x8 pixel image of a handwritten {name}.",
)


def softmax_loss(logits):
  """CLIP: mean of the image->text and text->image cross-entropies; pairs on the diagonal.

  `logits` is [B, B] (images x texts), already scaled by the temperature.
  """
  logits = logits.astype(jnp.float32)
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return (image_to_text.mean() + text_to_image.mean()) / 2


def sigmoid_loss(logits):
  """SigLIP: -sum_ij log sigmoid(z_ij * logits_ij) / B, z = +1 on the diagonal, -1 elsewhere.

  `logits` is [B, B] = exp(t) * img . txt + b; the sum over all B^2 pairs is
  divided by the batch size, as in the paper's pseudo-code.
  """
  logits = logits.astype(jnp.float32)
  signs = 2 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


LOSSES = {"softmax": softmax_loss, "sigmoid": sigmoid_loss}


def class_captions(class_names, templates):
  """[num_classes][num_templates] captions; templates use {name} and/or {digit} (the index)."""
  return [[t.format(name=name, digit=index) for t in templates]
          for index, name in enumerate(class_names)]


class CaptionedDataset:
  """A labelled image dataset whose batches also carry `text`: token ids of a caption.

  Training example i of step s gets the template drawn from (seed, s, i) (its
  position in the global batch, so hosts agree); evaluation example i gets template
  `eval_template` (or the templates in turn, when None). A dataset with captions of
  its own (`has_captions`) gives those instead, in training and evaluation.
  Everything else (num_classes, image_shape, ...) is the wrapped dataset's.
  """

  def __init__(self, dataset, class_names, templates, tokenizer, eval_template=0):
    self.own_captions = bool(getattr(dataset, "has_captions", False))
    if self.own_captions:
      dataset.with_captions = True
    if len(class_names) < dataset.num_classes:
      raise ValueError(f"{len(class_names)} class names for a dataset of "
                       f"{dataset.num_classes} classes: set config.contrastive.class_names.")
    self.dataset = dataset
    self.class_names = tuple(class_names)
    self.templates = tuple(templates)
    self.tokenizer = tokenizer
    self.eval_template = eval_template
    captions = class_captions(self.class_names, self.templates)
    # [num_classes, num_templates, max_length], tokenized once.
    self.caption_tokens = np.stack([tokenizer.encode(row) for row in captions])

  def __getattr__(self, name):
    return getattr(self.dataset, name)

  def _texts(self, batch, template_index):
    if self.own_captions:
      return self.tokenizer.encode(list(batch.pop("caption")))
    labels = np.asarray(batch["label"])
    if labels.ndim == 2:  # Soft targets (Mixup): the caption of the strongest class.
      labels = labels.argmax(-1)
    return self.caption_tokens[labels, template_index]

  def train_iter(self, batch_size, *, seed, start_step=0, process_index=0, process_count=1):
    local = batch_size // max(process_count, 1)
    offset = process_index * local
    batches = self.dataset.train_iter(batch_size, seed=seed, start_step=start_step,
                                      process_index=process_index, process_count=process_count)
    try:
      for step, batch in enumerate(batches, start=start_step):
        choice = np.random.default_rng([seed, step, 0x7e47]).integers(
            len(self.templates), size=batch_size)[offset:offset + local]
        text = self._texts(batch, choice)  # Takes the batch's own captions out.
        yield {**batch, "text": text}
    finally:  # This generator's close() closes the dataset's iterator (worker processes).
      getattr(batches, "close", lambda: None)()

  def eval_iter(self, batch_size, *, process_index=0, process_count=1, split="eval"):
    local = batch_size // max(process_count, 1)
    for step, batch in enumerate(self.dataset.eval_iter(
        batch_size, process_index=process_index, process_count=process_count, split=split)):
      if self.eval_template is None:
        positions = step * batch_size + process_index * local + np.arange(local)
        choice = positions % len(self.templates)
      else:
        choice = np.full(local, self.eval_template)
      text = self._texts(batch, choice)
      yield {**batch, "text": text}


class Contrastive(Task):
  """Two-tower training with `config.contrastive.loss` = 'softmax' (CLIP) or 'sigmoid' (SigLIP).

  config.contrastive keys (all optional): loss, tokenizer ('bytes', a
  SentencePiece .model path, or CLIP's BPE files: a directory with vocab.json and
  merges.txt, or bpe_simple_vocab_16e6.txt.gz), class_names and templates (digits' by default),
  eval_template (index of the template of the evaluation captions; None: in turn).
  The text length is the model's `text.max_length`.
  """

  default_evaluators = {"zeroshot": {}, "retrieval": {}}

  def __init__(self, config):
    super().__init__(config)
    options = dict(config.get("contrastive") or {})
    self.loss_name = options.get("loss") or "sigmoid"
    if self.loss_name not in LOSSES:
      raise ValueError(f"Unknown config.contrastive.loss {self.loss_name!r}; use 'softmax' "
                       "(CLIP) or 'sigmoid' (SigLIP).")
    self.options = options

  def dataset(self):
    dataset = super().dataset()
    model = self.build_model()
    tokenizer = get_tokenizer(self.options.get("tokenizer") or "bytes", model.max_length)
    vocab_size = model.text.get("vocab_size", 259)
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens but the text tower "
                       f"vocab_size={vocab_size}: set config.model.text.vocab_size.")
    class_names = self.options.get("class_names") or DIGIT_NAMES
    if getattr(dataset, "class_ids", None) is not None and not self.options.get("class_names"):
      # input.classes keeps and renumbers some labels: label k is the id class_ids[k].
      class_names = [class_names[i] for i in dataset.class_ids]
    templates = self.options.get("templates") or DIGIT_TEMPLATES
    eval_template = self.options.get("eval_template", 0)
    return CaptionedDataset(dataset, class_names, templates, tokenizer, eval_template)

  def loss(self, model, params, batch, rng, constants, step):
    del constants
    logits, out = self.apply_model(model, params, batch["image"], rng=rng, step=step,
                                   texts=batch["text"])
    loss = LOSSES[self.loss_name](logits)
    # In-batch retrieval accuracy: does each image's own caption score highest?
    # (Captions repeat within a batch, so this undercounts what the model knows.)
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
    return loss, {"temperature": out["t"], "bias": out["b"], "batch_accuracy": accuracy}
