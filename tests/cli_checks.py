"""What a user must see when `python -m vitjax.train` is given a bad value, as one check.

A bad value exits with status 2 and a short message on stderr that says what to give: no
traceback, and the workdir is never created.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_train_rejects(config, override, workdir, *, starts_with="error:", contains="",
                         timeout=300):
  """Runs `python -m vitjax.train --config CONFIG --workdir WORKDIR --config.OVERRIDE` and
  checks that it rejects the value: exit status 2, a message of at most 3 lines that starts
  with `starts_with` and contains `contains`, no 'Traceback', and `workdir` not created.

  `config` is a path relative to the repository root (a `:arguments` suffix is allowed).
  Returns the stderr.
  """
  result = subprocess.run(
      [sys.executable, "-m", "vitjax.train", "--config", config, "--workdir", str(workdir),
       f"--config.{override}"],
      capture_output=True, text=True, cwd=ROOT, timeout=timeout)
  stderr = result.stderr
  assert result.returncode == 2, stderr
  assert stderr.startswith(starts_with), stderr
  assert contains in stderr, stderr
  assert "Traceback" not in stderr, stderr
  assert len(stderr.strip().splitlines()) <= 3, stderr
  assert not os.path.exists(workdir), f"{workdir} was created"
  return stderr
