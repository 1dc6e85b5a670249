"""A run you can trust: one run per workdir, prompt exits with one message, safe reruns.

The command-line cases run `python -m vitjax.train` in a subprocess, since the exit
code, the time to exit (orbax's threads can hold a process at exit) and the length
of stderr are what a user sees. The README's fault table points here.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vitjax import config as config_lib
from vitjax import train as train_lib
from vitjax.train import checkpoints as checkpoints_lib
from vitjax.train import metrics as metrics_lib
from vitjax.train import resume as resume_lib
from vitjax.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
# The quickstart at 8 px with test_train's one-block model of width 16: what these checks
# need does not depend on the model's size, and the mu/4 took twice the CPU time. The model's
# size is not a key of the quickstart, so the command line reads it from a config file
# (`command`); the rest is overrides, as a user would type them.
TINY_MODEL = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
TINY_CONFIG = f"""from vitjax import config as config_lib


def get_config():
  config = config_lib.load_config({QUICKSTART + ":image_size=8"!r})
  with config.unlocked():
    config.model.update({TINY_MODEL!r})
  return config
"""
TINY = ["--no_progress", "--config.batch_size=16", "--config.eval_batch_size=120",
        "--config.log_every=1", "--config.eval_every=0", "--config.optimizer.warmup_steps=2"]


def tiny_config(*overrides):
  config = config_lib.load_config(QUICKSTART + ":image_size=8")
  with config.unlocked():
    config.model.update(TINY_MODEL)
  config_lib.apply_overrides(config, [o[len("--config."):] for o in TINY
                                      if o.startswith("--config.")] + list(overrides))
  return config


def command(workdir, *overrides):
  """`python -m vitjax.train` of the tiny config (written beside the workdir) in `workdir`."""
  config_file = workdir.parent / "tiny_config.py"
  config_file.write_text(TINY_CONFIG)
  return [sys.executable, "-m", "vitjax.train", "--config", str(config_file), *TINY,
          "--workdir", str(workdir), *overrides]


def cli(workdir, *overrides, timeout=240, **kwargs):
  """Runs the command line; returns (returncode, stdout, stderr, seconds)."""
  start = time.monotonic()
  result = subprocess.run(
      command(workdir, *overrides), capture_output=True, text=True, cwd=ROOT, timeout=timeout,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), **kwargs)
  return result.returncode, result.stdout, result.stderr, time.monotonic() - start


def listing(directory):
  """{relative path: (size, mtime)} of every file under `directory`."""
  return {os.path.relpath(os.path.join(folder, name), directory):
          (os.path.getsize(os.path.join(folder, name)),
           os.path.getmtime(os.path.join(folder, name)))
          for folder, _, names in os.walk(directory) for name in names}


# One run per workdir.


def test_a_workdir_held_by_a_live_run_stops_a_second_run_at_once(tmp_path):
  workdir = tmp_path / "run"
  lock = workdir_lib.acquire(workdir)  # This test process plays the first run.
  before = listing(workdir)
  code, stdout, stderr, seconds = cli(workdir, "--config.total_steps=4")
  assert code == 2, stderr
  assert stderr.startswith(f"error: The workdir {workdir} is in use by another run (pid "
                           f"{os.getpid()} on host ")
  assert "use another --workdir" in stderr and "Traceback" not in stderr
  assert len(stderr.strip().splitlines()) == 1 and not stdout
  assert seconds < 30  # Before JAX is imported (about 1 s on an idle machine).
  assert listing(workdir) == before  # Nothing written, the holder's lock untouched.
  workdir_lib.release(lock)
  assert not lock.exists()


_HOLD = """
import sys, time
from vitjax.train import workdir
try:
  workdir.acquire(sys.argv[1])
except workdir.WorkdirLockedError:
  print("locked")
  sys.exit(2)
