"""Checks a config before a run writes anything: bad values are `ConfigError`s (exit 2).

`validate(config, workdir)` is called first thing by `trainer.train`, before the
workdir is created or locked. Each error names the key, its value, what is
allowed and how to set it; nothing is written, so a fixed command can rerun at once.

In order, cheapest first:
  * the keys of sections vitjax knows all of (`config.ema`), and renamed keys;
  * `RULES`: one range per key (positive step counts, probabilities in [0, 1), names
    from the lists the code that uses them keeps); FlexiViT's `model.patch_sizes`
    against the training image size;
  * the workdir: a directory that exists or can be created, writable;
  * the mesh against the devices, and the batch sizes against the mesh;
  * `init` (and `teacher.init`) paths;
  * the model's options, by tracing its init (`jax.eval_shape`, nothing compiled or
    allocated), and `input.packing` against the model (NaViT only);
  * the dataset and its splits (digits, or a prepared TFDS dataset), `input.packing`'s
    values, `input.classes` against the dataset's labels, and `model.num_classes`
    against its classes (K with input.classes): fewer is an error (labels without a
    logit); more is allowed, as in transfer setups that keep a wider head;
  * freeze / lr_multipliers / layer_decay, and config.peft's trained names, against the
    model's parameter names.
"""

import difflib
import math
import numbers
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax

from vitjax import adapt
from vitjax import config as config_lib
from vitjax.convert import checkpoint as convert_checkpoint
from vitjax.data import augment
from vitjax.train import optim
from vitjax.train import sharding as sharding_lib
from vitjax.train import tasks
from vitjax.train import workdir as workdir_lib
from vitjax.train.tasks import base as tasks_base

ConfigError = config_lib.ConfigError

# vitjax.convert.load_weights' `head`, and vitjax.data.augment.random_erase's `mode`.
INIT_HEADS = convert_checkpoint.HEAD_OPTIONS
RANDOM_ERASING_MODES = augment.RANDOM_ERASING_MODES


class Rule(NamedTuple):
  """What a key may hold: a predicate and its description for the error message."""
  test: Callable[[Any], bool]
  allowed: str


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def integer(minimum=None):
  if minimum is None:
    return Rule(_is_int, "an integer")
  return Rule(lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}")


def number(low=None, high=None, *, low_open=False, high_open=False):
  """A finite number in the interval, e.g. number(0, 1, high_open=True) is [0, 1)."""

  def test(value):
    return (_is_number(value)
            and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))

  if high is None:
    allowed = f"a number {'>' if low_open else '>='} {low}"
  else:
    allowed = (f"a number in {'(' if low_open else '['}{low}, {high}"
               f"{')' if high_open else ']'}")
  return Rule(test, allowed)


def one_of(names):
  return Rule(lambda v: v in names, f"one of {', '.join(map(repr, names))}")


def or_none(rule, meaning):
  return Rule(lambda v: v is None or rule.test(v), f"{rule.allowed}, or None ({meaning})")


def pair(low, high):
  """(min, max) with low < min <= max <= high: crop scales and aspect ratios."""

  def test(value):
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(_is_number(v) for v in value)
            and low < value[0] <= value[1] <= (high if high is not None else math.inf))

  return Rule(test, f"(min, max) with {low} < min <= max"
              + (f" <= {high}" if high is not None else ""))


def _weights(value):
  return hasattr(value, "items") and all(
      isinstance(k, str) and _is_number(v) and v >= 0 for k, v in value.items())


def _positive_numbers(value):
  values = value if isinstance(value, (tuple, list)) else (value,)
  return bool(values) and all(_is_number(v) and v > 0 for v in values)


_PROBABILITY = number(0, 1)
_RATE = number(0, 1, high_open=True)  # Dropout-like: 1 would drop everything.
# Zero or negative rates do nothing, or train by gradient ascent. NaN is left to the
# divergence check, which stops the run at the first update naming the step (the tests
# inject divergence that way).
_POSITIVE = number(0, low_open=True)
_LEARNING_RATE = Rule(lambda v: _POSITIVE.test(v) or (isinstance(v, float) and math.isnan(v)),
                      _POSITIVE.allowed)

