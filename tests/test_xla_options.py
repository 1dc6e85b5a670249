"""CPU compiler options: used where this XLA knows them, dropped where it does not, left to
the user where XLA_FLAGS sets them; the CPU's model name."""

import os
import subprocess
import sys

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


def test_xla_flag_names_are_the_options_xla_flags_sets():
  assert xla_options.xla_flag_names("") == set()
  assert xla_options.xla_flag_names(
      "--xla_cpu_experimental_ynn_fusion_type= --xla_force_host_platform_device_count=4 "
      "--xla_cpu_enable_fast_math") == {"xla_cpu_experimental_ynn_fusion_type",
                                        "xla_force_host_platform_device_count",
                                        "xla_cpu_enable_fast_math"}
  assert xla_options.xla_flag_names("--xla_dump_to='/tmp/a b' stray") == {"xla_dump_to"}


def test_an_option_xla_flags_sets_is_left_to_the_user(monkeypatch):
  name = next(iter(xla_options.CPU_COMPILER_OPTIONS))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  # jax 0.10 knows the option: without the user's flag it is there.
  assert name in (xla_options.compiler_options("cpu") or {})
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 --{name}=x")
  assert name not in (xla_options.compiler_options("cpu") or {})


def test_rejection_says_why():
  assert xla_options.rejection("cpu", dict(xla_options.CPU_COMPILER_OPTIONS)) is None
  assert "xla_cpu_no_such_option" in xla_options.rejection("cpu", {"xla_cpu_no_such_option": 1})


# A matmul, compiled as the trainer compiles its step, under the user's XLA_FLAGS: with
# YNNPACK asked for there, XLA's YNNPACK fusion is in the executable (vitjax's option would
# have taken it out, as a per-jit option overrides XLA_FLAGS).
_USER_FLAG_SCRIPT = """
import jax, jax.numpy as jnp
from vitjax import xla_options
a = jnp.ones((64, 32))
options = xla_options.compiler_options()
text = jax.jit(lambda a: a @ a.T, compiler_options=options).lower(a).compile().as_text()
print(options, "ynn" in text)
"""


def test_the_users_xla_flags_reach_the_compiled_step():
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type="
             "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _USER_FLAG_SCRIPT], env=env, text=True,
                          capture_output=True, timeout=120, check=True)
  assert result.stdout.split()[-2:] == ["None", "True"], result.stdout


def test_the_cpu_model_name_is_lscpus():
  amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t: fpu\n"
  intel = ("processor : 0\nmodel name : Intel(R) Xeon(R)   Platinum 8375C CPU @ 2.90GHz\n"
           "processor : 1\nmodel name : something else\n")
  assert xla_options.model_name_of(amd) == "AMD EPYC"
  assert xla_options.model_name_of(intel) == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
  assert xla_options.model_name_of("processor : 0\n") == ""
  assert isinstance(xla_options.cpu_model_name(), str) and xla_options.cpu_model_name()
