"""Metrics out: metrics.jsonl, TensorBoard event files (no TensorFlow) and a PNG plot."""

import json
import math
import sys

from etils import epath


class MetricsWriter:
  """Writes `{step, name: value}` rows; only process 0 writes."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    workdir = epath.Path(workdir)
    self.jsonl_path = workdir / "metrics.jsonl"
    self.plot_path = workdir / "metrics.png"
    self._tensorboard = None
    if enabled:
      self._tensorboard = _summary_writer_class()(str(workdir / "tensorboard"))

  def truncate_after(self, step):
    """On resume, drops rows a previous run wrote after its last checkpoint."""
    if not self.enabled or not self.jsonl_path.exists():
      return
    rows = read_metrics(self.jsonl_path)
    self.jsonl_path.write_text("".join(json.dumps(row) + "\n" for row in rows
                                       if row["step"] <= step))

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if "://" in str(self.jsonl_path):
      # Object stores cannot append: the file is written whole (runs log few rows).
      previous = self.jsonl_path.read_text() if self.jsonl_path.exists() else ""
      self.jsonl_path.write_text(previous + line)
    else:
      with self.jsonl_path.open("a") as f:
        f.write(line)
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, float(value), int(step))

  def close(self):
    if self._tensorboard is not None:
      self._tensorboard.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch when that is not loaded yet.

  tensorboardX imports torch (seconds) only to accept torch tensors; vitjax logs floats.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # Makes `import torch` fail fast inside tensorboardX.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def read_metrics(path):
  """The rows of a metrics.jsonl; a last line cut short by a killed run is dropped."""
  lines = [line for line in epath.Path(path).read_text().splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return rows


def plot_metrics(jsonl_path, png_path):
  """One panel per metric family (train/loss, eval/top1, ...) against steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = read_metrics(jsonl_path)
  series = {}
  for row in rows:
    for name, value in row.items():
      if name != "step":
        series.setdefault(name, ([], []))
        series[name][0].append(row["step"])
        series[name][1].append(value)
  names = [n for n in ("train/loss", "eval/top1", "train/accuracy", "train/lr") if n in series]
  names += sorted(set(series) - set(names))
  columns = min(len(names), 3) or 1
  figure_rows = math.ceil(len(names) / columns) or 1
  fig, axes = plt.subplots(figure_rows, columns, figsize=(4.5 * columns, 3.2 * figure_rows),
                           squeeze=False)
  for ax, name in zip(axes.flat, names):
    steps, values = series[name]
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  with epath.Path(png_path).open("wb") as f:
    fig.savefig(f, dpi=100, format="png")
  plt.close(fig)
  return png_path
