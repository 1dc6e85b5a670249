"""Sharding by configuration on 8 CPU devices, and a two-process jax.distributed run.

The device count is fixed when JAX starts, so each check runs in a fresh process
(tests/multidevice_runs.py) with XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def _env(devices):
  # Without XLA's backend optimizations: they took 40% of each run's time, spent on steps
  # that then run a few times on tiny arrays. Sharding is decided before them, and every
  # run a test compares is compiled alike.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_scenario(name, tmp_path, devices=8):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "multidevice_runs.py"), name, str(tmp_path)],
      capture_output=True, text=True, env=_env(devices), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_losses_equal_across_meshes(tmp_path):
  losses = run_scenario("meshes", tmp_path)
  assert len(losses["one_device"]) == 5
  for name in ("data8", "fsdp8", "data2_fsdp2_tensor2"):
    np.testing.assert_allclose(losses[name], losses["one_device"], atol=1e-5, err_msg=name)
  assert losses["one_device"][-1] < losses["one_device"][0]  # It trains.


def test_fsdp8_holds_an_eighth_of_the_state_per_device(tmp_path):
  memory = run_scenario("fsdp_memory", tmp_path)
  assert len(memory["per_device"]) == 8
  for device, nbytes in memory["per_device"].items():
    assert nbytes <= memory["total"] / 8 * 1.05, (device, nbytes, memory["total"])


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
  results = run_scenario("grad_accum", tmp_path)
  np.testing.assert_allclose(results["accum4"]["losses"], results["accum1"]["losses"], atol=1e-5)
  for full, accumulated in zip(results["accum1"]["params"], results["accum4"]["params"]):
    np.testing.assert_allclose(accumulated, full, atol=1e-5)


def test_checkpoint_from_fsdp8_restores_on_data8_and_continues_identically(tmp_path):
  results = run_scenario("mesh_change", tmp_path)
  assert len(results["changed"]) == len(results["straight"]) == 6
  np.testing.assert_allclose(results["changed"], results["straight"], atol=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tiny_config_file(directory):
  """The quickstart at 8 px with test_train's one-block model of width 16, as a config file.

  What the command-line runs here check does not depend on the model's size, and each
  process takes a fifth less time than with the quickstart's mu/4.
  """
  path = os.path.join(directory, "tiny_config.py")
  with open(path, "w") as f:
    f.write(f"""from vitjax import config as config_lib


def get_config():
  config = config_lib.load_config({QUICKSTART + ":image_size=8,steps=3"!r})
  with config.unlocked():
    config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  return config
""")
  return path


def _cli(config, workdir, extra=()):
  return [sys.executable, "-m", "vitjax.train", "--config", config,
          "--workdir", str(workdir), "--no_progress", "--config.batch_size=16",
          "--config.eval_batch_size=120", "--config.eval_every=3", "--config.log_every=1",
          "--config.model.drop_path_rate=0.0", *extra]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]


def _two_processes(config, workdir, extra=()):
  """Runs the command line as two jax.distributed processes; returns their (stdout, stderr)."""
  port = _free_port()
  workers = [subprocess.Popen(
      _cli(config, workdir, [
          "--config.distributed.enabled=true",
          f"--config.distributed.coordinator_address=localhost:{port}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
          "--config.distributed.cpu_collectives=gloo", *extra]),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(1), cwd=ROOT)
      for i in range(2)]
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=600))
    except subprocess.TimeoutExpired:
      for w in workers:
        w.kill()
      pytest.fail("the two-process run did not finish")
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  return outputs


def test_two_processes_give_the_losses_of_one_and_agree_on_the_checkpoint_to_restore(tmp_path):
  """Two jax.distributed processes train as one; then, when process 0 finds the latest
  checkpoint unreadable, both hosts resume from the one before."""
  config = _tiny_config_file(tmp_path)
  steps = ["--config.checkpoint_every=2", "--config.keep_checkpoints=3"]
  single = subprocess.run(_cli(config, tmp_path / "single", steps + ["--config.total_steps=4"]),
                          capture_output=True, text=True, env=_env(2), cwd=ROOT, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  workdir = tmp_path / "multi"
  outputs = _two_processes(config, workdir, steps + ["--config.total_steps=4"])
  np.testing.assert_allclose(_losses(workdir), _losses(tmp_path / "single"), atol=1e-5)
  assert "Final eval top-1" in outputs[0][0]

  latest = workdir / "checkpoints" / "4"
  for folder, _, names in os.walk(latest):
    for name in names:
      if os.path.basename(folder) == "d":
        os.truncate(os.path.join(folder, name), os.path.getsize(os.path.join(folder, name)) // 2)
  outputs = _two_processes(config, workdir, steps + ["--config.total_steps=6"])
  for stdout, _ in outputs:
    assert "Resuming from the checkpoint at step 2 in " in stdout, stdout
  # Set aside once, by process 0, which also says so (one line).
  assert os.listdir(workdir / "checkpoints_unreadable") == ["4"]
  assert outputs[0][1].count("WARNING: the checkpoint of step 4 cannot be read") == 1
  assert "WARNING" not in outputs[1][1]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  assert not (workdir / "run.lock").exists()  # Process 0 held it for both, and let it go.


def test_a_mesh_mesh_utils_cannot_lay_out_is_a_warning_naming_it(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  from vitjax.train import sharding  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise ValueError("no topology (simulated)")
  monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
  with pytest.warns(UserWarning, match=r"could not lay out the mesh \{'fsdp': 1, 'tensor': 1, "
                    r"'expert': 1, 'data': 1\} on 1 cpu devices \(ValueError: no topology"):
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
