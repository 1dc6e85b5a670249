"""CPU compiler options: used where this XLA knows them, dropped where it does not."""

import jax
import jax.numpy as jnp

from vitjax import xla_options


def test_options_on_cpu_are_all_or_none_and_compile():
  # jax 0.10 knows them; a later XLA that renames them gets none rather than an error.
  options = xla_options.compiler_options("cpu")
  assert options in (xla_options.CPU_COMPILER_OPTIONS, None)
  assert float(jax.jit(lambda x: x * 2, compiler_options=options)(jnp.ones(()))) == 2.0


def test_options_this_xla_rejects_are_dropped(monkeypatch):
  monkeypatch.setattr(xla_options, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
  assert xla_options.compiler_options("cpu") is None


def test_no_options_off_the_cpu():
  assert xla_options.compiler_options("gpu") is None
