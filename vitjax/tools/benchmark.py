"""Training and inference throughput of a vitjax model, side by side with PyTorch.

    python -m vitjax.tools.benchmark --model vit_base_patch16_224 --batch 256 \\
        --mode train --dtype bfloat16 [--compare auto|none|timm|transformers|diffusers] \\
        [--steps 20] [--warmup 3] [--markdown] [--json results.json]
    python -m vitjax.tools.benchmark --model vit_small_patch16_224 --mode infer \\
        --token_merging SPEC   # SPEC: r=8 | r=16,schedule=decreasing | method=topk,r=4 |
                               #       method=evit,keep_rate=0.7 | r=8,layers=(3,6,9)
    python -m vitjax.tools.benchmark --model vmoe_small_patch32_224_e8_every2 --mode train
    python -m vitjax.tools.benchmark --model vmoe --variant S/32 --mode infer --markdown
    python -m vitjax.tools.benchmark --model dit_small_patch2_256 --mode train  # vs diffusers
    python -m vitjax.tools.benchmark --model dit --variant S/2 --image_size 8 \\
        --model_options width=32,depth=1,num_heads=2,num_classes=10   # a toy DiT

It times one jitted step of the vitjax model: in 'train' mode a full optimizer step
(forward, softmax cross-entropy, backward, `optax.adamw` update, state donated), in 'infer'
mode the forward pass. It prints images/s and ms/step from the median step time, the
achieved TFLOP/s (FLOPs from XLA's cost analysis of the compiled step), MFU against the
device's peak (`PEAK_TFLOPS`; `--peak_tflops` overrides) and peak device memory.

In the same process, on the same device, it times the same step in PyTorch and prints
vitjax's speed relative to it: with timm installed, `timm.create_model(name)` under
`torch.compile` (the GPU baseline); without timm, the PyTorch ViT of `transformers`
(`ViTForImageClassification`) sized like the vitjax model (the CPU baseline). Both sides get
the same random inputs, generated once on the device, and their steps alternate, so that a
change in the machine's load hits both alike.

With `--token_merging SPEC` it times, in the same way, the vitjax model without and with
token merging or pruning (`create_model(..., token_merging=...)`, see
vitjax/models/token_merging.py; SPEC is its keys as key=value pairs, values as Python
literals) on the same parameters, in place of PyTorch. It prints the speed-up (median of the
per-round ratios of step times), the forward GMACs per image of both and the tokens out of
the last block.

A mixture-of-experts model (`vitjax.models.moe.MoeVisionTransformer`: the `vmoe` and
`soft_moe` families and names) is timed, in the same way, beside its dense counterpart
(`moe.dense_counterpart`: the same ViT, an MLP where it has experts), in place of PyTorch,
which has no counterpart of it. The train step adds the model's auxiliary losses (V-MoE's
load balancing, `out['aux_loss']`) to the cross-entropy, as the trainer does, and passes the
`dropout` key the router noise is drawn from. It prints the ratio of images/s (MoE / dense,
paired by round), the forward GMACs per image of both, and their parameters: all, and those
one token's forward pass uses (a sparse MoE's token meets k of E experts).

A diffusion model (DiT, `vitjax.models.dit`; U-ViT, `vitjax.models.uvit`) is stepped on
(x_t, timesteps, labels): random latents or images of its shape (image_size, in_channels),
random DDPM timesteps in [0, 1000) and class labels. Its train step takes the simple
diffusion loss, the mean squared error of the prediction's first C channels (the noise; a
learned variance's C more are left out) against the noise, with the same AdamW update. A
DiT is compared with diffusers' `DiTTransformer2DModel(**vitjax.convert.dit.diffusers_config
(model))` holding vitjax's weights (`to_diffusers`), so that both compute the same function:
their predictions are checked to agree within 1e-3 before timing (the vitjax DiT takes
diffusers' timestep frequencies, `freq_shift=1`, which costs the same). A diffusion model's
weights are all drawn from N(0, 0.02^2) (`random_weights`): its initialisation has zero
adaLN-Zero gates and output layer, and agreement on zeros would say nothing.
U-ViT has no PyTorch implementation installed: it is timed alone, with a note.

On a CPU the vitjax step is compiled with vitjax.xla_options (as the trainer does; `--xla_defaults`
leaves them out, `--xla_options KEY=VALUE,...` adds more), and the output names the CPU
(`lscpu`'s model name). Of vitjax it imports only `vitjax.models` (and `vitjax.tools.model_table`
for the MAC counts of `--token_merging` and of MoE models), so it runs where ml-collections,
grain and tensorflow-datasets are not installed.
"""

import argparse
import ast
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time

# XLA options for compiling the step on a CPU (vitjax/xla_options.py; the trainer uses them
# too): the vitjax step is measured as users run it. `--xla_defaults` leaves them out.
def compiler_options(backend):
  """The options vitjax compiles its steps with on `backend` ('cpu', 'gpu', ...), or None."""
  from vitjax import xla_options  # pylint: disable=import-outside-toplevel  # Imports jax.
  return xla_options.compiler_options(backend)

# Peak dense TFLOP/s (bfloat16, float32) by a substring of `device.device_kind`, first match
# wins. float32 is what a float32 matmul runs at under JAX's default precision: TF32 tensor
# cores on NVIDIA GPUs, bfloat16 MXU passes on TPUs.
PEAK_TFLOPS = (
    ("H100 PCIe", 756, 378),
    ("H100 NVL", 835, 418),
    ("H100", 989, 495),  # SXM.
    ("H200", 989, 495),
    ("A100", 312, 156),
    ("TPU v4", 275, 275),
    ("TPU v5 lite", 197, 197),
    ("TPU v5e", 197, 197),
    ("TPU v5", 459, 459),  # v5p.
    ("TPU v6 lite", 918, 918),
    ("TPU v6e", 918, 918),
)

# Both optimizers: AdamW with the same hyperparameters (the values do not change the speed).
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 0.05
# DDPM's timesteps: a diffusion model's inputs are drawn from [0, NUM_TIMESTEPS).
NUM_TIMESTEPS = 1000
DIFFUSION_LOSS = ("the simple diffusion loss: MSE of the first {channels} output channels "
                  "against the noise")
# The largest |vitjax - diffusers| difference of the predictions, in float32, before timing.
AGREEMENT_TOLERANCE = 1e-3
# More than this share of the machine's CPU time used by other processes while timing is
# reported: the numbers are then likely low.
_BACKGROUND_WARNING = 0.05


