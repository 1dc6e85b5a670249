"""Zero-shot classification with a two-tower model: class embeddings from prompt templates.

Each class's embedding is the mean of its normalised caption embeddings over the
templates ("a photo of the digit {name}.", ...), normalised again (CLIP's prompt
ensemble); an image is classified by its most similar class embedding. Reads
`out['img']` and `out['txt']` of the model, nothing else.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model",))
def _encode_images(model, params, images):
  return model.apply({"params": params}, images, None)[1]["img"]


@functools.partial(jax.jit, static_argnames=("model",))
def _encode_texts(model, params, texts):
  return model.apply({"params": params}, None, texts)[1]["txt"]


def _gathered(batch, batch_sharding):
  """The global batch as NumPy on every host (each host holds a slice of it)."""
  if batch_sharding is None or jax.process_count() == 1:
    return batch
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return {k: np.asarray(multihost_utils.process_allgather(
      jax.make_array_from_process_local_data(batch_sharding, v), tiled=True))
          for k, v in batch.items()}


def encode_texts(model, params, tokens, batch_size=256):
  """Normalised text embeddings [N, D] of token ids [N, L], batch by batch, as NumPy."""
  tokens = np.asarray(tokens)
  chunks = [np.asarray(jax.device_get(_encode_texts(model, params, tokens[i:i + batch_size])))
            for i in range(0, len(tokens), batch_size)]
  return np.concatenate(chunks)


def encode_eval_split(model, params, batches, *, batch_sharding=None, with_texts=False):
  """Image (and text) embeddings and labels of every unpadded example of `batches`.

  Returns a dict of NumPy arrays: 'img' [N, D], 'label' [N], and 'txt' [N, D] and
  'text' [N, L] (the token ids) with `with_texts`. Padding (mask False) is dropped.
  """
  keep = {"img": [], "label": [], "txt": [], "text": []}
  for batch in batches:
    batch = {"mask": np.ones(len(batch["label"]), bool), **batch}
    # Multi-host: every host embeds the whole batch; the examples are few (an eval set).
    batch = _gathered({k: batch[k] for k in ("image", "label", "mask", "text")
                       if k in batch and (with_texts or k != "text")}, batch_sharding)
    mask = np.asarray(batch["mask"], bool)
    keep["img"].append(np.asarray(_encode_images(model, params, batch["image"]))[mask])
    keep["label"].append(np.asarray(batch["label"])[mask])
    if with_texts:
      keep["txt"].append(np.asarray(_encode_texts(model, params, batch["text"]))[mask])
      keep["text"].append(np.asarray(batch["text"])[mask])
  if not keep["img"]:
    raise ValueError("Evaluation saw no examples: the evaluation split is empty.")
  return {k: np.concatenate(v) for k, v in keep.items() if v}


def class_embeddings(model, params, class_names, templates, tokenizer):
  """[num_classes, D]: per class, the renormalised mean of its templates' text embeddings."""
  captions = [t.format(name=name, digit=index) for index, name in enumerate(class_names)
              for t in templates]
  embeddings = encode_texts(model, params, tokenizer.encode(captions))
  embeddings = embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)


def accuracy_from_embeddings(image_embeddings, labels, classes):
  """Top-1 / top-5 of classifying images [N, D] by their most similar class row [C, D]."""
  scores = np.asarray(image_embeddings, np.float32) @ np.asarray(classes, np.float32).T
  k = min(5, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  hits = top == np.asarray(labels)[:, None]
  return {"zeroshot_top1": float(hits[:, 0].mean()), "zeroshot_top5": float(hits.any(1).mean())}


def zeroshot(model, params, dataset, *, batch_size, batch_sharding=None, class_names=None,
             templates=None, tokenizer=None, split="eval"):
  """Zero-shot top-1 / top-5 over the dataset's evaluation split.

  `class_names`, `templates` and `tokenizer` default to the dataset's (the
  contrastive task's captioned dataset has them); templates are format strings
  with `{name}` (the class name) and/or `{digit}` (the class index).
  """
  class_names = class_names or getattr(dataset, "class_names", None)
  templates = templates or getattr(dataset, "templates", None)
  tokenizer = tokenizer or getattr(dataset, "tokenizer", None)
  if not (class_names and templates and tokenizer):
    raise ValueError("zeroshot needs class_names, templates and a tokenizer: pass them as "
                     "evaluator options or evaluate a contrastive task's dataset.")
  classes = class_embeddings(model, params, class_names, templates, tokenizer)
  encoded = encode_eval_split(model, params, dataset.eval_iter(
      batch_size, process_index=jax.process_index(), process_count=jax.process_count(),
      split=split), batch_sharding=batch_sharding)
  return accuracy_from_embeddings(encoded["img"], encoded["label"], classes)