# key -> what it may hold, and a value for the example fix. Keys a config does
# not define are skipped; cross-key checks (divisibility, the dataset, the
# mesh) are the functions below.
RULES = (
    ("seed", integer(), 0),
    ("total_steps", integer(1), 1000),
    ("batch_size", integer(1), 128),
    ("eval_batch_size", integer(1), 256),
    ("grad_accum_steps", integer(1), 1),
    ("log_every", integer(1), 50),
    ("eval_every", or_none(integer(0), "0 or None: only at the end"), 500),
    ("checkpoint_every", or_none(integer(0), "0 or None: only at the end"), 500),
    ("keep_checkpoints", integer(1), 2),
    ("label_smoothing", _RATE, 0.1),
    ("init_head", one_of(INIT_HEADS), "reinit"),  # Absent: 'error'.
    ("optimizer.name", one_of(optim.OPTIMIZERS), optim.OPTIMIZERS[0]),
    ("optimizer.schedule", one_of(optim.SCHEDULES), optim.SCHEDULES[0]),
    ("optimizer.learning_rate", _LEARNING_RATE, 1e-3),
    ("optimizer.end_learning_rate", number(0), 0.0),
    ("optimizer.weight_decay", number(0), 0.05),
    # More warmup than total_steps is fine: the schedule clips it (short smoke runs).
    ("optimizer.warmup_steps", integer(0), 100),
    ("optimizer.grad_clip_norm", or_none(number(0), "no clipping"), 1.0),
    ("optimizer.b1", _RATE, 0.9),
    ("optimizer.b2", _RATE, 0.999),
    ("optimizer.momentum", or_none(_RATE, "no momentum"), 0.9),
    ("optimizer.layer_decay", or_none(number(0, 1, low_open=True), "off"), 0.75),
    ("optimizer.sam_rho", or_none(number(0), "0 or None: no SAM"), 0.05),
    ("ema.decay", or_none(number(0, 1, low_open=True, high_open=True), "no EMA"), 0.9998),
    ("ema.warmup", Rule(lambda v: isinstance(v, bool), "True or False"), True),
    ("ema.warmup_gamma", _POSITIVE, 1.0),
    ("ema.warmup_power", _POSITIVE, 0.75),
    ("aux_loss_weights", or_none(Rule(_weights, "a dict {name: weight >= 0}"), "all 1.0"),
     "\"{'load_balance':0.01}\""),
    ("model.num_classes", integer(0), 10),  # 0: no head (features only).
    ("model.image_size", integer(1), 224),
    ("model.dropout", _RATE, 0.0),
    ("model.attention_dropout", _RATE, 0.0),
    ("model.drop_path_rate", _RATE, 0.1),
    ("input.image_size", or_none(integer(1), "the dataset's own size"), 224),
    ("input.random_crop_padding", integer(0), 0),
    ("input.channels", one_of((1, 3)), 3),
    ("input.std", Rule(_positive_numbers, "numbers > 0 (one, or one per channel)"), 0.5),
    ("input.num_threads", or_none(integer(0), "automatic"), 8),
    ("input.inception_crop_scale", pair(0, 1), "(0.08,1.0)"),
    ("input.inception_crop_ratio", pair(0, None), "(0.75,1.3333)"),
    ("input.randaugment_ops", integer(0), 2),
    ("input.randaugment_magnitude", number(0), 9.0),
    ("input.randaugment_magnitude_std", number(0), 0.5),
    ("input.mixup_alpha", number(0), 0.8),
    ("input.cutmix_alpha", number(0), 1.0),
    ("input.mixup_prob", _PROBABILITY, 1.0),
    ("input.mixup_switch_prob", _PROBABILITY, 0.5),
    ("input.random_erasing_prob", _PROBABILITY, 0.25),
    ("input.random_erasing_mode", one_of(RANDOM_ERASING_MODES), "pixel"),
)

_MISSING = object()