def cpu_threads():
  """The cores this process may run on: the size of XLA's CPU thread pool."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def peak_tflops(device_kind, dtype):
  """Peak dense TFLOP/s of a device kind for `dtype` ('bfloat16'/'float32'), or None."""
  for pattern, bf16, fp32 in PEAK_TFLOPS:
    if pattern.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def xla_flops(compiled):
  """FLOPs of a compiled executable by XLA's cost analysis (a dict, or a list of one)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per partition.
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def planned_bytes(compiled):
  """Arguments + outputs + temporaries XLA plans for an executable (donated buffers once)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


# ----------------------------------------------------------------------------- vitjax side


def is_diffusion(model):
  """A diffusion model (DiT, U-ViT): `model.apply(variables, x_t, timesteps, labels)` returns
  a prediction of x_t's shape. Told by `learn_sigma`, as vitjax.train.tasks.diffusion does."""
  return hasattr(model, "learn_sigma") and hasattr(model, "in_channels")


def is_dit(model):
  """A DiT (`vitjax.models.dit.DiT`): diffusers' `DiTTransformer2DModel` is its counterpart."""
  from vitjax.models import dit  # pylint: disable=import-outside-toplevel
  return isinstance(model, dit.DiT)


def step_inputs(model, batch, diffusion):
  """The random inputs of a step, put on the device once: {'images', 'labels'}, images
  (batch, image_size, image_size, in_channels) and class labels; for a diffusion model the
  images are the noisy x_t, and 'timesteps' (in [0, NUM_TIMESTEPS)) and 'noise' (the train
  step's target, x_t's shape) are added. Drawn with numpy: nothing to compile."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  shape = (batch, model.image_size, model.image_size, model.in_channels)
  inputs = {"images": rng.standard_normal(shape, np.float32)}
  if not diffusion:
    inputs["labels"] = rng.integers(0, model.num_classes or 1000, batch, np.int32)
  else:  # An unconditional model (num_classes=0) ignores its labels.
    inputs["labels"] = rng.integers(0, max(model.num_classes, 1), batch, np.int32)
    inputs["timesteps"] = rng.integers(0, NUM_TIMESTEPS, batch, np.int32)
    inputs["noise"] = rng.standard_normal(shape, np.float32)
  return jax.device_put(inputs)


def random_weights(model, seed=0, stddev=0.02):
  """Parameters of `model`, every one drawn from N(0, stddev^2) with numpy (nothing to
  compile). Not its initialisation: at init a DiT's adaLN-Zero gates and output layer are
  zeros, it predicts zeros, and two implementations agreeing on zeros would say nothing."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vitjax import models  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jax.device_put((stddev * rng.standard_normal(p.shape, np.float32))
                               .astype(p.dtype)), models.param_shapes(model))


def diffusion_loss(model, params, inputs, dropout_key):
  """The simple diffusion loss (DDPM's L_simple): the mean squared error of the prediction's
  first C channels (the noise; with `learn_sigma`, C more are the variance's) against the
  noise. The `dropout` rng drops labels to the null class, as in training."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  prediction, _ = model.apply({"params": params}, inputs["images"], inputs["timesteps"],
                              inputs["labels"], train=True, rngs={"dropout": dropout_key})
  noise = inputs["noise"]
  return jnp.mean(jnp.square(prediction[..., :noise.shape[-1]].astype(jnp.float32) - noise))


def training_loss(model, params, images, labels, dropout_key):
  """Mean softmax cross-entropy plus the model's auxiliary losses, as the trainer adds them.

  The auxiliary losses (`out['aux_loss']`, already weighted: a sparse MoE's load balancing)
  are summed onto the cross-entropy; a model without them adds nothing. `dropout_key`: the
  `dropout` rng (dropout, a sparse MoE's router noise).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  logits, out = model.apply({"params": params}, images, train=True,
                            rngs={"dropout": dropout_key})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         labels).mean()
  aux_losses = out.get("aux_loss", {}) if isinstance(out, dict) else {}
  return sum(aux_losses.values(), loss)


def build_vitjax(args, dtype, inputs, compiler_options=None, *, token_merging=None,
                 params=None, model=None):
  """(run_step, compiled, model, compiler_options): one compiled vitjax step.

  `inputs`: `step_inputs`' dict. `run_step()` runs a step and waits for it. Where this JAX
  does not know one of `compiler_options`, the step is compiled without them and the
  returned options are None.
  `token_merging`: the model's `token_merging` option. `params`: the model's parameters
  (default: freshly initialised); a train step donates them, so pass each step its own copy.
  `model`: the model to step (default: `args.model` with the options of `args` and `dtype`),
  e.g. an MoE model's dense counterpart.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from vitjax import models  # pylint: disable=import-outside-toplevel

  if model is None:
    overrides = model_overrides(args, dtype)
    if token_merging is not None:
      overrides["token_merging"] = token_merging
    model = models.create_model(args.model, **overrides)
  if params is None:
    params = models.init_params(model)
  optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  diffusion = is_diffusion(model)

  def infer_step(params, inputs):
    if diffusion:
      prediction, _ = model.apply({"params": params}, inputs["images"], inputs["timesteps"],
                                  inputs["labels"])
      return prediction
    logits, _ = model.apply({"params": params}, inputs["images"], train=False)
    return logits

  def loss_fn(params, inputs, dropout_key):
    if diffusion:
      return diffusion_loss(model, params, inputs, dropout_key)
    return training_loss(model, params, inputs["images"], inputs["labels"], dropout_key)

  def train_step(params, opt_state, inputs, dropout_key):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, dropout_key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  if args.mode == "infer":
    # What the forward pass reads (the noise is the train step's target).
    needed = ("images", "timesteps", "labels") if diffusion else ("images",)
    state, inputs = [params], ({name: inputs[name] for name in needed},)
    jit = lambda options: jax.jit(infer_step, compiler_options=options)
  else:
    # The key is an argument, not a constant XLA could fold: the router noise (and a
    # diffusion model's label dropout) is drawn in the step, as in training.
    state, inputs = [params, optimizer.init(params)], (inputs, jax.random.key(1))
    jit = lambda options: jax.jit(train_step, donate_argnums=(0, 1), compiler_options=options)
  step = jit(compiler_options)
  try:
    compiled = step.lower(*state, *inputs).compile()
  except Exception as error:  # pylint: disable=broad-except
    if not compiler_options or "compile option" not in str(error):
      raise
    print(f"Compiling without {compiler_options}: {error}", flush=True)
    compiler_options, step = None, jit(None)
    compiled = step.lower(*state, *inputs).compile()

  # Steps run through the jitted function, as in a training loop (its C++ dispatch is faster
  # than calling `compiled`); it reuses the executable compiled above.
  def run_step():
    if args.mode == "infer":
      jax.block_until_ready(step(*state, *inputs))
    else:
      state[0], state[1], loss = step(*state, *inputs)
      jax.block_until_ready((state, loss))
  return run_step, compiled, model, compiler_options


def forward_figures(model, params, image_shape, batch=1):
  """{'gmacs', 'tokens_at_last_block'}: forward multiply-adds per image of `image_shape`
  (H, W, C) in a batch of `batch` (a sparse MoE's expert capacity rounds up per routing
  group of images), and the tokens out of the last block (`out['encoded']`). Traced only:
  nothing runs; `params` may be shapes."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vitjax.tools import model_table  # pylint: disable=import-outside-toplevel

  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  forward = lambda p, x: model.apply({"params": p}, x)  # As model_table.model_row counts.
  _, out = jax.eval_shape(forward, params, images)
  return {"gmacs": model_table.count_macs(forward, params, images) / batch / 1e9,
          "tokens_at_last_block": out["encoded"].shape[1]}


