"""Strict mode for every test: rank promotion raises, 8 simulated CPU devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

# scripts, run by hand or by a test, never imported by pytest (the golden one needs torch)
collect_ignore = ["multiprocess_worker.py", "golden/make_torch_golden.py"]


import contextlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(params=["cpu", "clean"])
def program(request):
    """Runs a test with XLA:CPU's program and with the clean one every other platform gets."""
    from jaxbn._platform import use_clean_program

    with use_clean_program() if request.param == "clean" else contextlib.nullcontext():
        yield request.param


# The notebooks, slowest first: with pytest-xdist each runs on its own worker, first.
NOTEBOOKS_SLOWEST_FIRST = ("02_", "03_", "01_", "04_", "05_")


def pytest_collection_modifyitems(config, items):
    """Schedules for two xdist workers (pyproject: ``--dist loadgroup``).

    Each test file is one group, run on one worker (its compiled programs are shared
    by its tests), but for the notebooks: each is its own group, and they go first,
    slowest first, so that the longest jobs do not start last.
    """

    def notebook_rank(item):
        if "test_notebook_runs" not in item.nodeid:
            return len(NOTEBOOKS_SLOWEST_FIRST)
        return next(i for i, p in enumerate(NOTEBOOKS_SLOWEST_FIRST) if p in item.nodeid)

    for item in items:
        rank = notebook_rank(item)
        group = item.nodeid if rank < len(NOTEBOOKS_SLOWEST_FIRST) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=notebook_rank)  # stable: the rest keep their order