# Sections whose keys vitjax knows all of: another key there is a typo, not an option.
SECTION_KEYS = {"ema": ("decay", "warmup", "warmup_gamma", "warmup_power")}
# Keys vitjax no longer reads -> the key to set instead.
RENAMED_KEYS = {"init_weights": "init"}


def validate(config, workdir, *, devices=None):
  """Raises `ConfigError` naming the bad value and the fix; writes nothing.

  Args:
    config: the run's config, as `trainer.train` gets it.
    workdir: the run's directory (need not exist yet).
    devices: the devices the mesh is made of; by default all of them (jax.devices()).
  """
  check_rules(config)
  check_patch_sizes(config)
  check_workdir(workdir)
  check_mesh_and_batch_sizes(config, jax.devices() if devices is None else devices)
  check_init(config)
  params = check_model(config)  # Before the dataset: packing takes the model's patch size.
  check_parameter_sharding(config, jax.devices() if devices is None else devices)
  check_dataset(config)
  check_parameter_patterns(config, params)


def lookup(config, dotted_key):
  """config['a']['b'] for 'a.b', or _MISSING where a part is absent."""
  node = config
  for part in dotted_key.split("."):
    if node is None or not hasattr(node, "get"):
      return _MISSING
    node = node.get(part, _MISSING)
    if node is _MISSING:
      return _MISSING
  return node


def check_rules(config):
  check_known_keys(config)
  for key, rule, example in RULES:
    value = lookup(config, key)
    if value is not _MISSING and not rule.test(value):
      value = value.to_dict() if hasattr(value, "to_dict") else value  # A ConfigDict.
      raise ConfigError(f"config.{key}={value!r}: must be {rule.allowed}. Set it in the "
                        f"config file or on the command line, e.g. --config.{key}={example}.")
  try:
    sharding_lib.logical_rules(config)  # Its message names config.sharding and the presets.
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    tasks.make_task(config)  # Unknown task names, and a task's own required keys.
  except ValueError as e:  # Their messages name the config keys.
    raise ConfigError(str(e)) from None


def check_patch_sizes(config):
  """FlexiViT's `model.patch_sizes`: positive ints, each a whole number of training patches."""
  sizes = lookup(config, "model.patch_sizes")
  if sizes is _MISSING or sizes is None:
    return
  image_size = lookup(config, "input.image_size")
  if image_size is _MISSING or image_size is None:
    image_size = lookup(config, "model.image_size")
  if (not isinstance(sizes, (tuple, list)) or not sizes
      or not all(_is_int(p) and p >= 1 for p in sizes)):
    raise ConfigError(f"config.model.patch_sizes={sizes!r}: must be a non-empty tuple of "
                      "positive ints (FlexiViT's training patch sizes, one drawn per step), "
                      "or None, e.g. --config.model.patch_sizes='(2,4,8)'.")
  if _is_int(image_size):
    bad = [p for p in sizes if image_size % p]
    if bad:
      fits = [p for p in range(1, image_size + 1) if image_size % p == 0]
      raise ConfigError(f"config.model.patch_sizes={tuple(sizes)!r}: {bad} do not divide the "
                        f"training images' side ({image_size} px), which must be a whole "
                        f"number of patches at every size. Sizes that fit: {fits}.")


def check_known_keys(config):
  """Keys of `SECTION_KEYS`' sections are known ones; `RENAMED_KEYS` are not set."""
  for old, new in RENAMED_KEYS.items():
    if lookup(config, old) is not _MISSING:
      raise ConfigError(f"config.{old} is not a vitjax key: set config.{new} instead.")
  for section, known in SECTION_KEYS.items():
    node = lookup(config, section)
    for key in (node if hasattr(node, "items") else ()):
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" Did you mean config.{section}.{close[0]}?" if close else ""
        raise ConfigError(f"config.{section}.{key} is not a key of config.{section} (its keys: "
                          f"{', '.join(known)}).{hint}")