def cost_figures(model, image_shape, batch):
  """{'gmacs', 'params', 'active_params'} of a model: forward GMACs per image (see
  `forward_figures`), all its parameters and those one token's forward pass uses (fewer for
  a sparse MoE: a token meets k of E experts). Traced only: nothing runs."""
  from vitjax import models  # pylint: disable=import-outside-toplevel
  params = models.param_shapes(model)
  counts = models.parameter_counts(model, params)
  return {"gmacs": forward_figures(model, params, image_shape, batch)["gmacs"],
          "params": counts["total"], "active_params": counts["active"]}


def moe_description(model, mode):
  """The MoE options that set its cost, e.g. 'sparse, 8 experts, top-2, capacity 1.05'; the
  capacity factor is the one `mode` ('train' or 'infer') routes with."""
  if model.moe_type == "soft":
    return f"soft, {model.num_experts} experts, {model.slots_per_expert} slot(s) each"
  capacity = (model.capacity_factor if mode == "train" or model.eval_capacity_factor is None
              else model.eval_capacity_factor)
  return f"sparse, {model.num_experts} experts, top-{model.top_k}, capacity {capacity:g}"


def model_overrides(args, dtype):
  overrides = {"dtype": dtype}
  if args.variant:
    overrides["variant"] = args.variant
  if args.attention_impl:
    overrides["attention_impl"] = args.attention_impl
  if args.image_size:
    overrides["image_size"] = args.image_size
  if args.model_options:  # Checked by create_model: an unknown option names the valid ones.
    overrides.update(parse_key_values(args.model_options, "--model_options",
                                      "width=32,depth=1,num_heads=2"))
  return overrides


def parse_token_merging(text):
  """The `token_merging` dict of a `--token_merging` value such as 'r=8',
  'method=evit,keep_rate=0.7' or 'r=8,layers=(3,6,9)'; the keys and values themselves are
  checked by vitjax.models.token_merging.parse."""
  return parse_key_values(text, "--token_merging",
                          "r=8, r=16,schedule=decreasing or method=evit,keep_rate=0.7")


def parse_key_values(text, flag, example):
  """The dict of a `flag` value of key=value pairs, e.g. 'r=8,layers=(3,6,9)'.

  Items are split at the commas outside brackets; a value is the Python literal it spells
  (8, 0.7, (3, 6, 9), True), else the string ('evit'). Raises ValueError, naming `flag`
  and showing `example`, for an item that is not key=value, a repeated key or unbalanced
  brackets.
  """
  items, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
    if depth < 0:
      break
  if depth:
    raise ValueError(f"{flag} {text!r}: unbalanced brackets.")
  items.append(text[start:])
  spec = {}
  for item in filter(str.strip, items):  # A trailing comma is harmless.
    key, equals, value = (part.strip() for part in item.partition("="))
    if not equals or not key.isidentifier():
      raise ValueError(f"{flag} {text!r}: {item.strip()!r} is not key=value; give e.g. "
                       f"{example}.")
    if key in spec:
      raise ValueError(f"{flag} {text!r}: {key!r} is given twice.")
    try:
      spec[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError):
      spec[key] = value  # A bare word: method=evit, schedule=decreasing.
  return spec


def parse_xla_options(text):
  """The dict of an `--xla_options` value ('xla_cpu_foo=1,xla_cpu_bar='), {} for None.

  Exits with status 2 and one line for a malformed value or a name that is not an XLA
  option (they all start with 'xla_').
  """
  if text is None:
    return {}
  try:
    options = parse_key_values(text, "--xla_options", "xla_cpu_experimental_ynn_fusion_type=")
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
  for name in options:
    if not name.startswith("xla_"):
      print(f"error: --xla_options {text!r}: {name!r} is not an XLA option (their names "
            "start with 'xla_', e.g. xla_cpu_experimental_ynn_fusion_type).", file=sys.stderr)
      raise SystemExit(2)
  return options


def check_xla_options(options, platform):
  """Exits with status 2 and one line if this XLA rejects `options` on `platform`."""
  from vitjax import xla_options  # pylint: disable=import-outside-toplevel
  reason = xla_options.rejection(platform, options)
  if reason:
    print(f"error: --xla_options: this XLA (jaxlib {_versions('none').get('jaxlib', '?')}) "
          f"rejects {_options_text(options).replace('`', '')} on {platform}: {reason}",
          file=sys.stderr)
    raise SystemExit(2)