print("acquired", flush=True)
time.sleep(3)
"""


def test_two_runs_started_together_get_the_lock_once(tmp_path):
  processes = [subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run")],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
               for _ in range(4)]
  outputs = sorted(p.communicate(timeout=60)[0].strip() for p in processes)
  assert outputs == ["acquired", "locked", "locked", "locked"]


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(
      {"host": os.uname().nodename, "pid": dead.pid, "started": "earlier"}))
  lock = workdir_lib.acquire(workdir)
  assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert f"took over the lock of a run that is no longer running (pid {dead.pid}" in (
      capsys.readouterr().err)
  # On another host the holder cannot be checked: it is never taken over.
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
  with pytest.raises(workdir_lib.WorkdirLockedError, match="on host 'elsewhere'.*delete"):
    workdir_lib.acquire(workdir)


# Prompt exits with one clear message.


@pytest.fixture
def immutable():
  """`chattr +i` on a directory: no new entries, even for root (CI runs as root)."""
  made = []

  def make(path):
    subprocess.run(["chattr", "+i", str(path)], check=True)
    made.append(path)
  yield make
  for path in made:
    subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_checkpoint_that_cannot_be_written_exits_1_within_seconds(tmp_path, immutable):
  workdir = tmp_path / "run"
  train_lib.train(tiny_config("total_steps=2", "checkpoint_every=2"), str(workdir),
                  progress=False)
  saved = checkpoints_lib.load_params(str(workdir))
  immutable(workdir / "checkpoints")
  code, _, stderr, seconds = cli(workdir, "--config.total_steps=6",
                                 "--config.checkpoint_every=2")
  assert code == 1, stderr
  # Before this was fixed: orbax's threads held the process 5 minutes after the error.
  assert seconds < 60
  assert stderr.count("\n") == 1 and "Traceback" not in stderr
  assert stderr.startswith(f"error: Writing the checkpoint of step 4 to "
                           f"{workdir / 'checkpoints'} failed: PermissionError")
  assert "the last complete checkpoint, step 2, is intact" in stderr
  assert not (workdir / workdir_lib.LOCK_NAME).exists()  # Released on the way out.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         checkpoints_lib.load_params(str(workdir)), saved)


def test_resuming_with_another_model_names_the_keys_and_the_ways_out(tmp_path):
  workdir = tmp_path / "run"
  train_lib.train(tiny_config("total_steps=2"), str(workdir), progress=False)
  before = listing(workdir)
  code, stdout, stderr, _ = cli(workdir, "--config.total_steps=2", "--config.model.variant=Ti/4",
                                "--config.model.image_size=16", "--config.input.image_size=16")
  assert code == 2, stderr
  assert stderr.splitlines() == [
      f"error: The workdir {workdir} holds a run of another model or input (checkpoint of "
      "step 2); these keys differ from its config.json:",
      "  input.image_size: 8 in the workdir's run, 16 now",
      "  model.image_size: 8 in the workdir's run, 16 now",
      "  model.variant: 'mu/4' in the workdir's run, 'Ti/4' now",
      f"Use another --workdir for the new run, or start the new run from that run's weights "
      f"with --workdir NEW --config.init={workdir}."]
  assert not stdout
  assert listing(workdir) == before


def test_without_a_config_json_the_mismatch_lists_parameter_names_and_shapes(tmp_path):
  workdir = tmp_path / "run"
  train_lib.train(tiny_config("total_steps=2"), str(workdir), progress=False)
  (workdir / "config.json").unlink()  # E.g. a workdir copied without it.
  with pytest.raises(checkpoints_lib.CheckpointMismatchError) as error:
    train_lib.train(tiny_config("total_steps=2", "model.variant=mu/2"), str(workdir),
                    progress=False)
  message = str(error.value)
  assert message.startswith(f"The checkpoint of step 2 in {workdir / 'checkpoints'} does not "
                            "fit the model.\nShapes differ (2):\n")
  assert message.splitlines()[2:] == [
      "  embedding/kernel: checkpoint (4, 4, 3, 16), model (2, 2, 3, 16)",
      "  pos_embedding: checkpoint (1, 4, 16), model (1, 16, 16)",
      "The workdir holds another model's run: use another --workdir, or start a new run from "
      f"its weights with --workdir NEW --config.init={workdir}."]


def test_ctrl_c_prints_the_step_and_the_last_checkpoint_and_exits_130(tmp_path):
  workdir = tmp_path / "run"
  process = subprocess.Popen(
      command(workdir, "--config.total_steps=100000", "--config.checkpoint_every=5"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.monotonic() + 180
  while not (workdir / "checkpoints" / "5").is_dir() and time.monotonic() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 130, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  match = re.fullmatch(r"Interrupted at step (\d+); the last checkpoint is step (\d+)\. "
                       r"Rerun the same command to resume\.", lines[0])
  assert match, lines[0]
  step, saved = int(match[1]), int(match[2])
  assert saved % 5 == 0 and 5 <= saved <= step
  assert (workdir / "checkpoints" / str(saved)).is_dir()
  assert not (workdir / workdir_lib.LOCK_NAME).exists()


# Rerun semantics.


def test_rerunning_a_complete_run_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  first = train_lib.train(tiny_config("total_steps=2", "eval_every=2"), str(workdir),
                          progress=False)
  capsys.readouterr()
  before = listing(workdir)
  again = train_lib.train(tiny_config("total_steps=2", "eval_every=2"), str(workdir),
                          progress=False)
  assert listing(workdir) == before  # No eval row, no second TensorBoard file.
  assert again["complete"] and again["eval/top1"] == first["eval/top1"]
  assert again["checkpoint"] == first["checkpoint"]
  assert (f"The run in {workdir} is complete (step 2 of config.total_steps=2; final eval top1: "
          f"{first['eval/top1']:.4f}") in capsys.readouterr().out


def test_resuming_with_another_schedule_says_how_the_learning_rate_moved(tmp_path, capsys):
  workdir = tmp_path / "run"
  train_lib.train(tiny_config("total_steps=4", "checkpoint_every=2"), str(workdir),
                  progress=False)
  capsys.readouterr()
  config = tiny_config("total_steps=8", "checkpoint_every=2", "optimizer.learning_rate=1e-3")
  train_lib.train(config, str(workdir), progress=False)
  out = capsys.readouterr().out
  old = train_lib.train.__globals__["optim"].make_schedule(tiny_config("total_steps=4"))(4)
  new = train_lib.train.__globals__["optim"].make_schedule(config)(4)
  assert f"NOTE: resuming {workdir} at step 4 with a changed config" in out
  assert "  optimizer.learning_rate: 0.002 -> 0.001\n  total_steps: 4 -> 8\n" in out
  assert (f"at step 4 the rate was {float(old):.4g}, it is now {float(new):.4g}." in out)
  rows = [json.loads(line) for line in (workdir / "resumes.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 4 and rows[0]["changed"] == {
      "optimizer.learning_rate": [0.002, 0.001], "total_steps": [4, 8]}
  np.testing.assert_allclose(rows[0]["learning_rate"], [old, new], rtol=1e-6)
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 8


def test_a_truncated_checkpoint_is_one_warning_line(tmp_path):
  workdir = tmp_path / "run"
  train_lib.train(tiny_config("total_steps=4", "checkpoint_every=2", "keep_checkpoints=3"),
                  str(workdir), progress=False)
  latest = workdir / "checkpoints" / "4"
  for folder, _, names in os.walk(latest / "state"):
    for name in names:
      if os.path.basename(folder) == "d":
        os.truncate(os.path.join(folder, name), os.path.getsize(os.path.join(folder, name)) // 2)
  code, stdout, stderr, _ = cli(workdir, "--config.total_steps=4")
  assert code == 0, stderr
  assert stderr.count("\n") == 1, stderr
  assert stderr.startswith(f"WARNING: the checkpoint of step 4 cannot be read ({latest}/state/")
  assert stderr.rstrip().endswith(
      f"moved it to {workdir / 'checkpoints_unreadable' / '4'} and resumed from step 2.")
  assert "Resuming from the checkpoint at step 2" in stdout
  assert (workdir / "checkpoints_unreadable" / "4" / "state").is_dir()  # Kept, not deleted.
  # The rows the first run logged after step 2 were replaced by the rerun's.
  rows = metrics_lib.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]


# Storage: nothing calls os.path on a `gs://` workdir.


def test_a_gs_workdir_never_reaches_os_path(tmp_path, monkeypatch):
  """`gs://bucket/run` is served from a local folder through etils' mock backend; any
  os.path call on a `gs://` string fails the test (os.path.abspath would make it
  `./gs:/bucket/run`)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from vitjax.train import validation  # pylint: disable=g-import-not-at-top
  local = str(tmp_path / "bucket")
  os.makedirs(local)

  def real(path):
    path = os.fspath(path)
    return local + path[len("gs://bucket"):] if path.startswith("gs://bucket") else path

  package = os.path.join(ROOT, "vitjax") + os.sep

  def guard(function):
    def guarded(*args, **kwargs):
      # Only vitjax's own calls: etils joins the parts of a gs:// path with posixpath.
      caller = sys._getframe(1).f_code.co_filename  # pylint: disable=protected-access
      if caller.startswith(package) and any(isinstance(a, str) and "://" in a for a in args):
        raise AssertionError(f"vitjax called os.path.{function.__name__}{args}")
      return function(*args, **kwargs)
    return guarded
  for name in ("abspath", "join", "exists", "isdir", "isfile", "expanduser", "dirname",
               "basename", "realpath", "getsize"):
    monkeypatch.setattr(os.path, name, guard(getattr(os.path, name)))
  mocks = {name: (lambda name: lambda original, path, *a, **k: original(real(path), *a, **k))(
      name) for name in ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove",
                         "rmtree", "stat", "glob", "walk")}
  mocks["rename"] = lambda original, src, dst, *a, **k: original(real(src), real(dst), *a, **k)
  mocks["replace"] = mocks["rename"]

  class NoTensorBoard:
    def __init__(self, logdir):
      assert logdir == "gs://bucket/run/tensorboard"

    def add_scalar(self, *args):
      pass

    def close(self):
      pass
  monkeypatch.setattr(metrics_lib, "_summary_writer_class", lambda: NoTensorBoard)

  with epath.testing.mock_epath(**mocks):
    workdir = workdir_lib.as_path("gs://bucket/run")
    config = tiny_config("total_steps=4")
    validation.validate(config, "gs://bucket/run")
    lock = workdir_lib.acquire("gs://bucket/run")
    assert os.fspath(lock) == "gs://bucket/run/run.lock"
    with pytest.raises(workdir_lib.WorkdirLockedError):
      workdir_lib.check_free("gs://bucket/run")
    writer = metrics_lib.MetricsWriter(workdir)
    for step in (1, 2, 3):
      writer.write(step, {"train/loss": 1.0 / step})
    writer.truncate_after(2)
    writer.close()
    metrics_lib.plot_metrics(writer.jsonl_path, writer.plot_path)
    (workdir / resume_lib.CONFIG_NAME).write_text(config.to_json_best_effort())
    assert resume_lib.read_saved_config(workdir)["total_steps"] == 4
    resume_lib.record(workdir, 2, {"total_steps": (4, 8)}, (1e-3, 5e-4))
    checkpointer = checkpoints_lib.Checkpointer("gs://bucket/run", read_only=True)
    assert os.fspath(checkpointer.path(2)) == "gs://bucket/run/checkpoints/2"
    workdir_lib.release(lock)
  assert [r["step"] for r in metrics_lib.read_metrics(f"{local}/run/metrics.jsonl")] == [1, 2]
  assert sorted(os.listdir(f"{local}/run")) == ["config.json", "metrics.jsonl", "metrics.png",
                                                "resumes.jsonl"]
