"""notebooks/emergence.ipynb runs top to bottom on a small hand-built store and draws its figures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from tests.cubes import realistic_cube, write_store

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "emergence.ipynb"


def share_planted(tmp_path_factory, monkeypatch) -> None:
    """The notebook's planted series are replayed by the first notebook run of a test worker and read by the rest."""
    monkeypatch.setenv("SINKTRACE_PLANTED", str(tmp_path_factory.getbasetemp() / "notebook-planted"))


@pytest.fixture(autouse=True)
def planted_once(tmp_path_factory, monkeypatch):
    share_planted(tmp_path_factory, monkeypatch)


def _run(store: Path, monkeypatch) -> nbformat.NotebookNode:
    spec = KernelSpecManager().get_kernel_spec("python3")
    # jupyter_client swaps a bare "python" in argv for sys.executable; anything else would be a
    # different interpreter, possibly without this project installed.
    assert spec.argv[0] in ("python", "python3", sys.executable), spec.argv
    monkeypatch.setenv("SINKTRACE_STORE", str(store))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )


def _text(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.slow
def test_notebook_runs_on_a_store_with_both_first_token_groups(tmp_path, monkeypatch):
    store = write_store(
        tmp_path / "sinks.zarr", {"r64-keep": realistic_cube("keep"), "r64-random": realistic_cube("random")}
    )
    nb = _run(store, monkeypatch)
    printed = nb.cells[0].outputs[0]["text"].strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.executable)
    assert not [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"
    ]
    assert _images(nb) == 7  # one figure per question, the first-token comparison and the planted circuit included
    text = _text(nb)
    assert "planted (GPT-2)" in text and "control (token-bound)" in text
    assert "group 'r64-keep'" in text and "19 of 20 steps done" in text
    assert "convergence step: 8000" in text
    assert "positional index at step 10000" in text


@pytest.mark.slow
def test_notebook_without_a_first_token_pair(tmp_path, monkeypatch):
    store = write_store(tmp_path / "sinks.zarr", {"only": realistic_cube("keep", failed=())})
    nb = _run(store, monkeypatch)
    assert _images(nb) == 5 + 1  # sections 1-4 and the planted circuit
    assert "no pair of probe groups" in _text(nb)


def test_notebook_is_stored_clean_and_explained():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 7


@pytest.mark.slow
def test_notebook_reads_the_circuit_and_mixing_statistics(tmp_path, monkeypatch):
    from tests.test_analysis import circuit_cube

    store = write_store(tmp_path / "sinks.zarr", {"circuit": circuit_cube()})
    nb = _run(store, monkeypatch)
    text = _text(nb)
    assert "writer settles at step 200" in text
    assert "position zero recognised (p0_similarity > 0.9 in layers 0-1) from step 300" in text
    assert _images(nb) == 5 + 2 + 1  # sections 1-4, the two P0 ones (no first-token pair), the planted circuit


@pytest.mark.slow
def test_notebook_compares_two_runs(tmp_path, monkeypatch):
    fast = write_store(tmp_path / "fast.zarr", {"r64-keep": realistic_cube("keep", failed=())})
    slow_cube = realistic_cube("keep", failed=(), steps=tuple(s * 2 for s in (0, 500, 1000, 3000, 5000, 7000, 9000)))
    slow = write_store(tmp_path / "slow.zarr", {"r64-keep": slow_cube})
    monkeypatch.setenv("SINKTRACE_RUNS", f"fast={fast}{os.pathsep}slow={slow}")
    nb = _run(fast, monkeypatch)
    assert _images(nb) == 5 + 1 + 1  # sections 1-4, the planted circuit and the comparison
    text = _text(nb)
    assert "emergence step per run and layer:" in text
    # layer 0 of the hand-built run stays above 0.3 from step 3000; the slow run's first checkpoint past it is 6000
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith(("fast ", "slow "))}
    assert rows["fast"][0] == "3000.0" and rows["slow"][0] == "6000.0"
