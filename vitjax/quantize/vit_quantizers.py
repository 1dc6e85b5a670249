"""The ViT-specific pieces of post-training quantization: a log2 quantizer and RepQ-ViT.

`log2_quantize`: post-softmax attention weights follow a power law (most near 0, a few
near 1); a uniform grid spends its levels where there is little mass. Levels at powers of
2 (or of √2: RepQ-ViT's log√2) in [0, scale] keep the small weights (Lin et al., FQ-ViT,
2022; Li et al., RepQ-ViT, 2023).

`repq_reparameterize`: post-LayerNorm activations vary a lot from channel to channel, so
one scale for the whole tensor (what integer matmuls want) clips some channels and wastes
levels on others. RepQ-ViT (Li et al., ICCV 2023) calibrates a scale s_c and zero point
z_c per channel, then folds the variation into the LayerNorm and the layers it feeds, so
that one layer-wise scale s~ = mean(s), z~ = mean(z) fits every channel:

    r1 = s / s~,  r2 = z - z~
    LayerNorm:  gamma' = gamma / r1,   beta' = (beta + s * r2) / r1
    next layer: W' = r1 * W (input rows),   b' = b - (s * r2) @ W

The float model's output is unchanged (up to float rounding); after it every channel of
the LayerNorm's output spans the same range, [-z~ s~, (2^b - 1 - z~) s~].
Both are pure functions of arrays and parameter trees.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOG2_BASES = ("2", "sqrt2")


def log2_quantize(x, bits, base="2", scale=1.0):
  """Quantize-dequantize `x` (values in [0, scale]) to `bits`-bit logarithmic levels.

  Codes k = 0 .. 2^bits - 2 stand for scale * base^-k, the last code for 0: a value is
  rounded to the nearest level in the log domain, k = round(-log_base(x / scale)); values
  above `scale` clip to `scale`, values below the smallest level (and 0) become 0.
  `base` '2' or 'sqrt2' (RepQ-ViT's log√2: twice the levels over half the range).
  """
  if base not in LOG2_BASES:
    raise ValueError(f"Unknown log2 base {base!r}; use one of {', '.join(LOG2_BASES)}.")
  steps_per_octave = 1.0 if base == "2" else 2.0
  largest_code = 2 ** bits - 2
  ratio = jnp.maximum(x / scale, jnp.finfo(x.dtype).tiny)
  k = jnp.maximum(jnp.round(-jnp.log2(ratio) * steps_per_octave), 0.0)
  # scale * 2^-octaves * (1 or 2^-1/2): exact powers of two for base 2.
  octaves = jnp.floor(k / steps_per_octave)
  mantissa = jnp.exp2(-(k - octaves * steps_per_octave) / steps_per_octave)
  level = scale * jnp.ldexp(mantissa, -octaves.astype(jnp.int32))
  return jnp.where((k > largest_code) | (x <= 0), jnp.zeros_like(x), level).astype(x.dtype)


# ---------------------------------------------------------------------------
# RepQ-ViT: which LayerNorm feeds which dense layers, in a block of vitjax.models.parts.

_ATTENTION = "MultiHeadDotProductAttention_0"
_PROJECTIONS = ("query", "key", "value")
_MLP_IN = ("MlpBlock_0", "Dense_0")


def layer_norm_consumers(params, model_name="this model"):
  """{LayerNorm path: [dense layer paths it feeds]} for the ViT blocks of `params`.

  A block (vitjax.models.parts.Block) is found by its `LayerNorm_0` beside a
  `MultiHeadDotProductAttention_0`: `LayerNorm_0` feeds the attention's query, key and
  value; `LayerNorm_1` feeds `MlpBlock_0/Dense_0` (a parallel block, without
  `LayerNorm_1`, feeds both from `LayerNorm_0`). Paths are '/'-joined. ValueError naming
  the model where there is no such block, or a block the pattern does not cover (adaLN
  modulation, a scanned stack, an MLP other than MlpBlock, layers without biases).
  """
  flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
  modules = {name.rsplit("/", 1)[0] for name in flat}
  blocks = sorted({m.rsplit("/", 1)[0] for m in modules
                   if m.endswith("/" + _ATTENTION + "/query")})
  blocks = [b.rsplit("/" + _ATTENTION, 1)[0] for b in blocks]
  if not blocks:
    raise ValueError(f"RepQ-ViT's reparameterisation needs ViT blocks (LayerNorm_0 -> "
                     f"{_ATTENTION}, LayerNorm_1 -> MlpBlock_0); {model_name} has none.")

  def refuse(block, why):
    raise ValueError(f"RepQ-ViT's reparameterisation does not cover {model_name}: "
                     f"block {block} {why}.")

  pairs = {}
  for block in blocks:
    attention = [f"{block}/{_ATTENTION}/{p}" for p in _PROJECTIONS]
    mlp_in = ["/".join((block,) + _MLP_IN)]
    if any(m.startswith(f"{block}/adaLN_modulation") for m in modules):
      refuse(block, "is modulated (adaLN): a shift and scale sit between norm and layer")
    if f"{block}/LayerNorm_1" in modules:
      groups = {f"{block}/LayerNorm_0": attention, f"{block}/LayerNorm_1": mlp_in}
    else:
      groups = {f"{block}/LayerNorm_0": attention + mlp_in}
    for norm, consumers in groups.items():
      if f"{norm}/bias" not in flat or f"{norm}/scale" not in flat:
        refuse(block, f"has no LayerNorm with scale and bias at {norm}")
      if flat[f"{norm}/scale"].ndim != 1:
        refuse(block, "is a scanned stack (scan_layers=True); quantize the unscanned model")
      for layer in consumers:
        if f"{layer}/kernel" not in flat or f"{layer}/bias" not in flat:
          refuse(block, f"has no dense layer with kernel and bias at {layer}")
      pairs[norm] = consumers
  return pairs


def layer_norm_ranges(model, params, batches, norms):
  """{LayerNorm path: (min, max)} per channel of each LayerNorm's output over `batches`.

  The float model runs on each batch of images; the ranges are over every image and
  token seen.
  """
  wanted = set(norms)

  def capture(module, method_name):
    return (method_name == "__call__" and isinstance(module, nn.LayerNorm)
            and "/".join(module.path) in wanted)

  @jax.jit
  def outputs(params, images):
    _, state = model.apply({"params": params}, images, capture_intermediates=capture,
                           mutable=["intermediates"])
    flat = flax.traverse_util.flatten_dict(state["intermediates"], sep="/")
    found = {}
    for name, value in flat.items():
      path = name.rsplit("/", 1)[0]  # .../LayerNorm_0/__call__
      y = value[0].reshape(-1, value[0].shape[-1]).astype(jnp.float32)
      found[path] = (jnp.min(y, axis=0), jnp.max(y, axis=0))
    return found

  ranges = {}
  for images in batches:
    for path, (low, high) in jax.device_get(outputs(params, images)).items():
      if path in ranges:
        low, high = np.minimum(ranges[path][0], low), np.maximum(ranges[path][1], high)
      ranges[path] = (np.asarray(low), np.asarray(high))
  missing = sorted(wanted - set(ranges))
  if missing:
    raise ValueError(f"These LayerNorms did not run on the calibration images: {missing[:3]}.")
  return ranges


def repq_reparameterize(params, ranges, consumers, bits):
  """The parameters with RepQ-ViT's per-channel-to-layer-wise reparameterisation applied.

  `ranges` {LayerNorm path: (min, max) per channel} (layer_norm_ranges), `consumers`
  {LayerNorm path: dense layer paths} (layer_norm_consumers), `bits` the activations'
  bits. The float model computes the same function with the result.
  """
  flat = dict(flax.traverse_util.flatten_dict(nn.unbox(params), sep="/"))
  levels = 2 ** bits - 1
  for norm, layers in consumers.items():
    low, high = (np.asarray(a, np.float64) for a in ranges[norm])
    # Each channel's range holds 0, as an asymmetric quantizer's grid does.
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    s = np.maximum((high - low) / levels, 1e-8)
    z = np.round(-low / s)
    r1 = s / s.mean()
    r2 = z - z.mean()
    shift = s * r2
    gamma, beta = (np.asarray(flat[f"{norm}/{n}"], np.float64) for n in ("scale", "bias"))
    dtype = flat[f"{norm}/scale"].dtype
    flat[f"{norm}/scale"] = jnp.asarray(gamma / r1, dtype)
    flat[f"{norm}/bias"] = jnp.asarray((beta + shift) / r1, dtype)
    for layer in layers:
      kernel = np.asarray(flat[f"{layer}/kernel"], np.float64)
      bias = np.asarray(flat[f"{layer}/bias"], np.float64)
      rows = r1.reshape((-1,) + (1,) * (kernel.ndim - 1))
      flat[f"{layer}/bias"] = jnp.asarray(bias - np.tensordot(shift, kernel, axes=1),
                                          flat[f"{layer}/bias"].dtype)
      flat[f"{layer}/kernel"] = jnp.asarray(kernel * rows, flat[f"{layer}/kernel"].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")

