"""setup.py's version bounds admit the versions the suite is run with, and bound every dependency."""

import ast
import pathlib
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


def requirements():
  """setup.py's INSTALL_REQUIRES and EXTRAS_REQUIRE, read without running setup()."""
  found = []
  for node in ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")).body:
    if isinstance(node, ast.Assign) and node.targets[0].id == "INSTALL_REQUIRES":
      found += ast.literal_eval(node.value)
    elif isinstance(node, ast.Assign) and node.targets[0].id == "EXTRAS_REQUIRE":
      found += [r for extra in ast.literal_eval(node.value).values() for r in extra]
  return [Requirement(r) for r in found]


def pinned():
  """{name: version} of constraints.txt, and of the Makefile's TORCH_SPEC (torch is not in it)."""
  pins = {}
  for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, version = line.split("==")
      pins[canonicalize_name(name)] = version
  torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
  pins["torch"] = torch[1]
  return pins


def test_bounds_admit_the_pinned_versions():
  pins = pinned()
  reqs = requirements()
  assert len(reqs) >= 15
  unpinned = [str(r) for r in reqs if canonicalize_name(r.name) not in pins]
  assert not unpinned, f"Requirements constraints.txt does not pin (never tested): {unpinned}"
  refused = [f"{r} refuses {pins[canonicalize_name(r.name)]}" for r in reqs
             if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
  assert not refused, "setup.py's bounds refuse what `make test` installs:\n  " + "\n  ".join(
      refused)


def test_every_requirement_has_lower_and_upper_bounds():
  for requirement in requirements():
    operators = {spec.operator for spec in requirement.specifier}
    assert ">=" in operators and "<" in operators, requirement


def test_jax_bounds():
  jax, = [r for r in requirements() if r.name == "jax"]
  assert not jax.specifier.contains("0.6.2")  # Pallas' CompilerParams came with JAX 0.7.0.
  assert jax.specifier.contains("0.7.0")
  assert jax.specifier.contains("0.11.0")  # What the GPU machine runs.
