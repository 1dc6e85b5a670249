"""The attention benchmark runs on a CPU, does its FLOP arithmetic right and survives failures."""

import json

import numpy as np
import pytest

from vitjax import ops
from vitjax.tools import bench_attention

TINY = ["--shapes", "1x33x2x16", "--iters", "2", "--warmup", "1", "--dtype", "float32"]


def test_rows_have_times_and_consistent_flops(tmp_path):
  path = tmp_path / "rows.json"
  rows = bench_attention.main(TINY + ["--impl", "xla", "--json", str(path)])
  (row,) = rows
  assert row["implementation"] == "xla" and row["shape"] == "1x33x2x16"
  assert row["fwd_error"] is None and row["fwd_bwd_error"] is None
  assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
  # FlashAttention's convention: 4 * B * T^2 * H * D forward, 3.5x that for fwd+bwd.
  assert row["fwd_flops"] == 4 * 1 * 33 * 33 * 2 * 16
  assert row["fwd_bwd_flops"] == 3.5 * row["fwd_flops"]
  assert row["fwd_tflops"] == pytest.approx(row["fwd_flops"] / (row["fwd_ms"] * 1e-3) / 1e12)
  assert row["fwd_bwd_tflops"] == pytest.approx(
      row["fwd_bwd_flops"] / (row["fwd_bwd_ms"] * 1e-3) / 1e12)
  assert row["max_abs_diff"] == pytest.approx(0.0, abs=1e-6)  # 'xla' against itself.
  assert json.loads(path.read_text())["rows"] == rows


def test_causal_halves_the_flops():
  (shape,) = bench_attention.parse_shapes("2x64x4x32", causal_only=True)
  assert shape.causal and shape.forward_flops == 4 * 2 * 64 * 64 * 4 * 32 // 2


def test_unavailable_implementation_is_a_row_not_a_crash(capsys):
  rows = bench_attention.main(TINY + ["--impl", "cudnn,xla"])
  cudnn, xla = rows
  assert cudnn["fwd_error"].startswith("n/a") and cudnn["fwd_ms"] is None
  assert xla["fwd_ms"] > 0  # The run went on after the failure.
  assert "NVIDIA GPU" in capsys.readouterr().out  # The reason is printed.


def test_out_of_memory_is_reported_as_oom():
  error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 "
                       "bytes.")
  assert bench_attention._failure(error) == "OOM"  # pylint: disable=protected-access


def test_markdown_has_a_header_and_a_row(capsys):
  bench_attention.main(TINY + ["--impl", "xla", "--markdown"])
  out = capsys.readouterr().out
  assert "Attention benchmark on cpu, jax " in out
  assert "| impl | B x T x H x D |" in out
  assert any(line.startswith("| xla | 1x33x2x16 | no |") for line in out.splitlines())


def test_pallas_tiles_can_be_swept_side_by_side():
  rows = bench_attention.main(TINY + ["--impl", "pallas,pallas:16x32x32x16"])
  assert [row["implementation"] for row in rows] == ["pallas", "pallas:16x32x32x16"]
  for row in rows:
    assert row["fwd_error"] is None and row["fwd_bwd_error"] is None
    assert row["max_abs_diff"] < 1e-5
  assert bench_attention.parse_block_sizes("pallas:128x64x64x32x8x3") == ops.BlockSizes(
      128, 64, 64, 32, num_warps=8, num_stages=3)
  with pytest.raises(SystemExit):
    bench_attention.main(TINY + ["--impl", "pallas:128xk"])


def test_packed_rows_time_the_same_images_packed_and_padded():
  rows = bench_attention.main(TINY + ["--impl", "xla,pallas", "--packed"])
  packed = [row for row in rows if row["layout"] == "packed"]
  padded = [row for row in rows if row["layout"] == "padded"]
  assert len(packed) == len(padded) == 2  # One per implementation.
  (shape,) = bench_attention.parse_shapes(TINY[TINY.index("--shapes") + 1])
  packed_shape, padded_shape = bench_attention.navit_layouts(shape)
  lengths = packed_shape.images
  assert lengths == padded_shape.images and len(lengths) >= 2
  # Each image's tokens, and only they, carry its segment id.
  packed_ids = np.asarray(packed_shape.segment_ids())
  assert np.bincount(packed_ids.ravel(), minlength=len(lengths) + 1)[1:].tolist() == list(lengths)
  padded_ids = np.asarray(padded_shape.segment_ids())
  assert padded_ids.shape == (len(lengths), max(lengths))
  assert padded_ids.sum(axis=1).tolist() == list(lengths)
  for row in packed + padded:  # Useful FLOPs only: equal for both layouts.
    assert row["fwd_flops"] == 4 * sum(n * n for n in lengths) * shape.heads * shape.head_dim
    assert row["fwd_ms"] > 0 and row["max_abs_diff"] < 1e-5
