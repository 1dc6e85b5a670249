"""The throughput benchmark runs on a CPU, counts FLOPs right and compares with PyTorch."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vitjax.tools import benchmark

# The toy ViT (4 blocks of width 64) at 32 pixels, 4 patches and a class token: compiling and
# timing it take seconds.
TINY = ["--model", "vit", "--variant", "mu/16", "--image_size", "32", "--batch", "2",
        "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module", name="runs")
def fixture_runs(tmp_path_factory):
  """mode -> (result, printed output, JSON path): inference alone, training beside PyTorch."""
  runs = {}
  for mode, extra in (("infer", ["--compare", "none"]),
                      ("train", ["--compare", "transformers",
                                 "--peak_tflops", "1", "--markdown"])):
    path = tmp_path_factory.mktemp(mode) / "result.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      result = benchmark.main(TINY + ["--mode", mode, "--json", str(path)] + extra)
    runs[mode] = result, out.getvalue(), path
  return runs


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_images_per_second_and_tflops_agree_with_the_step_time(mode, runs):
  result, _, path = runs[mode]
  assert result["mode"] == mode and result["batch"] == 2 and result["image_size"] == 32
  assert result["dtype"] == "float32"  # The CPU default.
  assert len(result["step_times_s"]) == 2 and result["ms_per_step"] > 0
  assert result["images_per_s"] == pytest.approx(2 / (result["ms_per_step"] * 1e-3))
  assert result["flops"] > 0
  assert result["tflops"] == pytest.approx(result["flops"] / (result["ms_per_step"] * 1e-3) / 1e12)
  assert result["peak_memory_bytes"] > 0 and "memory analysis" in result["peak_memory_source"]
  assert json.loads(path.read_text())["images_per_s"] == result["images_per_s"]


def test_without_pytorch_and_without_a_known_peak(runs):
  result, out, _ = runs["infer"]
  assert result["torch"] is None and result["ratio"] is None
  assert result["mfu"] is None and result["peak_tflops"] is None  # No peak known for a CPU.
  assert "images/s" in out and "MFU n/a" in out


def test_training_costs_more_flops_than_inference(runs):
  infer, train = runs["infer"][0], runs["train"][0]
  # The backward pass is about twice the forward, plus the optimizer: about three forwards.
  assert 2.5 < train["flops"] / infer["flops"] < 5


def test_compares_with_the_transformers_vit(runs):
  result, out, _ = runs["train"]
  torch_result = result["torch"]
  assert torch_result["implementation"] == "transformers" and not torch_result["torch_compile"]
  assert torch_result["images_per_s"] > 0 and len(torch_result["step_times_s"]) == 2
  assert result["ratio"] > 0
  assert result["ratio"] == pytest.approx(
      benchmark.paired_ratio(torch_result["step_times_s"], result["step_times_s"]))
  # Like for like: PyTorch gets as many threads as XLA's CPU thread pool, one per usable core.
  assert torch_result["torch_threads"] == result["cpu_threads"] == len(os.sched_getaffinity(0))
  assert result["mfu"] == pytest.approx(result["tflops"] / 1.0)  # --peak_tflops 1.
  assert f"| {result['ratio']:.2f}x |" in out


def test_transformers_vit_has_the_same_size():
  from vitjax import models  # pylint: disable=import-outside-toplevel
  args = benchmark.parse_args(["--model", "vit_small_patch16_224", "--image_size", "32"])
  model = models.create_model(args.model, image_size=32)
  module, _ = benchmark.torch_model("transformers", model, args)
  torch_params = sum(p.numel() for p in module.parameters())
  assert torch_params == models.count_params(models.param_shapes(model))


def test_markdown_has_a_header_and_a_row(runs):
  out = runs["train"][1]
  result = runs["train"][0]
  assert f"Throughput on cpu (cpu; lscpu model name: {result['cpu_model']}), jax " in out
  assert "| model | mode | batch |" in out
  assert any(line.startswith("| vit | train | 2 | float32 |") for line in out.splitlines())


def test_peak_table():
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989
  assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756
  assert benchmark.peak_tflops("NVIDIA H200", "bfloat16") == 989
  assert benchmark.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312
  assert benchmark.peak_tflops("TPU v4", "bfloat16") == 275
  assert benchmark.peak_tflops("TPU v5 lite", "bfloat16") == 197
  assert benchmark.peak_tflops("TPU v5p", "bfloat16") == 459
  assert benchmark.peak_tflops("TPU v6 lite", "bfloat16") == 918
  assert benchmark.peak_tflops("cpu", "float32") is None


def test_cost_analysis_as_a_list_or_a_dict():
  class Compiled:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      return self.analysis

  assert benchmark.xla_flops(Compiled({"flops": 10.0})) == 10.0
  assert benchmark.xla_flops(Compiled([{"flops": 10.0}])) == 10.0  # Older JAX.
  assert benchmark.xla_flops(Compiled([])) is None


def test_steps_alternate_and_the_ratio_is_paired_by_round():
  calls = []
  runners = {"vitjax": lambda: calls.append("vitjax"), "torch": lambda: calls.append("torch")}
  times, _ = benchmark.time_steps(runners, steps=3, warmup=0)
  assert calls == ["vitjax", "torch", "torch", "vitjax", "vitjax", "torch"]
  assert {name: len(t) for name, t in times.items()} == {"vitjax": 3, "torch": 3}
  # Per-round ratios 2, 2 and 10 (PyTorch's third step hit by a load spike): the median is 2.
  assert benchmark.paired_ratio([2.0, 4.0, 30.0], [1.0, 2.0, 3.0]) == 2.0


def test_a_pytorch_side_that_fails_on_its_first_step_leaves_the_vitjax_figures(monkeypatch):
  def failing_step():
    raise RuntimeError("torch.compile: backend compiler failed")

  monkeypatch.setattr(benchmark, "resolve_compare", lambda compare, model=None: "timm")
  monkeypatch.setattr(benchmark, "build_torch",
                      lambda *args: (failing_step, {"implementation": "timm"}))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = benchmark.main(TINY + ["--mode", "infer", "--compare", "timm"])
  assert result["images_per_s"] > 0 and result["ratio"] is None
  assert "backend compiler failed" in result["torch"]["error"]
  assert "PyTorch side not run" in out.getvalue()


@pytest.mark.parametrize("name,closest", [("vit_bas_patch16_224", "Closest: vit_base_patch16_224"),
                                          ("UNKNOWN", "vit_*")])
def test_an_unknown_model_is_one_line_and_exit_status_2(name, closest):
  result = subprocess.run([sys.executable, "-m", "vitjax.tools.benchmark", "--model", name],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # One line.
  assert f"error: Unknown model {name!r}" in result.stderr and closest in result.stderr
  assert "Traceback" not in result.stderr and not result.stdout


def test_a_family_without_a_variant_notes_what_it_builds(capsys):
  # check_model builds no parameters: the note costs nothing.
  benchmark.check_model(benchmark.parse_args(["--model", "vit"]))
  note = capsys.readouterr().err
  assert note.startswith("note: 'vit' without a variant builds VisionTransformer(variant='B/16'")
  assert "pool_type='token'" in note and "--variant" in note
  benchmark.check_model(benchmark.parse_args(["--model", "deit", "--image_size", "32"]))
  note = capsys.readouterr().err
  assert "variant='B/16'" in note and "image_size=32" in note and "distilled=True" in note
  benchmark.check_model(benchmark.parse_args(["--model", "vit", "--variant", "mu/16"]))
  benchmark.check_model(benchmark.parse_args(["--model", "vit_tiny_patch16_224"]))
  assert not capsys.readouterr().err  # A size was given: nothing to note.


# The toy ViT at 16 pixels in 4-pixel patches: 16 patches and a class token, 4 blocks.
TINY_MERGING = ["--model", "vit", "--variant", "mu/4", "--image_size", "16", "--batch", "2",
                "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module", name="merging_runs")
def fixture_merging_runs(tmp_path_factory):
  """mode -> (result, stdout, stderr, JSON path) of a --token_merging run."""
  runs = {}
  for mode, extra in (("infer", ["--token_merging", "r=2"]),
                      ("train", ["--token_merging", "r=2,schedule=decreasing",
                                 "--compare", "transformers", "--markdown"])):
    path = tmp_path_factory.mktemp(mode) / "result.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      result = benchmark.main(TINY_MERGING + ["--mode", mode, "--json", str(path)] + extra)
    runs[mode] = result, out.getvalue(), err.getvalue(), path
  return runs


def test_token_merging_runs(merging_runs):
  """One test over both runs: under xdist, each test of its own would redo the fixture."""
  for mode in ("infer", "train"):
    _check_side_by_side(mode, merging_runs)
  _check_tokens_per_block(merging_runs)
  _check_output_and_markdown_row(merging_runs)


def _check_side_by_side(mode, merging_runs):
  """The plain and merged model timed side by side."""
  result, _, _, path = merging_runs[mode]
  merging = result["token_merging"]
  plain, merged = merging["plain"], merging["merged"]
  for figures in (plain, merged):
    assert len(figures["step_times_s"]) == 2
    assert figures["images_per_s"] == pytest.approx(2 / (figures["ms_per_step"] * 1e-3))
  assert plain["images_per_s"] == result["images_per_s"]  # The top-level figures are plain's.
  assert merging["speedup"] == pytest.approx(
      benchmark.paired_ratio(plain["step_times_s"], merged["step_times_s"]))
  assert 0 < merged["gmacs"] < plain["gmacs"]
  assert merging["gmacs_ratio"] == pytest.approx(merged["gmacs"] / plain["gmacs"])
  assert 0 < merged["flops"] < result["flops"]  # XLA's count of the merged step is lower too.
  assert result["torch"] is None and result["ratio"] is None  # No PyTorch side.
  assert json.loads(path.read_text())["token_merging"]["speedup"] == merging["speedup"]


def _check_tokens_per_block(merging_runs):
  """r tokens taken out per block."""
  from vitjax.models import token_merging  # pylint: disable=import-outside-toplevel
  infer, train = (merging_runs[mode][0]["token_merging"] for mode in ("infer", "train"))
  assert infer["options"] == {"r": 2} and infer["plain"]["tokens_at_last_block"] == 1 + 16
  assert infer["tokens_at_last_block"] == 1 + 16 - 4 * 2  # r=2 in each of the 4 blocks.
  assert train["options"] == {"r": 2, "schedule": "decreasing"}
  assert train["tokens_at_last_block"] == 1 + 16 - sum(token_merging.schedule_r(2, 4, "decreasing"))


def _check_output_and_markdown_row(merging_runs):
  _, out, err, _ = merging_runs["infer"]
  assert "  plain:  " in out and "  merged: " in out and "token merging r=2" in out
  assert "tokens out of the last block 17 plain, 9 merged" in out
  assert not err
  result, out, err, _ = merging_runs["train"]
  assert err.startswith("note: --compare transformers is skipped with --token_merging")
  assert "| model | mode | batch | token merging | plain img/s | merged img/s | speedup |" in out
  merging = result["token_merging"]
  row = next(line for line in out.splitlines() if line.startswith("| vit | train | 2 |"))
  assert row.startswith("| vit | train | 2 | `r=2,schedule=decreasing` |")
  assert row.endswith(f"| {merging['speedup']:.2f}x | {merging['plain']['gmacs']:.3g} | "
                      f"{merging['merged']['gmacs']:.3g} | {merging['gmacs_ratio']:.2f}x | "
                      f"{merging['tokens_at_last_block']} |")


def test_token_merging_spec_is_comma_separated_key_value_pairs():
  assert benchmark.parse_token_merging("r=16,schedule=decreasing") == {
      "r": 16, "schedule": "decreasing"}
  assert benchmark.parse_token_merging("method=evit,keep_rate=0.7,layers=(3, 6,9)") == {
      "method": "evit", "keep_rate": 0.7, "layers": (3, 6, 9)}
  assert benchmark.parse_token_merging("r=[4,4,0,0],proportional_attention=False") == {
      "r": [4, 4, 0, 0], "proportional_attention": False}


@pytest.mark.parametrize("spec,message", [
    ("size=8", "Unknown token_merging key(s) 'size'"),
    ("method=foo", "Unknown token_merging method 'foo'"),
    ("8", "'8' is not key=value"),
    ("r=(1,2", "unbalanced brackets"),
    ("r=0", "takes out no token of the 4-block model"),
    ("r=2,layers=(3,6,9)", "not block indices of a 4-block model"),
])
def test_a_bad_token_merging_spec_is_one_line_and_exit_status_2(spec, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.check_model(benchmark.parse_args(TINY_MERGING + ["--token_merging", spec]))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_bad_token_merging_spec_fails_before_any_device_work():
  result = subprocess.run([sys.executable, "-m", "vitjax.tools.benchmark", *TINY_MERGING,
                           "--token_merging", "r=-1"],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: token_merging r=-1: must be an int >= 0 (tokens taken out per block) or a tuple "
      "of one per block."]
  assert not result.stdout


# V-MoE's toy size: the 4-block ViT of width 64 at 16 pixels in 4-pixel patches (16 patches and
# a class token), 8 experts in blocks 1 and 3, top-2 at capacity 1.05; one routing group of 8.
TINY_MOE = ["--model", "vmoe", "--variant", "mu/4", "--image_size", "16", "--batch", "8",
            "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module", name="moe_run")
def fixture_moe_run(tmp_path_factory):
  """(result, stdout, stderr, JSON path) of a training run of a sparse MoE, asked for PyTorch."""
  path = tmp_path_factory.mktemp("moe") / "result.json"
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    result = benchmark.main(TINY_MOE + ["--mode", "train", "--compare", "transformers",
                                        "--markdown", "--json", str(path)])
  return result, out.getvalue(), err.getvalue(), path


def test_an_moe_model_runs_beside_its_dense_counterpart(moe_run):
  result, out, err, path = moe_run
  mixture = result["moe"]
  moe_side, dense = mixture["moe"], mixture["dense"]
  assert mixture["description"] == "sparse, 8 experts, top-2, capacity 1.05"
  assert mixture["moe_layers"] == [1, 3]
  for figures in (moe_side, dense):
    assert len(figures["step_times_s"]) == 2 and figures["images_per_s"] > 0
    assert figures["images_per_s"] == pytest.approx(8 / (figures["ms_per_step"] * 1e-3))
    assert figures["flops"] > 0
  assert moe_side["images_per_s"] == result["images_per_s"]  # The top-level figures are the MoE's.
  assert mixture["speed_ratio"] == pytest.approx(
      benchmark.paired_ratio(dense["step_times_s"], moe_side["step_times_s"]))
  # Top-2 at capacity 1.05: each expert slot runs an MLP, 2.1 times the dense MLP's tokens.
  assert moe_side["gmacs"] > dense["gmacs"] > 0
  assert mixture["gmacs_ratio"] == pytest.approx(moe_side["gmacs"] / dense["gmacs"])
  # A token meets 2 of the 8 experts; the dense model uses all it has.
  assert dense["active_params"] == dense["params"] < moe_side["active_params"] < moe_side["params"]
  assert result["torch"] is None and result["ratio"] is None  # No PyTorch side.
  assert err.startswith("note: --compare transformers is skipped for the mixture of experts "
                        "'vmoe': PyTorch has no counterpart of it")
  assert json.loads(path.read_text())["moe"]["speed_ratio"] == mixture["speed_ratio"]
  assert "| model | mode | batch | experts | MoE img/s | dense img/s | MoE / dense |" in out
  row = next(line for line in out.splitlines() if line.startswith("| vmoe | train | 8 |"))
  assert row.startswith("| vmoe | train | 8 | sparse, 8 experts, top-2, capacity 1.05 |")
  assert row.endswith(f"| {mixture['speed_ratio']:.2f}x | {moe_side['gmacs']:.3g} | "
                      f"{dense['gmacs']:.3g} | {mixture['gmacs_ratio']:.2f}x | "
                      f"{moe_side['params']:,} | {moe_side['active_params']:,} | "
                      f"{dense['params']:,} |")


def test_the_training_loss_adds_the_moe_aux_losses():
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from vitjax import models  # pylint: disable=import-outside-toplevel
  model = models.create_model("vmoe", variant="mu/4", image_size=16)
  params = models.init_params(model)
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  labels = jax.numpy.arange(8)
  key = jax.random.key(1)
  logits, out = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
  assert set(out["aux_loss"]) == {"moe_importance", "moe_load"}
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  assert benchmark.training_loss(model, params, images, labels, key) == pytest.approx(
      float(cross_entropy + out["aux_loss"]["moe_importance"] + out["aux_loss"]["moe_load"]))


def test_token_merging_with_an_moe_model_is_one_line_and_exit_status_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.check_model(benchmark.parse_args(TINY_MOE + ["--token_merging", "r=2"]))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err == ("error: --token_merging is for a dense model: 'vmoe' is a mixture of experts, "
                 "which the benchmark times beside its dense counterpart.\n")


# A toy DiT: one block of width 32 (2 heads, MLP 4 x width) on 8x8x4 latents in 2-pixel patches
# (16 tokens), 10 classes and a learned sigma (8 output channels).
TINY_DIT = ["--model", "dit", "--variant", "S/2", "--image_size", "8", "--model_options",
            "width=32,depth=1,num_heads=2,mlp_dim=128,num_classes=10", "--batch", "2",
            "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module", name="dit_runs")
def fixture_dit_runs():
  """mode -> (result, stdout, stderr): the toy DiT beside diffusers' DiT, asked for by name
  (infer) and picked by --compare auto (train)."""
  runs = {}
  for mode, extra in (("infer", ["--compare", "diffusers"]), ("train", ["--markdown"])):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      result = benchmark.main(TINY_DIT + ["--mode", mode] + extra)
    runs[mode] = result, out.getvalue(), err.getvalue()
  return runs


def test_a_dit_runs_beside_diffusers_on_the_same_weights(dit_runs):
  """One test over both runs: under xdist, each test of its own would redo the fixture."""
  for mode in ("infer", "train"):
    result, out, err = dit_runs[mode]
    torch_result = result["torch"]
    assert not torch_result.get("error"), torch_result.get("error")
    assert torch_result["implementation"] == "diffusers"
    assert torch_result["module"] == "DiTTransformer2DModel"
    # The same function: predictions agree, and are not the zeros of an adaLN-Zero init.
    assert torch_result["max_abs_difference"] <= benchmark.AGREEMENT_TOLERANCE
    assert torch_result["max_abs_prediction"] > 0.05
    assert len(torch_result["step_times_s"]) == 2 and result["ratio"] > 0
    assert result["ratio"] == pytest.approx(
        benchmark.paired_ratio(torch_result["step_times_s"], result["step_times_s"]))
    assert result["diffusion"] == {
        "in_channels": 4, "out_channels": 8, "num_classes": 10, "num_timesteps": 1000,
        "loss": benchmark.DIFFUSION_LOSS.format(channels=4) if mode == "train" else None}
    assert result["image_size"] == 8 and result["flops"] > 0
    assert "diffusers" in result["versions"]
    assert not err
  _, out, _ = dit_runs["infer"]
  assert "vitjax / PyTorch: " in out and "PyTorch diffusers DiTTransformer2DModel (eager" in out
  assert "timesteps in [0, 1000), labels in [0, 10)" in out and "train step" not in out
  result, out, _ = dit_runs["train"]
  assert ("train step: the simple diffusion loss: MSE of the first 4 output channels against "
          "the noise, AdamW, the same on both sides") in out
  assert any(line.startswith("| dit | train | 2 | float32 |")
             and line.endswith(f"| diffusers | {benchmark._fmt(result['torch']['images_per_s'])} "
                               f"| {result['ratio']:.2f}x |") for line in out.splitlines())
  assert 2.5 < result["flops"] / dit_runs["infer"][0]["flops"] < 5  # Forward + backward + AdamW.


def test_the_diffusion_loss_is_the_mse_of_the_first_channels_against_the_noise():
  class Model:  # Predicts 2 x_t for the noise and 100 for the variance channels.
    def apply(self, variables, x, timesteps, labels, train, rngs):
      assert train and set(rngs) == {"dropout"} and labels.shape == timesteps.shape == (2,)
      return np.concatenate([variables["params"] * x, np.full_like(x, 100)], -1), {}

  x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3) / 10
  noise = np.ones_like(x)
  inputs = {"images": x, "timesteps": np.array([1, 999]), "labels": np.array([0, 1]),
            "noise": noise}
  loss = benchmark.diffusion_loss(Model(), 2.0, inputs, dropout_key=None)
  assert float(loss) == pytest.approx(float(np.mean((2 * x - noise) ** 2)), rel=1e-6)


def test_diffusers_refuses_weights_that_compute_another_function():
  """The agreement check fails loudly: a diffusers DiT with one weight changed."""
  import torch  # pylint: disable=import-outside-toplevel
  from vitjax import models  # pylint: disable=import-outside-toplevel
  args = benchmark.parse_args(TINY_DIT)
  model = models.create_model("dit", **benchmark.model_overrides(args, None)).clone(
      freq_shift=1.0)
  params = benchmark.random_weights(model)
  module, forward = benchmark.torch_model("diffusers", model, args, params)
  inputs = benchmark.step_inputs(model, 2, diffusion=True)
  tensors = {name: torch.from_numpy(np.array(value)) for name, value in inputs.items()}
  tensors = {name: t.permute(0, 3, 1, 2) if t.ndim == 4 else t.long()
             for name, t in tensors.items()}
  with torch.no_grad():
    module.proj_out_2.bias.add_(0.01)
  with pytest.raises(ValueError, match="do not compute the same function"):
    benchmark.check_agreement(model, params, module, forward, inputs, tensors)


def test_a_uvit_is_timed_alone_with_a_note():
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    result = benchmark.main(["--model", "uvit", "--variant", "mu/2", "--image_size", "8",
                             "--model_options", "depth=1", "--batch", "2", "--steps", "1",
                             "--warmup", "1", "--mode", "infer"])
  assert result["images_per_s"] > 0 and result["torch"] is None and result["ratio"] is None
  note = "no PyTorch implementation of UViT ('uvit') is installed; vitjax is timed alone"
  assert result["torch_not_timed"] == note
  assert err.getvalue() == f"note: PyTorch is not timed: {note}\n"
  assert f"PyTorch: not timed: {note}" in out.getvalue() and "unconditional" in out.getvalue()


def test_auto_compares_a_dit_with_diffusers():
  from vitjax import models  # pylint: disable=import-outside-toplevel
  assert benchmark.resolve_compare("auto", models.create_model("dit_small_patch2_256")) == (
      "diffusers")
  assert benchmark.resolve_compare("auto", models.create_model("vit_tiny_patch16_224")) in (
      "timm", "transformers")


@pytest.mark.parametrize("argv,message", [
    (["--model", "dit_small_patch2_256", "--compare", "transformers"],
     "--compare transformers has no diffusion transformer: the DiT 'dit_small_patch2_256' is "
     "compared with --compare diffusers (the default) or none."),
    (["--model", "vit_tiny_patch16_224", "--compare", "diffusers"],
     "--compare diffusers is for a DiT; compare 'vit_tiny_patch16_224' with --compare auto, "
     "timm, transformers or none."),
    (["--model", "dit", "--variant", "S/2", "--model_options", "width"],
     "--model_options 'width': 'width' is not key=value; give e.g. width=32,depth=1,num_heads=2."),
    (["--model", "dit", "--variant", "S/2", "--model_options", "widht=32"],
     "Unknown option(s) for model 'dit': 'widht' (did you mean 'width'"),
])
def test_a_compare_without_the_model_or_a_bad_option_is_one_line_and_exit_status_2(
    argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.check_model(benchmark.parse_args(argv))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_xla_options_add_to_vitjax_options_and_the_output_names_the_cpu(capsys):
  from vitjax import xla_options  # pylint: disable=import-outside-toplevel
  result = benchmark.main(TINY + ["--mode", "infer", "--compare", "none",
                                  "--xla_options", "xla_cpu_enable_fast_math=False"])
  assert result["compiler_options"] == {**(xla_options.compiler_options("cpu") or {}),
                                        "xla_cpu_enable_fast_math": False}
  assert result["cpu_model"] == xla_options.cpu_model_name() != ""
  out = capsys.readouterr().out
  assert f"on cpu ({result['cpu_model']}, {result['cpu_threads']} threads):" in out
  assert "compiled with xla_cpu_experimental_ynn_fusion_type=, xla_cpu_enable_fast_math=False" \
      in out or "compiled with xla_cpu_enable_fast_math=False" in out


@pytest.mark.parametrize("value,message", [
    ("fast_math=1", "'fast_math' is not an XLA option (their names start with 'xla_'"),
    ("xla_cpu_enable_fast_math", "'xla_cpu_enable_fast_math' is not key=value"),
])
def test_a_malformed_xla_options_value_is_one_line_and_exit_status_2(value, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.parse_xla_options(value)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --xla_options ") and message in err and err.count("\n") == 1


def test_an_xla_option_this_xla_rejects_is_one_line_exit_2_and_writes_nothing(tmp_path):
  path = tmp_path / "result.json"
  result = subprocess.run([sys.executable, "-m", "vitjax.tools.benchmark", *TINY, "--mode",
                           "infer", "--compare", "none", "--json", str(path),
                           "--xla_options", "xla_cpu_no_such_option=1"],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2 and not path.exists() and not result.stdout
  lines = [line for line in result.stderr.splitlines() if "error:" in line]
  assert lines == [line for line in result.stderr.splitlines() if line.strip() and not
                   line.startswith(("WARNING", "W0", "I0"))]
  assert len(lines) == 1 and lines[0].startswith("error: --xla_options: this XLA (jaxlib ")
  assert "rejects xla_cpu_no_such_option=1 on cpu" in lines[0]


def _load_experiment(name):
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", name + ".py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_vendor_script_runs_the_benchmark_per_variant_and_takes_medians():
  script = _load_experiment("cpu_vendor_speed")
  assert script.variant_flags("shipped") == []
  assert script.variant_flags("xla_defaults") == ["--xla_defaults"]
  assert script.variant_flags("xla_cpu_enable_fast_math=False") == [
      "--xla_options", "xla_cpu_enable_fast_math=False"]
  run = lambda ratio, ips: {"ratio": ratio, "images_per_s": ips, "torch": {"images_per_s": 5.0},
                            "background_cpu": 0.01, "cpu_model": "AMD EPYC", "cpu_threads": 2,
                            "versions": {"jax": "0.10.2"}, "date": "2026-12-03"}
  rows = script.table({("train", "shipped"): [run(0.9, 4.0), run(1.2, 6.0), run(1.0, 5.0)]})
  assert rows[0] == "CPU (lscpu model name): AMD EPYC, 2 threads; jax 0.10.2; 2026-12-03."
  assert rows[-1] == ("| AMD EPYC | train | shipped | 0.90x, 1.20x, 1.00x | **1.00x** | 5.00 | "
                      "5.00 | 1% |")
