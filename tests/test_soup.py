"""`python -m vitjax.tools.soup`: uniform and greedy model soups of training workdirs."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import vitjax
from vitjax import config as config_lib
from vitjax import train as train_lib
from vitjax.tools import soup
from vitjax.train import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def test_uniform_soup_is_the_exact_mean():
  trees = [{"a": {"kernel": np.array([1.0, 2.0, 3.0], np.float32)},
            "b": np.array([[0.5]], np.float32)},
           {"a": {"kernel": np.array([3.0, 2.0, -3.0], np.float32)},
            "b": np.array([[1.5]], np.float32)},
           {"a": {"kernel": np.array([2.0, 5.0, 0.0], np.float32)},
            "b": np.array([[-2.0]], np.float32)}]
  got = soup.uniform_soup(trees)
  np.testing.assert_array_equal(got["a"]["kernel"], np.array([2.0, 3.0, 0.0], np.float32))
  np.testing.assert_array_equal(got["b"], np.array([[0.0]], np.float32))
  assert got["a"]["kernel"].dtype == np.float32
  # Order does not matter (averaged in float64), and a bfloat16 leaf stays bfloat16.
  x = [{"w": np.array([0.1, 1e-8], np.float32)}, {"w": np.array([0.2, 1.0], np.float32)},
       {"w": np.array([0.7, -1.0], np.float32)}]
  np.testing.assert_array_equal(soup.uniform_soup(x)["w"], soup.uniform_soup(x[::-1])["w"])
  half = [{"w": np.array([1.0], jax.numpy.bfloat16)}, {"w": np.array([2.0], jax.numpy.bfloat16)}]
  assert soup.uniform_soup(half)["w"].dtype == jax.numpy.bfloat16
  assert float(soup.uniform_soup(half)["w"][0]) == 1.5


def test_greedy_soup_keeps_an_ingredient_only_when_the_score_improves():
  # Ingredient i is the scalar tree {'w': value}; a soup scores higher the closer its
  # mean is to 1.0. Own scores decide the order: 0.9 (best), 1.12, 1.3, 3.0.
  values = [3.0, 0.9, 1.3, 1.12]
  trees = [{"w": np.array(v)} for v in values]
  score = lambda params: -abs(float(params["w"]) - 1.0)
  scores = [score(t) for t in trees]
  params, kept, history = soup.greedy_soup(trees, scores, score)
  # 0.9 starts (0.1 from 1); + 1.12 -> mean 1.01 (0.01: better, kept);
  # + 1.3 -> mean 1.107 (worse, rejected); + 3.0 -> 1.673 (worse, rejected).
  assert kept == [1, 3]
  np.testing.assert_allclose(params["w"], (0.9 + 1.12) / 2)
  assert [(i, kept_) for i, _, kept_ in history] == [(1, True), (3, True), (2, False),
                                                      (0, False)]
  # A tie is not an improvement: the soup stays as it was.
  flat = lambda params: 0.5
  _, kept, _ = soup.greedy_soup(trees, [0.5, 0.5, 0.5, 0.5], flat)
  assert kept == [0]


def test_held_out_split_is_the_rest_of_a_train_slice():
  assert soup.held_out_split("train[:90%]") == "train[90%:]"
  assert soup.held_out_split("train[100:]") == "train[:100]"
  assert soup.held_out_split("train") is None
  assert soup.held_out_split("train[10%:90%]") is None


def _train(workdir, seed, **overrides):
  config = config_lib.load_config(QUICKSTART + ":image_size=8,variant=mu/4")
  config_lib.apply_overrides(config, [
      f"seed={seed}", "train_split=train[:80%]", "batch_size=32", "eval_batch_size=400",
      "total_steps=4", "log_every=4", "eval_every=4", "checkpoint_every=4",
      "optimizer.warmup_steps=2"] + [f"{k}={v}" for k, v in overrides.items()])
  with config.unlocked():
    config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  train_lib.train(config, str(workdir), progress=False)


def _soup(*args):
  return subprocess.run([sys.executable, "-m", "vitjax.tools.soup", *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("soup")
  _train(base / "a", seed=0)
  _train(base / "b", seed=1, **{"optimizer.learning_rate": 0.003})
  shutil.copytree(base / "a", base / "wide")  # Its config now claims another width.
  config_path = base / "wide" / "config.json"
  config_path.write_text(config_path.read_text().replace('"width": 16', '"width": 32'))
  (base / "empty").mkdir()
  shutil.copy(base / "a" / "config.json", base / "empty" / "config.json")
  return base


def _expected(workdirs, names):
  return soup.uniform_soup([soup.read_final_weights(workdirs / name)[1] for name in names])


def test_greedy_and_uniform_soups_end_to_end(workdirs, tmp_path, capsys):
  model = tasks.make_task(soup.read_config(workdirs / "a")).build_model()
  out = tmp_path / "greedy.npz"
  result = _soup(workdirs / "a", workdirs / "b", "--recipe", "greedy", "--out", out)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "held-out train[80%:] top1" in lines[0] and "reported test top1" in lines[0]
  assert lines[3].startswith("greedy soup")
  kept = [row.split()[0][-1] for row in lines[1:3] if row.split()[2] == "yes"]
  assert kept and lines[3].split()[2] == str(len(kept))  # '1 of 2' or '2 of 2'.
  jax.tree_util.tree_map(np.testing.assert_array_equal, vitjax.load_weights(model, out),
                         _expected(workdirs, kept))

  out = tmp_path / "uniform.npz"  # In this process: the CLI's main, without a new JAX.
  assert soup.main([str(workdirs / "a"), str(workdirs / "b"), "--recipe", "uniform",
                    "--out", str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "held-out" not in lines[0] and "reported test top1" in lines[0]
  assert lines[3].split()[:4] == ["uniform", "soup", "2", "of"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, vitjax.load_weights(model, out),
                         _expected(workdirs, ["a", "b"]))


def test_bad_input_is_one_line_and_exit_2(workdirs, tmp_path, capsys):
  out = tmp_path / "soup.npz"
  # Through the command line: one line on stderr, no traceback.
  for expected, dirs in {"at least two workdirs": [workdirs / "a"],
                         "model.width: 16 vs 32": [workdirs / "a", workdirs / "wide"]}.items():
    result = _soup(*dirs, "--recipe", "uniform", "--out", out)
    assert result.returncode == 2, (expected, result.stderr)
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  # The other cases through `main`, in this process.
  a, b = str(workdirs / "a"), str(workdirs / "b")
  cases = {
      "given twice": [a, a, "--recipe", "uniform"],
      "No checkpoint in": [a, str(workdirs / "empty"), "--recipe", "uniform"],
      "no readable config.json": [a, str(tmp_path), "--recipe", "uniform"],
      "Did you mean 'classification'": [a, b, "--recipe", "uniform",
                                        "--evaluator", "clasification"],
      "is the reported split": [a, b, "--recipe", "greedy", "--split", "test"],
      "written as a big_vision .npz": [a, b, "--recipe", "uniform", "--out", "soup.pt"],
  }
  for expected, argv in cases.items():
    argv = argv if "--out" in argv else argv + ["--out", str(out)]
    assert soup.main(argv) == 2, expected
    stderr = capsys.readouterr().err
    assert expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
  assert not out.exists()


def test_parameter_shapes_must_agree():
  trees = [{"head": {"kernel": np.zeros((4, 10))}}, {"head": {"kernel": np.zeros((4, 5))}}]
  with pytest.raises(soup.SoupError, match=r"head/kernel: \(4, 10\) vs \(4, 5\)"):
    soup.check_same_shapes(["a", "b"], trees)
