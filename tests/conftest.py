"""Shared test setup: CPU only, quiet logs, one XLA compilation cache per test session.

Most of the suite's time is XLA compiling the same few tiny training steps, in
this process and in the command-line runs it starts. A persistent compilation
cache shared by the xdist workers and their subprocesses (through the
environment) compiles each once. It is a fresh directory per session, removed at
the end: a cached executable is the one XLA would compile, so results are the
same bit for bit, and nothing carries over between sessions.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# xdist gives all workers of one session the same run id; without xdist, a new one.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"{os.getpid()}"
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"vitjax-test-xla-cache-{_RUN_ID}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # The controller, after every worker.
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
