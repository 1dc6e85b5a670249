"""Every notebook under notebooks/ runs top to bottom on a CPU."""

import glob
import json
import os

import matplotlib
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(os.path.dirname(path))  # Notebooks use paths relative to themselves.
  with open(path) as f:
    notebook = json.load(f)
  namespace = {"__name__": "__main__"}
  for number, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    exec(compile(source, f"{os.path.basename(path)}[cell {number}]", "exec"), namespace)  # pylint: disable=exec-used


def test_there_is_a_notebook():
  assert NOTEBOOKS
