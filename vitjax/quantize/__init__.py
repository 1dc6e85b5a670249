"""Post-training quantization (PTQ) of vitjax models through qwix.

    from vitjax import quantize
    qmodel, qparams = quantize.quantize(model, params, calibration_batches, scheme='w8a8',
                                        vit_quantizers=True)
    logits, out = qmodel.apply({'params': qparams}, images)  # as the float model
    quantize.save_quantized('vit_w8a8.npz', qparams, scheme='w8a8', vit_quantizers=True,
                            input_shape=images.shape, model_config={'name': 'vit', ...})
    qmodel, qparams = quantize.load_quantized('vit_w8a8.npz', model)

From the command line, on a training workdir: `python -m vitjax.tools.quantize WORKDIR
--scheme w8,w8a8,w4a4 [--vit_quantizers on|off|both]` (float and quantized accuracy
through the classification evaluator, and the sizes).

Schemes (`SCHEMES`):
  w8, w4        weights only: int8 / int4, one scale per output channel (absmax,
                symmetric); activations stay in float. No calibration: the first batch
                of `images` gives only the input shape.
  w8a8, w4a8,   weights as above and the inputs of every dense layer quantized to int8 /
  w4a4          int4 with a static scale and zero point per tensor (min/max, asymmetric);
                the attention's q, k and weights per tensor and v per head_dim channel
                (absmax, symmetric). Static: calibrated once on the `images` batches (per
                batch the range over all images and tokens, averaged over the batches),
                as integer kernels want, never recomputed at inference.
The patch embedding (a convolution) and everything that is not a dense layer or the
attention's two products stay in float (`float_modules=` keeps more, e.g. 'head').

`vit_quantizers=True` adds what the ViT PTQ literature found the activations need:
RepQ-ViT's reparameterisation of the blocks' post-LayerNorm activations (per-channel
calibration folded into the LayerNorm and the next layers' weights: the float model's
output does not change; Li et al., ICCV 2023) and a log2 quantizer of the post-softmax
attention weights (levels 2^-k, or √2^-k with log2_base='sqrt2', in [0, 1]), applied as
quantize-dequantize. It covers the blocks of vitjax.models.parts (ViT, DeiT, ...) and
refuses other models with a ValueError that names them.

How qwix runs it: `qwix.PtqProvider` intercepts `jax.lax.dot_general` / `jnp.einsum`
in the model's modules; vitjax's dense layers (vitjax.ops.dense) take the plain
dot_general path when qwix claims them. With int8 weights and activations and per-tensor
activation scales the matmul runs on the integer values, the scales applied after it;
with float activations (w8, w4) qwix dequantizes the weights before a float matmul.
Quantized activations need the 'xla' attention (materialised weights); a model made
with attention_impl='pallas' or 'cudnn' is refused.

File format (`save_quantized` / `load_quantized`): one .npz, read with
allow_pickle=False. Entries are named by the '/'-joined parameter path:
  PATH                   a float parameter (LayerNorms, biases, the patch embedding,
                         position embeddings) or an activation's static scale / zero point
                         (PATH ends in `_lhs_scale`, `_rhs_scale`, `_lhs_zero_point`, named
                         by qwix after the op: `dot_general0`, `einsum1`, ...);
  PATH.qvalue            a quantized weight's integer values, in the kernel's own shape;
  PATH.scale             its float32 scales (1 on the contracted axes: per output channel);
  PATH.zero_point        its zero points, where asymmetric;
  __metadata__           a JSON string: format 'vitjax-quantized', version 1, scheme,
                         vit_quantizers, log2_base, float_modules, input_shape, qwix_version,
                         model (create_model keywords, or null) and dtypes (each entry's
                         dtype: 'int4' values are stored in an int8 container, 'bfloat16'
                         in float32).
Loading rebuilds the quantized model from the recipe and checks every entry's name,
shape and dtype against it: a file that does not fit is one QuantizedFileError listing
what differs.
"""

from vitjax.quantize.files import (QuantizedFileError, load_quantized, read_metadata,
                                   save_quantized)
from vitjax.quantize.ptq import (SCHEMES, abstract_params, calibrate, check_scheme,
                                 model_size_bytes, quantization_rules, quantize,
                                 quantized_model, quantized_weights)
from vitjax.quantize.vit_quantizers import (LOG2_BASES, layer_norm_consumers,
                                            layer_norm_ranges, log2_quantize,
                                            repq_reparameterize)

__all__ = ["LOG2_BASES", "SCHEMES", "QuantizedFileError", "abstract_params", "calibrate",
           "check_scheme", "layer_norm_consumers", "layer_norm_ranges", "load_quantized",
           "log2_quantize", "model_size_bytes", "quantization_rules", "quantize",
           "quantized_model", "quantized_weights", "read_metadata", "repq_reparameterize",
           "save_quantized"]
