"""Post-training quantization of a vitjax model through qwix: schemes, calibration, size."""

import dataclasses
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src import averaging
from qwix._src.core import dot_general as qwix_dot_general
from qwix._src.core import einsum as qwix_einsum
from qwix._src.core import qarray
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util

from vitjax.quantize import vit_quantizers as vq

# scheme: (weights, activations); None: the activations stay in float.
SCHEMES = {
    "w8": ("int8", None),
    "w4": ("int4", None),
    "w8a8": ("int8", "int8"),
    "w4a8": ("int4", "int8"),
    "w4a4": ("int4", "int4"),
}
# The module that runs vitjax.ops.attention's two einsums (q k^T and weights @ v).
ATTENTION_MODULES = r".*MultiHeadDotProductAttention[^/]*"
# Activation scales are per tensor: the statistics are reduced over these axes of a
# dense layer's input, (batch, tokens, features), and of the attention's queries, keys,
# weights and values, (batch, tokens or heads, ...) (see `quantization_rules`).
DENSE_BATCH_AXES = (0, 1)
ATTENTION_BATCH_AXES = (0, 1, 2)
_POST_SOFTMAX = "vitjax.ops.attention.post_softmax"
_AUTO_ATTENTION = "vitjax.ops.attention.default_implementation"


def check_scheme(scheme):
  """(weight qtype, activation qtype or None) of a scheme name; ValueError if unknown."""
  if scheme not in SCHEMES:
    raise ValueError(f"Unknown quantization scheme {scheme!r}; use one of "
                     f"{', '.join(SCHEMES)}.")
  return SCHEMES[scheme]


def bits(qtype):
  return jnp.iinfo(jnp.dtype(qtype)).bits


def quantization_rules(scheme, float_modules=None):
  """The qwix rules of a scheme, in order of precedence.

  Every dense layer (a `dot_general` under any module: vitjax.ops.dense) gets weights
  quantized per output channel and, with activations, its input quantized with one static
  scale and zero point per tensor (asymmetric: a GELU's output is far from symmetric).
  With activations, the attention's two einsums (activation x activation) get symmetric
  static scales: q, k and the attention weights per tensor, v per head_dim channel.
  Convolutions (the patch embedding) stay in float. `float_modules`: a regular expression
  of module paths ('head', 'Transformer/encoderblock_0/.*') left in float.
  """
  weights, activations = check_scheme(scheme)
  rules = []
  if float_modules:
    rules.append(qwix.QuantizationRule(module_path=float_modules))
  static = dict(act_qtype=activations, act_static_scale=True) if activations else {}
  rules.append(qwix.QuantizationRule(
      module_path=".*", op_names=("dot_general",), weight_qtype=weights,
      act_calibration_method="minmax", act_batch_axes=DENSE_BATCH_AXES, **static))
  if activations:
    rules.append(qwix.QuantizationRule(
        module_path=ATTENTION_MODULES, op_names=("einsum",), weight_qtype=weights,
        act_calibration_method="absmax", act_batch_axes=ATTENTION_BATCH_AXES, **static))
  return rules


def _quantizes_activations(rule):
  return rule is not None and rule.weight_qtype is not None and rule.act_qtype is not None


class _Log2Attention:
  """What both providers share: the post-softmax hook and fused attention kept out."""

  def __init__(self, log2_base):
    if log2_base is not None and log2_base not in vq.LOG2_BASES:
      raise ValueError(f"Unknown log2 base {log2_base!r}; use one of "
                       f"{', '.join(vq.LOG2_BASES)}.")
    self.log2_base = log2_base
    self._log2_weights = None  # The last attention weights the log2 quantizer returned.

  def _attention_map(self):
    return {_POST_SOFTMAX: self._post_softmax,
            # 'auto' may one day pick a fused kernel; quantization needs the weights.
            _AUTO_ATTENTION: lambda *args, **kwargs: "xla"}

  def _post_softmax(self, weights):
    rule, _ = self._get_current_rule_and_op_id("einsum", only_rule=True)
    if self.log2_base is None or not _quantizes_activations(rule):
      return weights
    self._log2_weights = self._log2(weights, rule)
    return self._log2_weights

  def _takes_log2_weights(self, operands):
    """Whether an einsum's first operand is what the log2 quantizer just returned."""
    marked = self._log2_weights is not None and len(operands) == 2 and (
        operands[0] is self._log2_weights)
    self._log2_weights = None
    return marked


