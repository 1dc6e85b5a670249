"""Shared test setup: CPU only, quiet logs, one XLA compilation cache per test session.

Most of the suite's time is XLA compiling the same few tiny training steps, in
this process and in the command-line runs it starts. A persistent compilation
cache shared by the xdist workers and their subprocesses (through the
environment) compiles each once. It is a fresh directory per session, removed at
the end: a cached executable is the one XLA would compile, so results are the
same bit for bit, and nothing carries over between sessions.

Most of what is left of compiling is XLA's backend (LLVM) optimizing code that then
runs a few times on tiny arrays. Tests compile without it (JAX_DISABLE_MOST_OPTIMIZATIONS,
which the command-line runs they start inherit): the same operations, in code that is
less optimized, so float results may differ in the last bits, as between XLA releases.
It took a third off the suite's CPU time. Tests that run long (the notebooks train for
hundreds of steps) run faster optimized: OPTIMIZED lists their modules.
JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs everything optimized.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
OPTIMIZED = ("test_notebooks.py",)

# xdist gives all workers of one session the same run id; without xdist, a new one.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"{os.getpid()}"
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"vitjax-test-xla-cache-{_RUN_ID}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
  """XLA's optimizations back on for the tests of the OPTIMIZED modules."""
  if request.node.path.name not in OPTIMIZED:
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # The controller, after every worker.
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