def check_model(args):
  """Exits with status 2 and one line if create_model rejects `--model` or its options, or
  `--token_merging` (also: given with an MoE model), or `--compare` names a library without
  the model's kind (a DiT's is diffusers); notes what a family name without `--variant`
  builds.

  Returns (model, token_merging): the model (in its default dtype) and the `token_merging`
  dict of `--token_merging`, or None without it.
  """
  from vitjax import models  # pylint: disable=import-outside-toplevel
  from vitjax.models import moe  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from vitjax.models import token_merging as token_merging_lib
  token_merging = None
  try:
    overrides = model_overrides(args, None)
    del overrides["dtype"]  # Decided by the device, later; it does not change the checks.
    model = models.create_model(args.model, **overrides)
    if is_dit(model) and args.compare in ("timm", "transformers"):
      raise ValueError(f"--compare {args.compare} has no diffusion transformer: the DiT "
                       f"{args.model!r} is compared with --compare diffusers (the default) or "
                       "none.")
    if args.compare == "diffusers" and not is_diffusion(model):
      raise ValueError(f"--compare diffusers is for a DiT; compare {args.model!r} with "
                       "--compare auto, timm, transformers or none.")
    if args.token_merging is not None and isinstance(model, moe.MoeVisionTransformer):
      raise ValueError(f"--token_merging is for a dense model: {args.model!r} is a mixture of "
                       "experts, which the benchmark times beside its dense counterpart.")
    if args.token_merging is not None:
      token_merging = parse_token_merging(args.token_merging)
      merged = models.create_model(args.model, **overrides, token_merging=token_merging)
      # The model checks its option only when applied: check it here, before any device work.
      depth = getattr(merged, "depth", None)  # None: a two-tower model, checked when applied.
      if depth:
        parsed = token_merging_lib.parse(token_merging, depth)
        if parsed is None:
          raise ValueError(f"--token_merging {args.token_merging!r} takes out no token of the "
                           f"{depth}-block model: give r > 0 or keep_rate < 1.")
        token_merging_lib.check_model(merged, parsed)
  except (models.UnknownModelError, models.UnknownOptionError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
  if args.model in models.families() and not args.variant:
    print(f"note: {models.describe_family_default(args.model, **overrides)}; pass --variant "
          f"(e.g. --variant S/16) or a full name (python -m vitjax.tools.model_table "
          f"'{args.model}_*' lists them)", file=sys.stderr, flush=True)
  return model, token_merging


# ---------------------------------------------------------------------------- PyTorch side


def resolve_compare(compare, model=None):
  """'timm', 'transformers', 'diffusers' or 'none' for `--compare` and the vitjax `model`;
  'auto' picks what is installed: diffusers for a DiT, else timm, else transformers."""
  if compare != "auto":
    return compare
  if not importlib.util.find_spec("torch"):
    return "none"
  for name in ("diffusers",) if is_dit(model) else ("timm", "transformers"):
    if importlib.util.find_spec(name):
      return name
  return "none"


def torch_model(kind, model, args, params=None):
  """The PyTorch counterpart of the vitjax `model`: (module, forward(module, inputs) -> its
  output), `inputs` a dict of tensors as `step_inputs`' (NCHW images). A diffusers DiT
  holds `params` (vitjax's, through `vitjax.convert.dit.to_diffusers`) where they are given."""
  if kind == "timm":
    import timm  # pylint: disable=import-outside-toplevel
    kwargs = {"img_size": args.image_size} if args.image_size else {}
    return (timm.create_model(args.model, pretrained=False, **kwargs),
            lambda m, inputs: m(inputs["images"]))
  if kind == "diffusers":
    import diffusers  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from vitjax.convert import dit as dit_convert  # pylint: disable=import-outside-toplevel
    if (model.mlp_dim or 4 * model.width) != 4 * model.width:
      raise ValueError(f"diffusers' DiT has MLPs of 4 x width ({4 * model.width}), this DiT "
                       f"of {model.mlp_dim}: give mlp_dim={4 * model.width}.")
    config = dit_convert.diffusers_config(model)
    module = diffusers.DiTTransformer2DModel(
        **{k: v for k, v in config.items() if not k.startswith("_")})
    if params is not None:
      state_dict = {name: torch.from_numpy(np.array(value, np.float32))  # Copies.
                    for name, value in dit_convert.to_diffusers(model, params).items()}
      module.load_state_dict(state_dict, strict=True)
    return module, lambda m, inputs: m(inputs["images"], timestep=inputs["timesteps"],
                                       class_labels=inputs["labels"]).sample
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.ViTConfig(
      hidden_size=model.width, num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
      intermediate_size=model.mlp_dim, patch_size=model.patch_size, image_size=model.image_size,
      num_channels=model.in_channels, num_labels=model.num_classes or 1000,
      layer_norm_eps=model.layer_norm_eps,
      hidden_act="gelu_pytorch_tanh" if model.gelu_approximate else "gelu")
  module = transformers.ViTForImageClassification(config)
  return module, lambda m, inputs: m(pixel_values=inputs["images"]).logits


def check_agreement(model, params, module, forward, inputs, torch_inputs, examples=4):
  """{'max_abs_difference', 'max_abs_prediction'}: the largest |vitjax - PyTorch| difference
  of the predictions on the first `examples` inputs, in float32 at full matmul precision on
  both sides (no TF32), in eval mode, and the largest |prediction| (its scale).

  Raises ValueError where it exceeds AGREEMENT_TOLERANCE: the two would not compute the
  same function, and timing them side by side would compare different work.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  float32 = model.clone(dtype=jnp.float32)
  first = {name: inputs[name][:examples] for name in ("images", "timesteps", "labels")}
  with jax.default_matmul_precision("highest"):
    expected = jax.jit(lambda p, x: float32.apply({"params": p}, x["images"], x["timesteps"],
                                                  x["labels"])[0])(params, first)
  tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    module.eval()
    with torch.no_grad():
      got = forward(module, {name: torch_inputs[name][:examples] for name in first})
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
  got = got.float().cpu().numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC.
  expected = np.asarray(expected)
  difference = float(np.max(np.abs(got - expected)))
  if not difference <= AGREEMENT_TOLERANCE:  # A NaN fails too.
    raise ValueError(f"the PyTorch model's predictions differ from vitjax's by up to "
                     f"{difference:.3g} (> {AGREEMENT_TOLERANCE:g}) on the same weights and "
                     "inputs: they do not compute the same function, so their times are not "
                     "compared.")
  return {"max_abs_difference": difference,
          "max_abs_prediction": float(np.max(np.abs(expected)))}


def build_torch(kind, model, args, dtype_name, inputs, platform, params=None):
  """(run_step, info): the same step in PyTorch on the same device; `run_step()` blocks.

  `inputs`: `step_inputs`' dict (the same arrays as vitjax's). `params`: vitjax's, which a
  diffusers DiT loads; its predictions are then checked against vitjax's before any step.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  device = torch.device("cuda" if platform == "gpu" else "cpu")
  if device.type == "cpu":
    torch.set_num_threads(cpu_threads())  # The cores XLA's CPU thread pool runs on.
  if device.type == "cuda" and dtype_name == "float32":
    torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default precision uses TF32 too.
    torch.backends.cudnn.allow_tf32 = True
  module, forward = torch_model(kind, model, args, params)
  module = module.to(device)
  use_compile = (args.torch_compile == "on"
                 or (args.torch_compile == "auto" and device.type == "cuda"))
  step_module = torch.compile(module) if use_compile else module
  # bfloat16 as in vitjax: float32 parameters, bfloat16 compute (autocast).
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)
              if dtype_name == "bfloat16" else contextlib.nullcontext())
  # Images (and a diffusion model's noise) NHWC -> NCHW; labels and timesteps as int64.
  tensors = {name: torch.from_numpy(np.array(value)) for name, value in inputs.items()}
  tensors = {name: (t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t.long()).to(device)
             for name, t in tensors.items()}
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  info = {"implementation": kind, "torch_compile": use_compile,
          "torch_threads": torch.get_num_threads()}
  if kind == "transformers":
    # pylint: disable-next=protected-access
    info["attn_implementation"] = module.config._attn_implementation
  if kind == "diffusers":
    info["module"] = type(module).__name__
    info["attention_processor"] = type(module.transformer_blocks[0].attn1.processor).__name__
    if params is not None:
      info["weights"] = "vitjax's, through vitjax.convert.dit.to_diffusers"
      info.update(check_agreement(model, params, module, forward, inputs, tensors))

  if args.mode == "infer":
    module.eval()

    def run_step():
      with torch.inference_mode(), autocast():
        forward(step_module, tensors)
      sync()
    return run_step, info

  module.train()
  fused = device.type == "cuda"  # The fastest AdamW on a GPU; the default one elsewhere.
  optimizer = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                fused=fused or None)
  info["optimizer"] = "AdamW" + (" (fused)" if fused else "")
  if is_diffusion(model):  # diffusion_loss's: the first C channels against the noise.
    channels = model.in_channels
    loss_fn = lambda output: torch.nn.functional.mse_loss(output[:, :channels].float(),
                                                          tensors["noise"])
  else:
    loss_fn = lambda logits: torch.nn.functional.cross_entropy(logits.float(), tensors["labels"])

  def run_step():
    with autocast():
      output = forward(step_module, tensors)
    loss_fn(output).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
  return run_step, info


