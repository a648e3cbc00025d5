"""Executes every notebook in notebooks/ with nbclient, so that none of them rots.

The kernel starts in the repository root; the notebook sets XLA_FLAGS in its first cell and
asserts its own results (a failing assert fails this test).
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 180  # per cell; the whole tour takes well under a minute on 2 cores


def test_the_tour_exists():
  assert "draco_tour.ipynb" in [path.name for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
    notebook,
    timeout=TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(ROOT)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(images) >= 4  # encoding matrices, flagged workers, aggregators, training curves