def _cpu_dot_general(lhs, rhs, *args, **kwargs):
  """qwix's dot_general, int4 operands of an integer product widened to int8 on a CPU.

  XLA:CPU has no int4 dot: int4 x int4 fails to compile, and int4 x int8 took a path
  2.5x slower than the float model (ViT-S/16, BENCHMARKS.md). The values are the same:
  an int4 value is an int8 value.
  """
  if (jax.default_backend() == "cpu"
      and all(isinstance(x, qarray.QArray) for x in (lhs, rhs))):
    widen = lambda x: x if x.qvalue.dtype != jnp.int4 else dataclasses.replace(
        x, qvalue=x.qvalue.astype(jnp.int8),
        zero_point=None if x.zero_point is None else x.zero_point.astype(jnp.int8))
    lhs, rhs = widen(lhs), widen(rhs)
  return qwix_dot_general.dot_general(lhs, rhs, *args, **kwargs)


_cpu_einsum = functools.partial(qwix_einsum.einsum, _qwix_dot_general=_cpu_dot_general)


class QuantizedInference(_Log2Attention, qwix.PtqProvider):
  """qwix's PTQ provider, and with `log2_base` the log2 quantizer after the softmax.

  With the log2 quantizer the attention weights are quantized to log2 levels (as
  quantize-dequantize: no integer kernel multiplies log2 codes here) and the
  weights @ v einsum quantizes only v.
  """

  def __init__(self, rules, log2_base=None):
    qwix.PtqProvider.__init__(self, rules, _dot_general_fn=_cpu_dot_general,
                              _einsum_fn=_cpu_einsum)
    _Log2Attention.__init__(self, log2_base)

  def get_intercept_map(self):
    return super().get_intercept_map() | self._attention_map()

  def _log2(self, weights, rule):
    return vq.log2_quantize(weights, bits(rule.act_qtype), self.log2_base)

  def einsum(self, einsum_str, *operands, **kwargs):
    if not self._takes_log2_weights(operands):
      return super().einsum(einsum_str, *operands, **kwargs)
    rule, op_id = self._get_current_rule_and_op_id("einsum")
    weights, v = operands
    how = qwix_einsum.get_how_to_quantize(
        einsum_str=einsum_str, ndims=(weights.ndim, v.ndim), for_lhs=False,
        tile_size=rule.tile_size, qtype=rule.act_qtype,
        calibration_method=rule.act_calibration_method)
    return self._einsum_fn(
        einsum_str, weights, qwix_ptq.quantize_act(v, how, rule, op_id + "_rhs"))