# --------------------------------------------------------------------------------- timing


def _busy_cpu_seconds():
  """CPU seconds all processes have used (Linux /proc/stat), or None elsewhere."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      ticks = [int(n) for n in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
  return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def time_steps(runners, steps, warmup):
  """Seconds per step of each runner (name -> run_step), their steps alternating.

  Each round runs every runner once, in reverse order every other round (A B, B A, ...), so
  neither side always runs right after the other, e.g. into the caches it left.

  Returns ({name: [seconds, ...]}, background): `background` is the share of the machine's
  CPU time that other processes used while timing (None where unknown).
  """
  for run_step in runners.values():
    for _ in range(warmup):
      run_step()
  times = {name: [] for name in runners}
  busy, own, wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
  for step in range(steps):
    for name, run_step in list(runners.items())[::-1 if step % 2 else 1]:
      start = time.perf_counter()
      run_step()
      times[name].append(time.perf_counter() - start)
  background = None
  if busy is not None:
    others = (_busy_cpu_seconds() - busy) - (time.process_time() - own)
    background = max(0.0, others / ((time.perf_counter() - wall) * (os.cpu_count() or 1)))
  return times, background


def step_figures(step_times_s, batch, compiled=None, peak=None):
  """{'images_per_s', 'ms_per_step', 'step_times_s'} of a step, from the median of its times;
  with its `compiled` executable also 'flops' (XLA's cost analysis), 'tflops' and 'mfu' (of
  `peak` TFLOP/s; None where unknown)."""
  step_s = statistics.median(step_times_s)
  figures = {"images_per_s": batch / step_s, "ms_per_step": step_s * 1e3,
             "step_times_s": step_times_s}
  if compiled is not None:
    flops = xla_flops(compiled)
    tflops = flops / step_s / 1e12 if flops else None
    figures.update(flops=flops, tflops=tflops, mfu=tflops / peak if tflops and peak else None)
  return figures


def paired_ratio(baseline_s, candidate_s):
  """Median over rounds of baseline time / candidate time: the speed-up of the candidate.

  Each round's two steps ran back to back, under the same load, so the per-round ratio
  cancels a load that changes between rounds, which a ratio of the two medians does not.
  """
  return statistics.median(b / c for b, c in zip(baseline_s, candidate_s))


# ---------------------------------------------------------------------------------- output


def _versions(compare):
  packages = ["jax", "jaxlib", "flax", "optax"]
  if compare != "none":
    packages += ["torch", compare]
  versions = {}
  for package in packages:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def _options_text(options):
  return ", ".join(f"`{name}={value}`" for name, value in options.items())


def _fmt(x, digits=3):
  if x is None:
    return "n/a"
  if x >= 100:
    return f"{x:,.0f}"
  return f"{x:.1f}" if x >= 10 else f"{x:.{digits}g}"


def summary_lines(result):
  r = result
  memory = ("n/a" if r["peak_memory_bytes"] is None
            else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB ({r['peak_memory_source']})")
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s"
  merging, mixture = r.get("token_merging"), r.get("moe")
  # The other vitjax step of a side-by-side: its label, and the label of the benchmarked one.
  label, other_label, other = (("plain", "merged", merging["merged"]) if merging else
                               ("MoE", "dense", mixture["dense"]) if mixture else ("", "", None))
  lines = [
      f"vitjax {r['model']} {r['mode']}, batch {r['batch']}, {r['dtype']}, "
      f"{r['image_size']}px on {r['device']}"
      + _cpu_text(r) + ":",
      (f"  {label + ':':<8}" if other else "  ") + _speed_text(r, mfu),
  ]
  if other:
    mfu = "n/a" if other["mfu"] is None else f"{100 * other['mfu']:.1f}%"
    lines.append(f"  {other_label + ':':<8}" + _speed_text({**other, "steps": r["steps"]}, mfu))
  lines.append(f"  peak memory {memory}")
  if r.get("diffusion"):
    lines.append("  " + _diffusion_text(r))
  if r["compiler_options"]:
    lines.append("  compiled with " + _options_text(r["compiler_options"]).replace("`", ""))
  if merging:
    m = merging
    lines += [
        f"token merging {m['spec']} (same parameters; plain and merged steps alternate):",
        f"  speedup {m['speedup']:.2f}x (median of the per-round ratios of step times, plain / "
        "merged)",
        f"  forward GMACs per image {m['plain']['gmacs']:.3g} plain, {m['merged']['gmacs']:.3g} "
        f"merged ({m['gmacs_ratio']:.2f}x); tokens out of the last block "
        f"{m['plain']['tokens_at_last_block']} plain, {m['tokens_at_last_block']} merged",
    ]
  if mixture:
    m, dense = mixture, mixture["dense"]
    lines += [
        f"mixture of experts ({m['description']}, in blocks "
        f"{', '.join(map(str, m['moe_layers']))}) beside its dense counterpart (MLPs in their "
        "place; MoE and dense steps alternate):",
        f"  MoE / dense {m['speed_ratio']:.2f}x images/s (median of the per-round ratios of "
        "step times, dense / MoE)",
        f"  forward GMACs per image {m['moe']['gmacs']:.3g} MoE, {dense['gmacs']:.3g} dense "
        f"({m['gmacs_ratio']:.2f}x); parameters {m['moe']['params']:,} MoE "
        f"({m['moe']['active_params']:,} active per token), {dense['params']:,} dense",
    ]
  torch_result = r.get("torch")
  if r.get("torch_not_timed"):
    lines.append(f"  PyTorch: not timed: {r['torch_not_timed']}")
  if torch_result and torch_result.get("error"):
    lines.append(f"  PyTorch ({torch_result['implementation']}): n/a: {torch_result['error']}")
  elif torch_result:
    t = torch_result
    lines.append(f"PyTorch {_torch_text(t)}: "
                 f"{_fmt(t['images_per_s'])} images/s, {_fmt(t['ms_per_step'])} ms/step, "
                 f"{_fmt(t['tflops'])} TFLOP/s at the same FLOPs")
    lines.append(f"vitjax / PyTorch: {r['ratio']:.2f}x images/s (median of the per-round "
                 "ratios of step times)")
  if _background_warning(r):
    lines.append(_background_warning(r))
  return lines


def _cpu_text(r):
  """' (AMD EPYC, 2 threads)' on a CPU: the model name and XLA's thread pool; else ''."""
  if not r.get("cpu_threads"):
    return ""
  model = f"{r['cpu_model']}, " if r.get("cpu_model") else ""
  return f" ({model}{r['cpu_threads']} threads)"


