"""`python -m vitjax.train`: bad input exits 2 in one line; a bug in a model, 1 and a traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quickstart config with a model chosen by the argument: 'typo' misspells an option of
# the ViT; 'bug_in_call' and 'bug_in_init' register a ViT whose own code raises a TypeError
# when it runs or when it is built.
CONFIG = '''
import importlib.util

from vitjax import models

spec = importlib.util.spec_from_file_location("quickstart", {quickstart!r})
quickstart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quickstart)
ViT = type(models.create_model("vit", variant="mu/4"))


def tokens_of(shape):
  return len(shape[0])  # The bug: an int has no len(), a TypeError.


class BugInCall(ViT):
  def __call__(self, images, *args, **kwargs):
    tokens_of(images.shape)
    return super().__call__(images, *args, **kwargs)


class BugInInit(ViT):
  def __post_init__(self):
    tokens_of((2, 3))
    super().__post_init__()


def get_config(arg):
  config = quickstart.get_config("steps=2")
  options = dict(config.model)
  if arg == "typo":
    options["pool_typ"] = options.pop("pool_type")
  else:
    module = BugInCall if arg == "bug_in_call" else BugInInit
    variant = models.create_model("vit", variant=options.pop("variant"))
    sizes = {{name: getattr(variant, name) for name in variant.__dataclass_fields__
              if name not in ("parent", "name")}}
    name = "vitjax_test_" + arg
    if name not in models.list_models():
      models.register(name, module, **sizes)
    options["name"] = name
  config.model = options
  return config
'''


def run_cli(tmp_path, arg):
  config = tmp_path / "config.py"
  config.write_text(CONFIG.format(quickstart=os.path.join(ROOT, "configs", "quickstart.py")))
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "vitjax.train", "--config", f"{config}:{arg}",
       "--workdir", str(workdir)],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  return result, workdir


def test_misspelt_model_option_exits_2_in_one_line(tmp_path):
  result, workdir = run_cli(tmp_path, "typo")
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: config.model: Unknown option(s) for model 'vit': "
                                  "'pool_typ' (did you mean 'pool_type'"), result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("where", ["bug_in_call", "bug_in_init"])
def test_type_error_inside_a_model_is_a_traceback_and_exit_1(tmp_path, where):
  """A TypeError from the model's own code is a bug to report, not bad input."""
  result, _ = run_cli(tmp_path, where)
  assert result.returncode == 1, result.stderr
  assert "Traceback" in result.stderr
  assert "in tokens_of" in result.stderr  # Down to the line of the bug.
  assert "TypeError: object of type 'int' has no len()" in result.stderr
  assert not result.stderr.startswith("error:"), result.stderr
