"""The notebooks in ``notebooks/``: each pair in sync, committed without outputs, and run.

Each notebook is executed top to bottom in a fresh Jupyter kernel, as a user would run
it: in ``notebooks/``, without the test suite's XLA flags and compilation cache
(``conftest.py``) or a matplotlib backend forced from outside. The notebooks assert their
own written conclusions, so a changed result fails here rather than leaving stale text.
Their speed is not asserted (a loaded machine may take several times as long); the
cell timeout only stops a hung kernel.
"""

import pathlib
import re

import jupytext
import nbclient
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
    "01_from_notes_to_custom_vjp",
    "02_what_batch_norm_buys",
    "03_data_parallel_functional_training",
    "04_deploy_population_stats_and_folding",
    "05_fused_batch_norm_activation",
]
HANG_GUARD_S = 1800  # per cell; whole notebooks take about 12 to 110 s on 2 quiet CPU cores


def cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.py")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync_and_without_outputs(name):
    ipynb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    py = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert cells(ipynb) == cells(py), f"run: jupytext --sync notebooks/{name}.py"
    assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{name}.ipynb has outputs; clear them (jupyter nbconvert --clear-output)"
            )


@pytest.mark.parametrize("name", NAMES)
def test_uses_only_the_public_api(name):
    # what a reader copies from a notebook must not break when a private module moves
    code = [
        c.source for c in jupytext.read(NOTEBOOKS / f"{name}.py").cells if c.cell_type == "code"
    ]
    assert not re.findall(r"\bjaxbn\._[a-z]\w*", "\n".join(code))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, user_env):
    nb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    client = nbclient.NotebookClient(
        nb,
        timeout=HANG_GUARD_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=user_env)  # raises CellExecutionError, with the cell, on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{name} showed no figure"
