"""timm and Hugging Face transformers state dicts <-> vitjax names, both directions.

Each layout is a table of (torch module, vitjax module, kind). The kind says how
tensors change: PyTorch Linear weights are (out, in) where Flax kernels are
(in, out); attention kernels carry explicit heads, (width, heads, head_dim);
convolutions go from OIHW to HWIO; timm fuses q, k, v into one Linear.
`{i}` stands for the block index.
"""

import re

import numpy as np

TIMM_ANCHOR = "patch_embed.proj.weight"
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"

_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_0"
_MAP = "MAPHead_0"

TIMM = [
    ("patch_embed.proj", "embedding", "conv"),
    ("cls_token", "cls", "param"),
    ("dist_token", "dist", "param"),
    ("reg_token", "reg", "param"),  # vit_*_reg4_*: registers after the class token, as here.
    # With or without the prefix tokens' entries (timm's no_embed_class): load_weights
    # tells them apart by length.
    ("pos_embed", "pos_embedding", "param"),
    ("blocks.{i}.norm1", _BLOCK + "/LayerNorm_0", "norm"),
    ("blocks.{i}.attn.qkv", _ATTN, "fused_qkv"),
    ("blocks.{i}.attn.proj", _ATTN + "/out", "out"),
    ("blocks.{i}.ls1.gamma", _BLOCK + "/LayerScale_0/scale", "param"),
    ("blocks.{i}.norm2", _BLOCK + "/LayerNorm_1", "norm"),
    ("blocks.{i}.mlp.fc1", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    ("blocks.{i}.mlp.fc2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
    ("blocks.{i}.ls2.gamma", _BLOCK + "/LayerScale_1/scale", "param"),
    ("norm", "Transformer/encoder_norm", "norm"),
    # timm's attention pooling (AttentionPoolLatent) is big_vision's MAP head.
    ("attn_pool.latent", _MAP + "/probe", "param"),
    ("attn_pool.q", _MAP + "/MultiHeadDotProductAttention_0/query", "qkv"),
    ("attn_pool.kv", _MAP + "/MultiHeadDotProductAttention_0", "fused_kv"),
    ("attn_pool.proj", _MAP + "/MultiHeadDotProductAttention_0/out", "out"),
    ("attn_pool.norm", _MAP + "/LayerNorm_0", "norm"),
    ("attn_pool.mlp.fc1", _MAP + "/MlpBlock_0/Dense_0", "dense"),
    ("attn_pool.mlp.fc2", _MAP + "/MlpBlock_0/Dense_1", "dense"),
    ("pre_logits.fc", "pre_logits", "dense"),  # Older timm, representation_size.
    ("head", "head", "dense"),
    ("head_dist", "head_dist", "dense"),
]

# RoPE ViTs ("Rotary Position Embedding for Vision Transformer", Heo et al. 2024), read only:
# naver-ai/rope-vit's DeiT-III state dicts (LayerScale as gamma_1/gamma_2, learned RoPE-Mixed
# frequencies as `freqs`, (2, depth, heads * head_dim / 2)) and timm's eva.py ports of them
# (vit_*_patch16_rope*_224: the same names, `rope.freqs` (2, depth, heads, head_dim / 2)).
# The rest of their names are timm's ViT names above. Both rotate the same way as vitjax.
ROPE_VIT = [
    ("blocks.{i}.gamma_1", _BLOCK + "/LayerScale_0/scale", "param"),
    ("blocks.{i}.gamma_2", _BLOCK + "/LayerScale_1/scale", "param"),
    ("freqs", "Transformer", "rope_frequencies"),
    ("rope.freqs", "Transformer", "rope_frequencies"),
]
TIMM_IMPORT = TIMM + ROPE_VIT
# naver's RoPE-Mixed buffers of patch x/y positions, recomputed from the input's grid.
TIMM_UNUSED = ("freqs_t_x", "freqs_t_y")

# Names as published on the Hugging Face hub (what every transformers version loads),
# without the 'vit.' / 'deit.' prefix of the classification models.
HF = [
    ("embeddings.cls_token", "cls", "param"),
    ("embeddings.distillation_token", "dist", "param"),
    ("embeddings.position_embeddings", "pos_embedding", "param"),
    ("embeddings.patch_embeddings.projection", "embedding", "conv"),
    ("encoder.layer.{i}.layernorm_before", _BLOCK + "/LayerNorm_0", "norm"),
    ("encoder.layer.{i}.attention.attention.query", _ATTN + "/query", "qkv"),
    ("encoder.layer.{i}.attention.attention.key", _ATTN + "/key", "qkv"),
    ("encoder.layer.{i}.attention.attention.value", _ATTN + "/value", "qkv"),
    ("encoder.layer.{i}.attention.output.dense", _ATTN + "/out", "out"),
    ("encoder.layer.{i}.layernorm_after", _BLOCK + "/LayerNorm_1", "norm"),
    ("encoder.layer.{i}.intermediate.dense", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    ("encoder.layer.{i}.output.dense", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
    ("layernorm", "Transformer/encoder_norm", "norm"),
    ("pooler.dense", "pre_logits", "dense"),
]
HF_HEADS = {  # Classification heads, outside the model prefix.
    "vit": [("classifier", "head", "dense")],
    "deit": [("cls_classifier", "head", "dense"),
             ("distillation_classifier", "head_dist", "dense")],
}
# transformers >= 5 renamed the block modules in its in-memory state dicts.
_HF_NEW_NAMES = [
    ("layers.{i}.layernorm_before", _BLOCK + "/LayerNorm_0", "norm"),
    ("layers.{i}.attention.q_proj", _ATTN + "/query", "qkv"),
    ("layers.{i}.attention.k_proj", _ATTN + "/key", "qkv"),
    ("layers.{i}.attention.v_proj", _ATTN + "/value", "qkv"),
    ("layers.{i}.attention.o_proj", _ATTN + "/out", "out"),
    ("layers.{i}.layernorm_after", _BLOCK + "/LayerNorm_1", "norm"),
    ("layers.{i}.mlp.fc1", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    ("layers.{i}.mlp.fc2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
]
# DINOv2 (Dinov2Model, Dinov2WithRegistersModel): the ViT names above for the embeddings
# and the final norm, its own block names (hub names, then transformers >= 5 in memory).
_DINO_BLOCK = "encoder.layer.{i}."
HF_DINOV2 = [
    ("embeddings.register_tokens", "reg", "param"),
    (_DINO_BLOCK + "norm1", _BLOCK + "/LayerNorm_0", "norm"),
    (_DINO_BLOCK + "layer_scale1.lambda1", _BLOCK + "/LayerScale_0/scale", "param"),
    (_DINO_BLOCK + "norm2", _BLOCK + "/LayerNorm_1", "norm"),
    (_DINO_BLOCK + "mlp.fc1", _BLOCK + "/MlpBlock_0/Dense_0", "dense"),
    (_DINO_BLOCK + "mlp.fc2", _BLOCK + "/MlpBlock_0/Dense_1", "dense"),
    (_DINO_BLOCK + "layer_scale2.lambda1", _BLOCK + "/LayerScale_1/scale", "param"),
    (_DINO_BLOCK + "attention.q_proj", _ATTN + "/query", "qkv"),
    (_DINO_BLOCK + "attention.k_proj", _ATTN + "/key", "qkv"),
    (_DINO_BLOCK + "attention.v_proj", _ATTN + "/value", "qkv"),
    (_DINO_BLOCK + "attention.o_proj", _ATTN + "/out", "out"),
]
# Only used to replace masked patches in DINOv2's self-supervised training.
HF_UNUSED = ("embeddings.mask_token",)
# DeiTForImageClassification: one head on the class token, named like ViT's.
HF_IMPORT = HF + _HF_NEW_NAMES + HF_DINOV2 + HF_HEADS["vit"] + HF_HEADS["deit"]


# --- Tensor transforms, one pair per kind -------------------------------------------------

def _split_heads(x, axis, num_heads):
  # Leaves an indivisible width alone; the shape check then reports it against the model.
  if x.shape[axis] % num_heads:
    return x
  return np.reshape(x, x.shape[:axis] + (num_heads, -1) + x.shape[axis + 1:])


def _import(kind, leaf, x, num_heads):
  """A torch tensor of module `kind` -> {vitjax name suffix: array}."""
  if kind == "param":
    return {"": x}
  if kind == "rope_frequencies":
    # (2 for x/y, depth, heads [* pairs][, pairs]) -> each block's (heads, pairs, x/y).
    if x.ndim in (3, 4) and len(x) == 2 and np.prod(x.shape[2:]) % num_heads == 0:
      x = np.reshape(x, (2, x.shape[1], num_heads, -1))
    # Otherwise left as it is: the shape check then reports it against the model.
    per_block = np.moveaxis(x, 0, -1)
    return {f"encoderblock_{i}/MultiHeadDotProductAttention_0/rope_frequencies": f
            for i, f in enumerate(per_block)}
  if kind == "norm":
    return {"scale" if leaf == "weight" else leaf: x}
  if leaf == "bias":
    if kind == "qkv":
      return {"bias": _split_heads(x, 0, num_heads)}
    if kind in ("fused_qkv", "fused_kv"):
      names = ("query", "key", "value") if kind == "fused_qkv" else ("key", "value")
      return {f"{n}/bias": _split_heads(b, 0, num_heads)
              for n, b in zip(names, np.split(x, len(names)))}
    return {"bias": x}
  if kind == "conv":
    return {"kernel": np.transpose(x, (2, 3, 1, 0))}
  if kind == "dense":
    return {"kernel": x.T}
  if kind == "qkv":
    return {"kernel": _split_heads(x.T, 1, num_heads)}
  if kind == "out":
    return {"kernel": _split_heads(x.T, 0, num_heads)}
  names = ("query", "key", "value") if kind == "fused_qkv" else ("key", "value")
  return {f"{n}/kernel": _split_heads(w.T, 1, num_heads)
          for n, w in zip(names, np.split(x, len(names)))}


def _export(kind, params, path):
  """vitjax params under `path` -> ({torch leaf: tensor}, vitjax names used), or None."""
  if kind == "param":
    return ({"": params[path]}, [path]) if path in params else None
  if kind in ("fused_qkv", "fused_kv"):
    parts = ("query", "key", "value") if kind == "fused_qkv" else ("key", "value")
    names = [f"{path}/{p}/{leaf}" for p in parts for leaf in ("kernel", "bias")]
    if not all(n in params for n in names):
      return None
    kernels = [params[f"{path}/{p}/kernel"] for p in parts]
    biases = [params[f"{path}/{p}/bias"] for p in parts]
    weight = np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels], axis=0)
    return {"weight": weight, "bias": np.concatenate([b.reshape(-1) for b in biases])}, names
  weight_name = f"{path}/scale" if kind == "norm" else f"{path}/kernel"
  if weight_name not in params:
    return None
  w = params[weight_name]
  if kind == "conv":
    w = np.transpose(w, (3, 2, 0, 1))
  elif kind in ("dense", "qkv"):
    w = w.reshape(w.shape[0], -1).T
  elif kind == "out":
    w = w.reshape(-1, w.shape[-1]).T
  tensors, names = {"weight": w}, [weight_name]
  if f"{path}/bias" in params:
    tensors["bias"] = params[f"{path}/bias"].reshape(-1)
    names.append(f"{path}/bias")
  return tensors, names


# --- Whole state dicts ----------------------------------------------------------------------

def _pattern(template, kind):
  regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
  whole_tensor = kind in ("param", "rope_frequencies")
  return re.compile(regex if whole_tensor else regex + r"\.(?P<leaf>weight|bias)")


def to_vitjax(state_dict, table, num_heads):
  """{torch name: array} -> {vitjax name: array}; names no rule knows are kept as they are."""
  rules = [(_pattern(torch_name, kind), vitjax_name, kind)
           for torch_name, vitjax_name, kind in table]
  out = {}
  for name, x in state_dict.items():
    for pattern, vitjax_name, kind in rules:
      match = pattern.fullmatch(name)
      if match:
        path = vitjax_name.replace("{i}", match.groupdict().get("i") or "")
        for suffix, value in _import(kind, match.groupdict().get("leaf"), np.asarray(x),
                                     num_heads).items():
          out[f"{path}/{suffix}" if suffix else path] = value
        break
    else:
      out[name] = x  # Reported as unexpected, under its own name.
  return out


def from_vitjax(params, table, prefix="", outside_prefix=()):
  """{vitjax name: array} -> {torch name: array}, or an error naming what has no place.

  Modules named in `outside_prefix` (HF classification heads) get no prefix.
  """
  depth = len({n.split("/")[1] for n in params if n.startswith("Transformer/encoderblock_")})
  out, used = {}, set()
  for torch_template, vitjax_template, kind in table:
    for i in range(depth) if "{i}" in vitjax_template else [None]:
      found = _export(kind, params, vitjax_template.replace("{i}", str(i)))
      if found is None:
        continue
      tensors, names = found
      module = torch_template.replace("{i}", str(i))
      module = module if module in outside_prefix else prefix + module
      for leaf, value in tensors.items():
        out[f"{module}.{leaf}" if leaf else module] = np.ascontiguousarray(value)
      used.update(names)
  return out, sorted(set(params) - used)