class _Calibration(_Log2Attention, qwix.QuantizationProvider):
  """Runs the float model and records, per quantized input, the statistics of its range.

  The records are qwix's `quant_stats` (a count and running sums), under the names the
  PTQ model gives its static scales: per batch, the minimum and maximum (or the largest
  magnitude) over the rule's batch axes; averaged over the batches.
  """

  def __init__(self, rules, log2_base=None):
    qwix.QuantizationProvider.__init__(self, rules)
    _Log2Attention.__init__(self, log2_base)

  def get_intercept_map(self):
    return super().get_intercept_map() | self._attention_map() | {
        "jax.lax.dot_general": self.dot_general, "jax.numpy.einsum": self.einsum}

  def _log2(self, weights, rule):
    return weights  # Marked only: the statistics are the float model's.

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, **kwargs):
    rule, op_id = self._get_current_rule_and_op_id("dot_general")
    if _quantizes_activations(rule):
      how = functools.partial(
          qwix_dot_general.get_how_to_quantize, dimension_numbers=dimension_numbers,
          ndims=(lhs.ndim, rhs.ndim), tile_size=rule.tile_size, qtype=rule.act_qtype,
          calibration_method=rule.act_calibration_method)
      self._observe_operands(op_id, lhs, rhs, how, rule, observe_lhs=True)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)

  def einsum(self, einsum_str, *operands, **kwargs):
    rule, op_id = self._get_current_rule_and_op_id("einsum")
    log2_weights = self._takes_log2_weights(operands)
    if _quantizes_activations(rule) and len(operands) == 2:
      lhs, rhs = operands
      how = functools.partial(
          qwix_einsum.get_how_to_quantize, einsum_str=einsum_str, ndims=(lhs.ndim, rhs.ndim),
          tile_size=rule.tile_size, qtype=rule.act_qtype,
          calibration_method=rule.act_calibration_method)
      self._observe_operands(op_id, lhs, rhs, how, rule, observe_lhs=not log2_weights)
    return jnp.einsum(einsum_str, *operands, **kwargs)

  def _observe_operands(self, op_id, lhs, rhs, how, rule, observe_lhs):
    # As qwix's PTQ provider: the right operand is a weight when it is a parameter.
    if flax_util.find_param(rhs) is None:
      self._observe(f"{op_id}_rhs", rhs, how(for_lhs=False), rule)
    if observe_lhs:
      self._observe(f"{op_id}_lhs", lhs, how(for_lhs=True), rule)

  def _observe(self, name, x, how, rule):
    reduce = {"min": jnp.min}
    calibration = {key: reduce.get(key, jnp.max)(value, axis=rule.act_batch_axes,
                                                 keepdims=True)
                   for key, value in qarray.calibrate(x, how).items()}
    average = averaging.SimpleMovingAverage()
    stat = flax_util.get_or_create_variable("quant_stats", name,
                                            lambda: average.init(calibration))
    if flax_util.should_update_quant_stats():
      stat.value = average.update(stat.value, calibration)


def quantized_model(model, scheme, *, log2_base=None, float_modules=None):
  """`model` under qwix's PTQ provider for `scheme`: apply it to quantized parameters."""
  return qwix.quantize_model(
      model, QuantizedInference(quantization_rules(scheme, float_modules), log2_base))


def _batches(images):
  if hasattr(images, "ndim") and hasattr(images, "shape"):
    images = [images]
  batches = [jnp.asarray(batch) for batch in images]
  if not batches or any(batch.ndim != 4 for batch in batches):
    raise ValueError("quantize needs one or more batches of images, each (batch, height, "
                     "width, channels).")
  return batches


def calibrate(model, params, images, *, scheme, log2_base=None, float_modules=None):
  """qwix quant_stats of the float model's activations on `images` (a batch or batches)."""
  provider = _Calibration(quantization_rules(scheme, float_modules), log2_base)
  observed = qwix.quantize_model(model, provider)

  @jax.jit
  def step(quant_stats, batch):
    variables = {"params": params, **({"quant_stats": quant_stats} if quant_stats else {})}
    _, state = observed.apply(variables, batch, mutable=["quant_stats"])
    return state["quant_stats"]

  quant_stats = {}
  for batch in _batches(images):
    quant_stats = step(flax.core.unfreeze(quant_stats), batch)
  return flax.core.unfreeze(quant_stats)


def _check_attention(model, activations):
  implementation = getattr(model, "attention_impl", None)
  if activations and implementation not in (None, "auto", "xla"):
    raise ValueError(
        f"Quantized activations need the attention's weights materialised (the 'xla' "
        f"implementation); this model has attention_impl={implementation!r}. Create it with "
        f"attention_impl='xla' (the same parameters).")