def _torch_text(t):
  """The PyTorch side in words: library (and module), compilation, threads, weights."""
  text = (f"{t['implementation']}" + (f" {t['module']}" if t.get("module") else "")
          + f" ({'torch.compile' if t['torch_compile'] else 'eager'}, {t['torch_threads']} "
          "threads")
  if "max_abs_difference" in t:
    text += (f"; weights {t['weights']}; predictions within {t['max_abs_difference']:.2g} "
             f"of vitjax's, which reach {t['max_abs_prediction']:.2g}, before timing")
  return text + ")"


def _diffusion_text(r):
  """A diffusion model's inputs and train loss, one sentence."""
  d = r["diffusion"]
  text = (f"Diffusion inputs: x_t ({r['batch']}, {r['image_size']}, {r['image_size']}, "
          f"{d['in_channels']}), timesteps in [0, {d['num_timesteps']}), "
          + (f"labels in [0, {d['num_classes']})" if d["num_classes"] else "unconditional"))
  if d["loss"]:
    text += f"; train step: {d['loss']}, AdamW" + (", the same on both sides"
                                                    if r.get("ratio") else "")
  return text


def _speed_text(r, mfu):
  """Images/s, ms/step, TFLOP/s and MFU of one timed step (`r`: its figures)."""
  return (f"{_fmt(r['images_per_s'])} images/s, {_fmt(r['ms_per_step'])} ms/step (median of "
          f"{r['steps']}), {_fmt(r['tflops'])} TFLOP/s ({_fmt(r['flops'] and r['flops'] / 1e9)} "
          f"GFLOP/step by XLA's cost analysis), MFU {mfu}")


def _background_warning(result):
  share = result["background_cpu"]
  if share is None or share <= _BACKGROUND_WARNING:
    return ""
  return (f"Warning: other processes used {100 * share:.0f}% of the CPU time while timing; "
          "these numbers are likely low.")


_MARKDOWN_COLUMNS = ("model", "mode", "batch", "dtype", "vitjax img/s", "ms/step", "TFLOP/s", "MFU",
                     "peak memory MiB", "PyTorch", "PyTorch img/s", "vitjax / PyTorch")


def _header_lines(r):
  """The opening lines of a results block: the machine, library versions, date and command."""
  return [
      f"Throughput on {r['device']} ({r['platform']}"
      + (f"; lscpu model name: {r['cpu_model']}" if r.get("cpu_model") else "") + "), "
      + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f", {r['date']}.",
      "",
      f"- Command: `{r['command']}`",
  ]


def _setup_notes(r):
  """Markdown bullets on what else shaped the numbers: load, compiler options, threads."""
  notes = []
  if _background_warning(r):
    notes.append("- " + _background_warning(r))
  if r["compiler_options"]:
    notes.append("- vitjax step compiled with " + _options_text(r["compiler_options"]) + ".")
  if r["xla_flags"]:
    notes.append(f"- XLA_FLAGS: `{r['xla_flags']}`")
  if r.get("cpu_threads"):
    notes.append(f"- XLA's CPU thread pool: {r['cpu_threads']} threads (the cores this process "
                 "may use).")
  return notes


def _alternation_text(r, first, second):
  """How the steps of a side-by-side (`first` and `second`: their names) were timed."""
  return (f"Median step time of {r['steps']} steps after {r['warmup']} warm-up steps, "
          f"compilation excluded; {first} and {second} steps alternate (A B, B A, ...)")


def _table_lines(columns, cells, left_aligned):
  """A one-row Markdown table after a blank line; `left_aligned`: the text columns."""
  return ["", "| " + " | ".join(columns) + " |",
          "|" + "|".join("---" if c in left_aligned else "---:" for c in columns) + "|",
          "| " + " | ".join(cells) + " |"]


def markdown_lines(result):
  if result.get("token_merging"):
    return token_merging_markdown_lines(result)
  if result.get("moe"):
    return moe_markdown_lines(result)
  r, t = result, result.get("torch") or {}
  header = _header_lines(r) + [
      "- " + _alternation_text(r, "vitjax", "PyTorch") + " and vitjax / PyTorch is "
      "the median of the per-round ratios of step times. FLOPs: XLA's cost analysis of the vitjax "
      "step. Memory: " + (r["peak_memory_source"] or "n/a") + ".",
  ] + _setup_notes(r)
  if r.get("diffusion"):
    header.append(f"- {_diffusion_text(r)}.")
  if r.get("torch_not_timed"):
    header.append(f"- PyTorch not timed: {r['torch_not_timed']}.")
  if t and not t.get("error"):
    header.append(f"- PyTorch: {t['implementation']}"
                  + (f" `{t['module']}`" if t.get("module") else "") + ", "
                  + ("torch.compile" if t["torch_compile"] else "eager")
                  + f", {t['torch_threads']} threads"
                  + (f", attention '{t['attn_implementation']}'" if "attn_implementation" in t
                     else "")
                  + (f", attention processor {t['attention_processor']}"
                     if "attention_processor" in t else "")
                  + (f"; weights {t['weights']}, its predictions (float32, before timing) "
                     f"within {t['max_abs_difference']:.2g} of vitjax's, which reach "
                     f"{t['max_abs_prediction']:.2g}" if "max_abs_difference" in t else "")
                  + ".")
  memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f}"
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  cells = [r["model"], r["mode"], str(r["batch"]), r["dtype"], _fmt(r["images_per_s"]),
           _fmt(r["ms_per_step"]), _fmt(r["tflops"]), mfu, memory,
           (t.get("implementation") or "none") if t else "none",
           _fmt(t.get("images_per_s")) if t else "-",
           f"{r['ratio']:.2f}x" if r.get("ratio") else "-"]
  return header + _table_lines(_MARKDOWN_COLUMNS, cells, ("model", "mode", "dtype", "PyTorch"))


_TOKEN_MERGING_COLUMNS = ("model", "mode", "batch", "token merging", "plain img/s",
                          "merged img/s", "speedup", "plain GMACs", "merged GMACs", "GMACs ratio",
                          "tokens at last block")


