"""Export a parameter-efficient fine-tuning run (config.peft): adapter, merged weights, peft.

    python -m vitjax.tools.adapt WORKDIR --adapter lora.safetensors
    python -m vitjax.tools.adapt WORKDIR --merged merged.npz
    python -m vitjax.tools.adapt WORKDIR --peft lora_peft/

Reads the workdir's config and its latest readable checkpoint, rebuilds the adapted model
as the trainer does, and writes one of:

  --adapter FILE.safetensors  the adapter parameters and those config.peft.train names
                              (vitjax.adapt.save_adapter; vitjax.adapt.load_adapter reads it)
  --merged FILE.npz           LoRA folded into the kernels: the base model's parameters
                              (vitjax.save_weights), which `vitjax.load_weights` reads
                              into the plain model; prompts and AdaptFormer adapters have
                              no merged form
  --peft DIR                  a `peft` library LoRA adapter for the transformers twin of
                              the model (vitjax.adapt.peft.export_peft), for the installed
                              transformers' module names; load with
                              peft.PeftModel.from_pretrained(hf_model, DIR)

Exit status: 0 written; 2 bad input (no workdir, config or checkpoint, a config.peft without
adapters, none or several outputs, an output that exists or whose directory does not, what
the format cannot hold), one line on stderr, nothing written.
"""

import argparse
import os
import sys

MERGED_SUFFIX = ".npz"
ADAPTER_SUFFIX = ".safetensors"


class AdaptError(ValueError):
  """Input this tool cannot use; exit 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):  # One line, not argparse's usage block.
    raise AdaptError(message)


def parse_args(argv):
  parser = _Parser(prog="python -m vitjax.tools.adapt", description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="a vitjax training workdir trained with config.peft")
  outputs = parser.add_mutually_exclusive_group(required=True)
  outputs.add_argument("--adapter", help="the adapter's parameters, a .safetensors file")
  outputs.add_argument("--merged", help="the base model's parameters with LoRA merged, a .npz")
  outputs.add_argument("--peft", help="a peft LoRA adapter directory for transformers")
  return parser.parse_args(argv)


def main(argv=None):
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return _run(args)
  except AdaptError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


def read_config(workdir):
  """The workdir's saved config as a ConfigDict; AdaptError without one."""
  from vitjax.train import resume  # pylint: disable=g-import-not-at-top
  from vitjax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise AdaptError(f"{workdir}: no such directory (a vitjax training workdir is needed).")
  saved = resume.read_saved_config(workdir_lib.as_path(workdir))
  if saved is None:
    raise AdaptError(f"{workdir}: no readable {resume.CONFIG_NAME}; is it a vitjax training "
                     "workdir?")
  return resume.as_config(saved)


def build_model(config, workdir):
  """The adapted model the run trained (its task's build_model: config.model + config.peft)."""
  from vitjax import adapt  # pylint: disable=g-import-not-at-top
  from vitjax.train import tasks  # pylint: disable=g-import-not-at-top
  peft = config.get("peft")
  try:
    has_adapters = bool(peft) and adapt.has_adapters(peft)
  except ValueError as e:
    raise AdaptError(f"{workdir}: {e}") from None
  if not has_adapters:
    raise AdaptError(f"{workdir}: its config.peft has no adapters (lora.rank, "
                     "prompts.num_tokens and adapter.dim are 0); its weights are the full "
                     "model's: vitjax.load_weights(model, WORKDIR) reads them.")
  try:
    model = tasks.make_task(config).build_model()
  except (TypeError, ValueError) as e:
    raise AdaptError(f"{workdir}: its config.model cannot be built: "
                     f"{str(e).splitlines()[0]}") from None
  return adapt.adapted(model, peft) if adapt.base_model(model) is model else model


def read_params(workdir):
  """(step, params) of the workdir's latest readable checkpoint."""
  from vitjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    return checkpoints.load_params_and_step(workdir)
  except checkpoints.CheckpointError as e:
    raise AdaptError(f"{workdir}: {str(e).splitlines()[0]}") from None


def _check_output(path, suffix=None):
  if suffix and not path.endswith(suffix):
    raise AdaptError(f"{path}: this output is written as a {suffix} file; name it '*{suffix}'.")
  if os.path.lexists(path):
    raise AdaptError(f"{path} already exists; give a new name (nothing is overwritten).")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise AdaptError(f"{path}: no directory {parent}; create it first.")


def _run(args):
  if args.adapter is not None:
    _check_output(args.adapter, ADAPTER_SUFFIX)
  elif args.merged is not None:
    _check_output(args.merged, MERGED_SUFFIX)
  else:
    _check_output(args.peft)
  config = read_config(args.workdir)
  model = build_model(config, args.workdir)

  from vitjax import adapt  # pylint: disable=g-import-not-at-top
  peft = adapt.normalize(config.peft)
  if args.merged is not None and (peft.prompts.num_tokens or peft.adapter.dim):
    raise AdaptError("--merged: only LoRA merges into the base weights; visual prompts and "
                     "AdaptFormer adapters add tokens / a branch the base model does not have. "
                     "Use --adapter.")
  step, params = read_params(args.workdir)
  model_name = config.model.get("name")
  try:
    _check_params(model, params)
    if args.adapter is not None:
      adapt.save_adapter(args.adapter, params, peft, model_name=model_name)
      what, path = "the adapter", args.adapter
    elif args.merged is not None:
      from vitjax import convert  # pylint: disable=g-import-not-at-top
      convert.save_weights(adapt.merge(params, peft), args.merged)
      what, path = f"the merged weights of {model_name}", args.merged
    else:
      from vitjax.adapt import peft as peft_format  # pylint: disable=g-import-not-at-top
      written = peft_format.export_peft(args.peft, params, peft, model)
      what = (f"a peft LoRA adapter (r={written['r']}, lora_alpha={written['lora_alpha']}, "
              f"target_modules={written['target_modules']})")
      path = args.peft
  except ValueError as e:
    raise AdaptError(f"{args.workdir}: {str(e).splitlines()[0]}") from None
  print(f"{path}: {what}, from {args.workdir} step {step}")
  return 0


def _check_params(model, params):
  """AdaptError unless `params` have the adapted model's names and shapes."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from vitjax.models import param_shapes  # pylint: disable=g-import-not-at-top
  shapes = lambda tree: {name: tuple(x.shape) for name, x in
                         traverse_util.flatten_dict(dict(tree), sep="/").items()}
  if shapes(params) != shapes(param_shapes(model)):
    raise AdaptError("the checkpoint's parameters are not those of the model its config "
                     "builds (config.peft changed after training?).")


if __name__ == "__main__":
  sys.exit(main())