def quantize(model, params, images, *, scheme="w8a8", vit_quantizers=False, log2_base="2",
             float_modules=None, model_name=None):
  """Post-training quantization: (quantized model, quantized parameters).

  Args:
    model: a vitjax model (flax linen).
    params: its float parameters (e.g. vitjax.load_weights's, or a checkpoint's).
    images: a batch (batch, height, width, channels) or an iterable of batches, in the
      model's input preprocessing: the calibration data of the activation scales (and of
      RepQ-ViT). A weight-only scheme reads only the first batch's shape.
    scheme: one of SCHEMES: 'w8', 'w4' (weights only, int8 / int4 per output channel),
      'w8a8', 'w4a8', 'w4a4' (and activations with static per-tensor scales).
    vit_quantizers: RepQ-ViT's reparameterisation of the blocks' LayerNorms and a log2
      quantizer of the attention weights (schemes with activations only).
    log2_base: '2' or 'sqrt2' (RepQ-ViT's log√2), with vit_quantizers.
    float_modules: a regular expression of module paths kept in float.
    model_name: names the model in errors.

  `qmodel.apply({'params': qparams}, images)` returns what the model returns, so the
  evaluators run it as they run the float model. The patch embedding (a convolution)
  stays in float.
  """
  _, activations = check_scheme(scheme)
  model_name = model_name or type(model).__name__
  if vit_quantizers and activations is None:
    raise ValueError(f"vit_quantizers quantize activations; scheme {scheme!r} keeps them in "
                     "float. Use a scheme with activations (w8a8, w4a8, w4a4).")
  _check_attention(model, activations)
  batches = _batches(images)
  params = jax.tree_util.tree_map(jnp.asarray, flax.core.unfreeze(nn.unbox(params)))
  log2_base = log2_base if vit_quantizers else None
  if vit_quantizers:
    consumers = vq.layer_norm_consumers(params, model_name)
    ranges = vq.layer_norm_ranges(model, params, batches, consumers)
    params = vq.repq_reparameterize(params, ranges, consumers, bits(activations))
  quant_stats = {}
  if activations:
    quant_stats = calibrate(model, params, batches, scheme=scheme, log2_base=log2_base,
                            float_modules=float_modules)
  qmodel = quantized_model(model, scheme, log2_base=log2_base, float_modules=float_modules)
  abstract = abstract_params(qmodel, (1,) + batches[0].shape[1:], batches[0].dtype)
  _check_statistics(abstract, quant_stats)
  return qmodel, qwix.quantize_params(params, abstract, quant_stats)


def abstract_params(qmodel, input_shape, dtype=jnp.float32):
  """The quantized model's parameter tree, shapes only (qwix's WithAux where quantized)."""
  example = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  return nn.unbox(jax.eval_shape(qmodel.init, jax.random.key(0), example)["params"])


def _check_statistics(abstract, quant_stats):
  scales = {name[:-len("_scale")] for name in flatten(abstract)
            if name.endswith("_lhs_scale") or name.endswith("_rhs_scale")}
  observed = {name.rsplit("/", 1)[0] for name in
              flax.traverse_util.flatten_dict(quant_stats, sep="/")}
  if scales != observed:
    raise ValueError(f"Calibration and the quantized model disagree on the quantized "
                     f"activations: {sorted(scales ^ observed)[:4]}.")


def flatten(tree):
  """{'/'-joined path: leaf}, qwix's WithAux kept whole."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def quantized_weights(qparams):
  """The '/'-joined paths of the quantized weights (kernels) in a quantized tree."""
  return sorted(name for name, leaf in flatten(qparams).items()
                if isinstance(leaf, qwix_ptq.WithAux)
                and isinstance(leaf.array, qarray.QArray))


def _array_bits(x):
  dtype = jnp.dtype(x.dtype)
  width = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize
  return math.prod(x.shape) * width


def model_size_bytes(params):
  """Bytes of a parameter tree, float or quantized: int4 values count 4 bits each.

  A quantized weight counts its values at their bits, its scales (and zero points); float
  parameters and activation scales count their own size.
  """
  total = 0
  for leaf in jax.tree_util.tree_leaves(nn.unbox(params)):
    total += _array_bits(leaf)
  return int(np.ceil(total / 8))