def token_merging_markdown_lines(result):
  """`markdown_lines` of a `--token_merging` run: the plain and merged model side by side."""
  r, m = result, result["token_merging"]
  header = _header_lines(r) + [
      f"- {r['dtype']}, {r['image_size']}px; the plain and merged models share parameters. "
      + _alternation_text(r, "plain", "merged") + " and the speedup is the median "
      "of the per-round ratios of step times (plain / merged). GMACs: forward multiply-adds per "
      "image (`vitjax.tools.model_table.count_macs`; the merging's own matmuls included). "
      "Tokens at last block: out of the last block, prefix tokens included "
      f"({m['plain']['tokens_at_last_block']} without merging).",
  ] + _setup_notes(r)
  cells = [r["model"], r["mode"], str(r["batch"]), f"`{m['spec']}`",
           _fmt(m["plain"]["images_per_s"]), _fmt(m["merged"]["images_per_s"]),
           f"{m['speedup']:.2f}x", f"{m['plain']['gmacs']:.3g}", f"{m['merged']['gmacs']:.3g}",
           f"{m['gmacs_ratio']:.2f}x", str(m["tokens_at_last_block"])]
  return header + _table_lines(_TOKEN_MERGING_COLUMNS, cells,
                               ("model", "mode", "token merging"))


_MOE_COLUMNS = ("model", "mode", "batch", "experts", "MoE img/s", "dense img/s", "MoE / dense",
                "MoE GMACs", "dense GMACs", "GMACs ratio", "MoE params", "MoE active params",
                "dense params")


def moe_markdown_lines(result):
  """`markdown_lines` of an MoE model's run: the model and its dense counterpart side by side."""
  r, m = result, result["moe"]
  moe_side, dense = m["moe"], m["dense"]
  header = _header_lines(r) + [
      f"- {r['dtype']}, {r['image_size']}px; experts in blocks "
      f"{', '.join(map(str, m['moe_layers']))}. The dense counterpart is the same ViT with an "
      "MLP in place of each MoE layer, its parameters initialised on their own. "
      + _alternation_text(r, "MoE", "dense") + " and MoE / dense is the median of the "
      "per-round ratios of step times (dense / MoE)"
      + ("; the train step adds the MoE's auxiliary losses" if r["mode"] == "train" else "")
      + f". GMACs: forward multiply-adds per image at batch {r['batch']} "
      "(`vitjax.tools.model_table.count_macs`; an expert runs on every slot of its capacity, "
      "empty or not). Active params: those one token's forward pass uses.",
  ] + _setup_notes(r)
  cells = [r["model"], r["mode"], str(r["batch"]), m["description"],
           _fmt(moe_side["images_per_s"]), _fmt(dense["images_per_s"]),
           f"{m['speed_ratio']:.2f}x", f"{moe_side['gmacs']:.3g}", f"{dense['gmacs']:.3g}",
           f"{m['gmacs_ratio']:.2f}x", f"{moe_side['params']:,}",
           f"{moe_side['active_params']:,}", f"{dense['params']:,}"]
  return header + _table_lines(_MOE_COLUMNS, cells, ("model", "mode", "experts"))


# ------------------------------------------------------------------------------------ main


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m vitjax.tools.benchmark",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="vit_base_patch16_224",
                      help="any name of vitjax.list_models()")
  parser.add_argument("--variant", help="size and patch for a family name ('vit', 'deit', "
                      "'vmoe', 'soft_moe', ...), e.g. --model vit --variant mu/16 (a toy size)")
  parser.add_argument("--batch", type=int, help="default: 256, or 8 on a CPU")
  parser.add_argument("--mode", choices=("train", "infer"), default="train")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="compute dtype (parameters stay float32); default: bfloat16, or "
                      "float32 on a CPU")
  parser.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps after compiling (at least 1 is run)")
  parser.add_argument("--image_size", type=int, help="input resolution on both sides "
                      "(default: the model's own)")
  parser.add_argument("--attention_impl", help="vitjax.create_model(attention_impl=...)")
  parser.add_argument("--model_options", metavar="KEY=VALUE,...", help="more "
                      "vitjax.create_model options, on both sides, e.g. a toy DiT: --model dit "
                      "--variant S/2 --model_options width=32,depth=1,num_heads=2")
  parser.add_argument("--token_merging", metavar="SPEC", help="time the model without and with "
                      "vitjax.create_model(token_merging=...) on the same parameters, in place of "
                      "PyTorch; SPEC: key=value pairs, e.g. r=8, r=16,schedule=decreasing, "
                      "method=evit,keep_rate=0.7, method=topk,r=4, r=8,layers=(3,6,9)")
  parser.add_argument("--compare", choices=("auto", "none", "timm", "transformers", "diffusers"),
                      default="auto", help="the PyTorch model to time alongside; auto: for a DiT "
                      "diffusers' DiTTransformer2DModel, else timm if installed, else "
                      "transformers' ViT; none where nothing is installed (and for U-ViT)")
  parser.add_argument("--torch_compile", choices=("auto", "on", "off"), default="auto",
                      help="torch.compile the PyTorch model; auto: on a GPU only (compiling "
                      "takes minutes on a CPU)")
  parser.add_argument("--xla_defaults", action="store_true", help="on a CPU, compile the "
                      "vitjax step without vitjax.xla_options")
  parser.add_argument("--xla_options", metavar="KEY=VALUE,...", help="more XLA compile "
                      "options for the vitjax step, on top of vitjax's (or alone with "
                      "--xla_defaults), e.g. xla_cpu_experimental_ynn_fusion_type= "
                      "(an empty value) or xla_cpu_use_fusion_emitters=False")
  parser.add_argument("--peak_tflops", type=float, help="peak TFLOP/s for MFU (default: "
                      "from the device kind)")
  parser.add_argument("--markdown", action="store_true", help="a Markdown table for BENCHMARKS.md")
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
    parser.error("--steps and --batch must be at least 1, --warmup at least 0")
  return args


