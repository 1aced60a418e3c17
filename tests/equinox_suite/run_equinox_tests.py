"""Runs Equinox 0.13.8's own BatchNorm tests with ``jaxbn.equinox.BatchNorm`` swapped in.

Equinox's tests are not vendored: give this script a git directory of
patrick-kidger/equinox (``git clone --bare https://github.com/patrick-kidger/equinox``)
and it extracts ``tests/`` and ``pyproject.toml`` at the ``v0.13.8`` tag, then runs,
in a fresh process, the tests of ``FILES`` whose code names ``BatchNorm``, with
Equinox's conftest (strict dtype promotion, rank promotion raises, 2 CPU devices)
and pytest settings::

    python tests/equinox_suite/run_equinox_tests.py /path/to/equinox.git          # jaxbn's layer
    python tests/equinox_suite/run_equinox_tests.py /path/to/equinox.git --module equinox  # baseline
    python tests/equinox_suite/run_equinox_tests.py /path/to/equinox.git -- -x -k sequential

All 10 pass (both modes; 3 of 10 before jaxbn had ``mode="ema"``). Equinox's ``addopts`` (``--jaxtyping-packages=equinox,beartype...``, a runtime
type check of Equinox's own annotations) is dropped: beartype is no dependency of
jaxbn's. Arguments after ``--`` go to pytest.

This file is also the pytest plugin (``-p run_equinox_tests``) that swaps the layer
in at configure time, before any test module is imported, and deselects the tests
whose code does not name ``BatchNorm``.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

EQUINOX_0_13_8 = "v0.13.8"
FILES = ["tests/test_nn.py", "tests/test_stateful.py", "tests/test_serialisation.py"]
_MODULE_ENV = "JAXBN_EQUINOX_SUITE"


# --- the pytest plugin ---------------------------------------------------------------


def _swap_in_jaxbn() -> None:
    import equinox.nn

    import jaxbn.equinox

    equinox.nn.BatchNorm = jaxbn.equinox.BatchNorm  # type: ignore[attr-defined,misc]


def pytest_configure(config) -> None:
    module = os.environ.get(_MODULE_ENV, "jaxbn")
    if module not in ("jaxbn", "equinox"):
        raise ValueError(f"{_MODULE_ENV} must be 'jaxbn' or 'equinox', got {module!r}.")
    if module == "jaxbn":
        _swap_in_jaxbn()


def _uses_batchnorm(item) -> bool:
    fn = getattr(item, "obj", None)
    try:
        return "BatchNorm" in inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items) -> None:
    keep = [i for i in items if _uses_batchnorm(i)]
    config.hook.pytest_deselected(items=[i for i in items if not _uses_batchnorm(i)])
    items[:] = keep


# --- the runner ----------------------------------------------------------------------


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for peer_suites
    import peer_suites

    args, pytest_args = peer_suites.parse(
        argv,
        description=__doc__.split("\n\n")[0],
        library="patrick-kidger/equinox",
        baseline="equinox",
        commit=EQUINOX_0_13_8,
    )
    return peer_suites.run(
        args,
        pytest_args,
        files=FILES,
        plugin_dir=Path(__file__).parent,
        env={_MODULE_ENV: args.module},
        options=["-o", "addopts=", "-p", "run_equinox_tests", "-p", "no:xdist", "-rfE"],
        prefix="equinox-tests-",
    )


if __name__ == "__main__":
    sys.exit(main())
