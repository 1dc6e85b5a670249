"""Image-text retrieval recall@K over a paired evaluation set (each image with its caption).

Identical captions (same token ids) are one gallery entry: templated captions
repeat, and copies would only crowd each other out of the top K. Image->text: an
image is a hit at K if its caption is among the K captions most similar to it.
Text->image: a caption is a hit at K if any of the K most similar images is one
it was paired with (COCO-style, where a caption belongs to one image, this is
the usual definition). Reads `out['img']` and `out['txt']` only.
"""

import jax
import numpy as np

from vitjax.evaluate.zeroshot import encode_eval_split


def recall_at_k(image_embeddings, text_embeddings, text_ids, ks=(1, 5, 10)):
  """{'i2t_recall@K', 't2i_recall@K'} of image i paired with caption `text_ids[i]`.

  `image_embeddings` [N, D]; `text_embeddings` [T, D], the distinct captions;
  `text_ids` [N] indexes them.
  """
  text_ids = np.asarray(text_ids)
  similarity = np.asarray(image_embeddings, np.float32) @ np.asarray(text_embeddings,
                                                                     np.float32).T
  metrics = {}
  # Rank of each image's own caption (0 = best); stable order breaks exact ties.
  order = np.argsort(-similarity, axis=1, kind="stable")
  rank = np.argmax(order == text_ids[:, None], axis=1)
  # Per caption, the best rank of any of its images among all images.
  image_order = np.argsort(-similarity.T, axis=1, kind="stable")  # [T, N]
  image_rank = np.argsort(image_order, axis=1)  # image_rank[t, i]: rank of image i for t.
  paired = text_ids[None, :] == np.arange(len(text_embeddings))[:, None]  # [T, N]
  best_rank = np.where(paired, image_rank, np.iinfo(np.int64).max).min(axis=1)
  captions_used = paired.any(axis=1)
  for k in ks:
    metrics[f"i2t_recall@{k}"] = float(np.mean(rank < k))
    metrics[f"t2i_recall@{k}"] = float(np.mean(best_rank[captions_used] < k))
  return metrics


def retrieval(model, params, dataset, *, batch_size, batch_sharding=None, ks=(1, 5, 10),
              split="eval"):
  """Recall@K both ways over the evaluation split's (image, caption) pairs.

  The dataset's evaluation batches need a 'text' entry (token ids of each image's
  caption), as the contrastive task's captioned dataset gives.
  """
  batches = dataset.eval_iter(batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count(), split=split)
  first = next(batches, None)
  if first is None or "text" not in first:
    raise ValueError("retrieval needs evaluation batches with a 'text' entry (each image's "
                     "caption as token ids): evaluate a contrastive task's dataset.")
  encoded = encode_eval_split(model, params, _chain(first, batches),
                              batch_sharding=batch_sharding, with_texts=True)
  _, first_index, text_ids = np.unique(encoded["text"], axis=0, return_index=True,
                                       return_inverse=True)
  return recall_at_k(encoded["img"], encoded["txt"][first_index], text_ids.reshape(-1),
                     tuple(ks))


def _chain(first, rest):
  yield first
  yield from rest