def check_workdir(workdir):
  """A local directory that exists or can be made, writable; read-only checks.

  Remote workdirs (gs://...) are left to the first write: os.access cannot ask a bucket.
  """
  if not workdir_lib.is_local(workdir):
    return
  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir {workdir}: is an existing file, not a directory. Give a "
                      f"directory path (created if missing).")
  existing = path
  while not os.path.exists(existing):  # The deepest part that exists: it will hold the rest.
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"--workdir {workdir}: cannot be created, {existing} is a file. Give "
                      f"a path under a directory.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir}: {existing} is not writable by this user. Give "
                      f"a directory you can write to.")


def check_mesh_and_batch_sizes(config, devices):
  """config.mesh fits the devices; the batch sizes split evenly over the batch devices."""
  mesh_config = dict(config.get("mesh") or {"data": -1})
  for axis, size in mesh_config.items():
    if not (_is_int(size) and (size >= 1 or size == -1)):
      raise ConfigError(f"config.mesh.{axis}={size!r}: must be a positive integer, or -1 for "
                        f"all the devices the other axes leave, e.g. --config.mesh.{axis}=-1.")
  sizes = list(mesh_config.values())
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh={mesh_config}: at most one axis may be -1 (all the "
                      f"remaining devices); give the others sizes.")
  fixed = math.prod(s for s in sizes if s != -1)
  used = fixed * (len(devices) // fixed if -1 in sizes else 1)
  if not used or len(devices) % used:
    # The fix: a fixed axis that does not fit to 1 beside a -1, else the first axis to -1.
    axis = next((a for a, s in mesh_config.items() if s not in (1, -1)), next(iter(mesh_config)))
    fix = f"{axis}=1" if -1 in sizes else f"{axis}=-1"
    # On a CPU the device count is a flag, which a user testing a mesh may not know of.
    cpu_hint = (f" Or run on N CPU devices, N a multiple of {fixed}: "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=N (set before JAX starts)."
                if devices and devices[0].platform == "cpu" else "")
    raise ConfigError(
        f"config.mesh={mesh_config} does not divide the {len(devices)} devices: the axis "
        f"sizes must multiply to a divisor of {len(devices)} (-1 takes all the devices the "
        f"other axes leave). E.g. --config.mesh.{fix}.{cpu_hint}")
  try:
    mesh = sharding_lib.make_mesh(mesh_config, devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  split = sharding_lib.batch_devices(mesh)
  accum = config.get("grad_accum_steps", 1)
  why = f"the {split} devices the batch is split over (mesh {dict(mesh.shape)})"
  batch_size = config.batch_size
  if batch_size % (accum * split):
    multiple = accum * split
    raise ConfigError(
        f"config.batch_size={batch_size} must be divisible by grad_accum_steps={accum} x "
        f"{why}, i.e. by {multiple}: e.g. --config.batch_size="
        f"{max(multiple, batch_size // multiple * multiple)}.")
  eval_batch_size = config.get("eval_batch_size", batch_size)
  if eval_batch_size % split:
    raise ConfigError(
        f"config.eval_batch_size={eval_batch_size} must be divisible by {why}: e.g. "
        f"--config.eval_batch_size={-(-eval_batch_size // split) * split}.")


def check_init(config):
  """Weights to start from (`init`, `teacher.init`) exist: a file or a directory."""
  for key in ("init", "teacher.init"):
    value = lookup(config, key)
    if value is _MISSING or not value:
      continue
    # Two-tower models may take one path per tower: {'img': path, 'txt': path}.
    paths = dict(value) if hasattr(value, "items") else {None: value}
    for tower, path in paths.items():
      if not path or os.path.exists(os.path.expanduser(os.fspath(path))):
        continue
      name = f"config.{key}" + (f".{tower}" if tower else "")
      workdir, _, item = os.path.expanduser(os.fspath(path)).rpartition(":")
      if workdir and os.path.isdir(os.path.join(workdir, "checkpoints")):
        # 'WORKDIR:teacher': other weights of a run, named and present.
        from vitjax.convert import workdir_checkpoints  # pylint: disable=g-import-not-at-top
        try:
          workdir_checkpoints.check_item(workdir, item)
        except workdir_checkpoints.WorkdirCheckpointError as e:
          raise ConfigError(f"{name}={os.fspath(path)!r}: {e}") from None
        continue
      where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
      scratch = "" if key == "teacher.init" else f"; or {name}=None to start from scratch"
      raise ConfigError(
          f"{name}={os.fspath(path)!r} does not exist{where}. Give an .npz, .safetensors "
          f"or PyTorch file, a Hugging Face model directory, or the workdir of a vitjax "
          f"run (with checkpoints/){scratch}.")


def check_dataset(config):
  """The dataset and its splits exist (digits, or prepared TFDS); num_classes covers them.

  With input.classes, the kept labels exist in the dataset, each split keeps an
  image, and model.num_classes is checked against their number K.
  """
  name = config.get("dataset") or "digits"
  splits = {"train_split": config.get("train_split") or "train",
            "eval_split": config.get("eval_split") or "test"}
  from vitjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vitjax.data.pipeline import InputConfig  # pylint: disable=g-import-not-at-top
  try:
    input_config = InputConfig.from_config(config.get("input"))
  except ValueError as e:  # Its messages start with the key: 'input.crop_pct must be ...'.
    raise ConfigError(f"config.{e}") from None
  if input_config.packing:
    from vitjax.data.pipeline import packing_config  # pylint: disable=g-import-not-at-top
    try:
      packing_config(config)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{e}") from None
  class_ids = input_config.classes
  if name == "digits":
    from vitjax.data import digits  # pylint: disable=g-import-not-at-top
    for key, split in splits.items():
      try:
        _, labels = digits.load_digits(split)  # 8x8 images, in memory: cheap.
      except ValueError as e:
        raise ConfigError(f"config.{key}={split!r}: {e}") from None
      if class_ids is not None:
        try:
          pipeline.class_subset(labels, class_ids, digits.NUM_CLASSES, dataset=name,
                                split=split)
        except pipeline.ClassesError as e:
          raise ConfigError(f"config.{e}") from None
    num_classes = digits.NUM_CLASSES if class_ids is None else len(class_ids)
  elif name.startswith(("folder:", "wds:")):
    num_classes = _check_files(config, name)  # The pipeline's: K with input.classes.
  else:
    num_classes = _check_tfds(config, name, splits, input_config)
    try:
      pipeline.refuse_tfds_classes(name, class_ids)
    except pipeline.ClassesError as e:
      raise ConfigError(f"config.{e}") from None
  model_classes = lookup(config, "model.num_classes")
  # More outputs than classes trains (the extra logits learn to stay low), so it is allowed.
  if _is_int(model_classes) and 0 < model_classes < num_classes:
    has = (f"dataset {name!r} has {num_classes} classes" if class_ids is None else
           f"config.input.classes={tuple(class_ids)!r} keeps {num_classes} classes of "
           f"dataset {name!r}")
    raise ConfigError(
        f"config.model.num_classes={model_classes} but {has}: labels >= {model_classes} "
        f"would have no logit. Set --config.model.num_classes={num_classes}.")


def _check_files(config, name):
  """Opens an image folder or WebDataset shards as the pipeline will (listing and index only)."""
  from vitjax import data  # pylint: disable=g-import-not-at-top
  from vitjax.data import folder, sources, webdataset  # pylint: disable=g-import-not-at-top
  from vitjax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    return data.get_dataset(config).num_classes
  except pipeline.ClassesError as e:  # Its message starts with the key: 'input.classes=...'.
    raise ConfigError(f"config.{e}") from None
  except (folder.FolderError, sources.SplitError, webdataset.ShardError,
          data.BadImageError) as e:
    raise ConfigError(f"config.dataset={name!r}: {e}") from None


def _check_tfds(config, name, splits, input_config):
  """Opens each split as the pipeline will (metadata only, nothing decoded); its classes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vitjax.data import tfds as tfds_data  # pylint: disable=g-import-not-at-top
  data_dir = config.get("data_dir")
  for key, split in splits.items():
    try:
      source = tfds_data.TfdsSplit(name, split, data_dir=data_dir,
                                   image_size=input_config.image_size,
                                   image_key=input_config.image_key,
                                   label_key=input_config.label_key)
    except tfds_data.UnknownDatasetError as e:
      raise ConfigError(f"config.dataset={name!r}: {e}") from None
    except tfds_data.DatasetNotPreparedError as e:
      raise ConfigError(f"config.dataset={name!r} with config.data_dir={data_dir!r}: {e}"
                        ) from None
    except (KeyError, ValueError) as e:
      # The dataset is prepared (TfdsSplit checked that): the split, or a feature.
      known = tfds.builder(name, data_dir=data_dir).info.splits
      try:
        known[split]  # Names, slices ('train[:90%]') and sums ('train+test').
      except Exception:  # pylint: disable=broad-except
        raise ConfigError(
            f"config.{key}={split!r} is not a split of {name!r}. Its splits: "
            f"{', '.join(map(repr, known))}; slices such as 'train[:90%]' work too."
        ) from None
      if isinstance(e, KeyError):  # A feature it lacks; the message names input.*_key.
        raise ConfigError(str(e.args[0])) from None
      raise ConfigError(f"config.input.image_size=None: {e}") from None  # Mixed sizes.
  return source.num_classes


def check_model(config):
  """The model's parameter shapes; a model option it rejects is a `ConfigError`.

  Builds the model and traces its init with jax.eval_shape (nothing compiled or
  allocated), so options the model only checks when it runs (a variant, a pool
  type, an image size that is not a whole number of patches) stop the run here.
  """
  from vitjax import models  # pylint: disable=g-import-not-at-top
  try:
    model = tasks_base.build_model(config)
    shapes = models.param_shapes(model)
  except models.UnknownModelError:
    raise
  except ConfigError:
    raise
  except adapt.PeftConfigError as e:  # Its message names the config.peft key.
    raise ConfigError(str(e)) from None
  except (ValueError, models.UnknownOptionError) as e:  # Any other TypeError is a bug.
    raise ConfigError(f"config.model: {e}") from None
  input_config = config.get("input") or {}
  if input_config.get("packing") and not isinstance(model, models.navit.NaViT):
    raise ConfigError(
        f"config.input.packing makes packed sequences of images, which only NaViT models "
        f"take; config.model.name={config.model.name!r} takes images. Use a NaViT "
        "(name='navit', or siglip2_naflex_* / naflexvit_*), or set "
        "--config.input.packing=None.")
  return shapes


def check_parameter_sharding(config, devices):
  """Every parameter dimension the rules split over mesh axes is a multiple of their size.

  An MoE's experts over `expert`, or `embed` over `fsdp`: 8 experts do not split 3 ways,
  and the run would otherwise fail when the state is first placed on the devices.
  """
  from vitjax import models  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.make_mesh(dict(config.get("mesh") or {"data": -1}), devices)
  if mesh.size == 1:
    return
  rules = sharding_lib.logical_rules(config)
  boxed = models.param_shapes(tasks_base.build_model(config), boxed=True)
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_boxed):
    if not is_boxed(leaf):
      continue
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    for dim, (size, name, axes) in enumerate(zip(leaf.value.shape, leaf.names, spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError(
            f"config.mesh {dict(mesh.shape)} splits the {name!r} axis of parameter {where} "
            f"(size {size}, dimension {dim} of {leaf.value.shape}) {ways} ways over "
            f"{' x '.join(axes)}, and {ways} does not divide {size}: choose "
            f"config.mesh.{axes[-1]} among the divisors of {size} (or another "
            "config.sharding).")


def check_parameter_patterns(config, params):
  """freeze, lr_multipliers and layer_decay against the model's parameter names.

  The optimizer is built as the trainer builds it (optim.make_optimizer runs the
  same checks), on parameter shapes from jax.eval_shape: nothing is compiled or
  allocated. Skipped when none of the three is set, as nothing else needs the names.
  """
  opt = config.get("optimizer")
  peft = config.get("peft")
  if not opt or not (any(opt.get(key) for key in ("freeze", "lr_multipliers", "layer_decay"))
                     or (peft and adapt.enabled(peft))):
    return
  optim.make_optimizer(config, params)