def main(argv=None):
  """Runs the benchmark, prints the results and returns them as a dict."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  extra_options = parse_xla_options(args.xla_options)
  # Before any device work: a wrong name fails in seconds.
  checked, token_merging = check_model(args)
  from vitjax.models import moe  # pylint: disable=import-outside-toplevel
  is_moe = isinstance(checked, moe.MoeVisionTransformer)
  # A side-by-side of two vitjax models takes PyTorch's place.
  paired = ("with --token_merging, which compares vitjax without and with merging"
            if token_merging is not None else
            f"for the mixture of experts {args.model!r}: PyTorch has no counterpart of it; it "
            "is timed beside its dense counterpart" if is_moe else None)
  diffusion = is_diffusion(checked)
  # A diffusion model other than a DiT (U-ViT): no PyTorch implementation to time it beside.
  unmatched = (f"no PyTorch implementation of {type(checked).__name__} ({args.model!r}) is "
               "installed; vitjax is timed alone" if diffusion and not is_dit(checked) else None)
  compare = "none" if paired or unmatched else resolve_compare(args.compare, checked)
  if paired and args.compare not in ("auto", "none"):
    print(f"note: --compare {args.compare} is skipped {paired}", file=sys.stderr, flush=True)
  if unmatched and args.compare != "none":
    print(f"note: PyTorch is not timed: {unmatched}", file=sys.stderr, flush=True)
  if compare != "none":
    # JAX would otherwise take 75% of the GPU's memory up front, leaving PyTorch too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from vitjax import xla_options  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  platform = device.platform
  on_cpu = platform == "cpu"
  batch = args.batch or (8 if on_cpu else 256)
  dtype_name = args.dtype or ("float32" if on_cpu else "bfloat16")

  from vitjax import models  # pylint: disable=import-outside-toplevel
  model = models.create_model(args.model, **model_overrides(args, jnp.dtype(dtype_name)))
  if compare == "diffusers":
    # diffusers' timestep frequencies (vitjax.convert.dit): the same function as its DiT's,
    # at the same cost.
    model = model.clone(freq_shift=1.0)
  # A diffusion model's weights, the same on both sides, none of them zero.
  params = random_weights(model) if diffusion else None
  inputs = step_inputs(model, batch, diffusion)
  image_shape = inputs["images"].shape[1:]

  options = None if args.xla_defaults else compiler_options(platform)
  if extra_options:
    check_xla_options(extra_options, platform)
    options = {**(options or {}), **extra_options}
  # Token merging adds no parameters: the plain and merged models run the same ones.
  if token_merging is not None:
    params = models.init_params(model)
  run_vitjax, compiled, model, options = build_vitjax(args, jnp.dtype(dtype_name), inputs,
                                                      options, params=params, model=model)
  runners = {"vitjax": run_vitjax}
  merged = None
  if token_merging is not None:
    figures = {"plain": forward_figures(model, params, image_shape)}
    if args.mode == "train":  # Each train step donates its parameters: the merged one a copy.
      params = jax.tree.map(jnp.copy, params)
    run_merged, merged_compiled, merged, _ = build_vitjax(
        args, jnp.dtype(dtype_name), inputs, options, token_merging=token_merging,
        params=params)
    figures["merged"] = forward_figures(merged, params, image_shape)
    runners["merged"] = run_merged
  if is_moe:  # Each model its own parameters: they differ in the MoE layers.
    dense = moe.dense_counterpart(model)
    run_dense, dense_compiled, _, _ = build_vitjax(args, jnp.dtype(dtype_name), inputs,
                                                   options, model=dense)
    runners["dense"] = run_dense
  torch_info = None
  if compare != "none":
    try:
      # The vitjax train step has not run yet: `params` are not donated before PyTorch
      # copies them.
      run_torch, torch_info = build_torch(compare, model, args, dtype_name, inputs, platform,
                                          params)
      run_torch()  # A first step here: torch.compile compiles (and may fail) on it.
      runners["torch"] = run_torch
    except Exception as error:  # pylint: disable=broad-except
      torch_info = {"implementation": compare, "error": f"{type(error).__name__}: {error}"}
      print(f"PyTorch side not run: {torch_info['error']}", flush=True)
  if platform == "gpu" and "torch" in runners:
    import torch  # pylint: disable=import-outside-toplevel
    torch.cuda.reset_peak_memory_stats()

  # At least one untimed step each: the first jitted call traces, torch.compile compiles.
  times, background = time_steps(runners, args.steps, max(args.warmup, 1))

  peak = args.peak_tflops or peak_tflops(device.device_kind, dtype_name)
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    memory, memory_source = stats["peak_bytes_in_use"], "device peak_bytes_in_use"
  else:
    memory = planned_bytes(compiled)
    memory_source = ("XLA memory analysis: arguments + outputs + temporaries of the step"
                     if memory is not None else None)
  result = {
      "model": args.model, "mode": args.mode, "batch": batch, "dtype": dtype_name,
      "image_size": image_shape[0], "attention_impl": args.attention_impl,
      "device": device.device_kind, "platform": platform, "num_devices_used": 1,
      "cpu_threads": cpu_threads() if on_cpu else None,
      "cpu_model": xla_options.cpu_model_name() if on_cpu else None,
      "steps": args.steps, "warmup": max(args.warmup, 1),
      **step_figures(times["vitjax"], batch, compiled, peak), "peak_tflops": peak,
      "peak_memory_bytes": memory, "peak_memory_source": memory_source,
      "background_cpu": background, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "compiler_options": options, "versions": _versions(compare),
      "date": datetime.date.today().isoformat(),
      "command": f"python -m vitjax.tools.benchmark {shlex.join(argv)}".rstrip(),
      "torch": torch_info, "torch_not_timed": unmatched, "ratio": None,
      "token_merging": None, "moe": None,
      "diffusion": {"in_channels": model.in_channels, "out_channels": model.out_channels,
                    "num_classes": model.num_classes, "num_timesteps": NUM_TIMESTEPS,
                    "loss": (DIFFUSION_LOSS.format(channels=model.in_channels)
                             if args.mode == "train" else None)} if diffusion else None,
  }
  flops = result["flops"]
  if merged is not None:
    result["token_merging"] = {
        "spec": args.token_merging, "options": token_merging,
        "plain": {**step_figures(times["vitjax"], batch), **figures["plain"]},
        "merged": {**step_figures(times["merged"], batch, merged_compiled, peak),
                   **figures["merged"]},
        "speedup": paired_ratio(times["vitjax"], times["merged"]),
        "gmacs_ratio": figures["merged"]["gmacs"] / figures["plain"]["gmacs"],
        "tokens_at_last_block": figures["merged"]["tokens_at_last_block"],
    }
  if is_moe:
    costs = {name: cost_figures(m, image_shape, batch)
             for name, m in (("moe", model), ("dense", dense))}
    result["moe"] = {
        "description": moe_description(model, args.mode), "moe_type": model.moe_type,
        "num_experts": model.num_experts,
        "moe_layers": list(moe.moe_layer_indices(model.moe_layers, model.depth)),
        "moe": {**step_figures(times["vitjax"], batch, compiled, peak), **costs["moe"]},
        "dense": {**step_figures(times["dense"], batch, dense_compiled, peak), **costs["dense"]},
        "speed_ratio": paired_ratio(times["dense"], times["vitjax"]),
        "gmacs_ratio": costs["moe"]["gmacs"] / costs["dense"]["gmacs"],
    }
  if "torch" in times:
    torch_s = statistics.median(times["torch"])
    torch_info.update({"images_per_s": batch / torch_s, "ms_per_step": torch_s * 1e3,
                       "step_times_s": times["torch"],
                       "tflops": flops / torch_s / 1e12 if flops else None})
    if platform == "gpu":
      import torch  # pylint: disable=import-outside-toplevel
      torch_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    result["ratio"] = paired_ratio(times["torch"], times["vitjax"])

  print("\n".join(markdown_lines(result) if args.markdown else summary_lines(result)), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
