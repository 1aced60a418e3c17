"""Strict mode for every test (rank promotion raises), 8 simulated CPU devices, the
settings that keep the suite's compile time down, and the one switch between the
programs each platform gets (``program``, ``clean_program``)."""

import os
import shutil
import subprocess
import sys
import tempfile

# XLA's LLVM optimization level 0, none of LLVM's expensive passes, each program
# compiled as one LLVM module (not split for threads), and XLA:CPU's elemental emitters
# instead of its newer fusion emitters (here and in the subprocesses tests start): the
# tests' arrays are small, so less compile time outweighs slower kernels. All but the
# last change code generation only. The last also changes what XLA:CPU fuses, so the
# test of the CPU program's fusions compiles with XLA's default for it (the
# ``xla_cpu_defaults`` fixture). On 2 cores, the emitters cut the suite's CPU time by a
# fifth, and one module test_act's and test_gradients' by 15 %. A jaxlib that no longer
# knows a flag aborts on it, so those two are tried once, in a subprocess. The notebooks
# and the demo run without any of these flags (test_notebooks.py, test_demo.py).
_FUSION_EMITTERS_OFF = "--xla_cpu_use_fusion_emitters=false"
if "XLA_FLAGS" not in os.environ:  # the first pytest process; its workers inherit them
    _newer = [_FUSION_EMITTERS_OFF, "--xla_cpu_parallel_codegen_split_count=1"]
    _probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.jit(lambda: 0)()"],
        env=os.environ | {"XLA_FLAGS": " ".join(_newer), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
    )
    os.environ["XLA_FLAGS"] = " ".join(
        ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
        + (_newer if _probe.returncode == 0 else [])
    )

# Each xdist worker on its own cores (and so the kernels and subprocesses it starts).
# XLA:CPU sizes its thread pool by the cores a process may use; with every worker on
# every core, the pools oversubscribe the machine and their idle threads spin: on 2
# cores, a worker's training loop took as long pinned to one core and 20-30 % less CPU.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    _n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if len(_cores) >= _n:
        os.sched_setaffinity(0, _cores[int(_WORKER[2:]) % _n :: _n])

# Most of the suite's time is XLA compiling, and many programs compile more than once:
# in another test's closure, in the other xdist worker, in a subprocess (bench, demo,
# check). One persistent compilation cache per run, made by the first pytest process
# and inherited by the workers and their subprocesses: the key is the program and the
# compile options, so a hit is the executable a compile would have made. It starts
# empty and is removed at the end. jax writes an entry without a lock (its locking
# comes with eviction, which rescans the whole cache on every write), so a process may
# read an entry another is still writing: jax then warns and compiles, and
# pyproject.toml lets that one warning through.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.path.join(tempfile.gettempdir(), f"jaxbn-tests-xla-{os.getpid()}")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
else:  # an xdist worker (or the user's own cache)
    _CACHE = None

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # 8 simulated CPU devices, in this process
jax.config.update("jax_numpy_rank_promotion", "raise")

# scripts, run by hand or by a test, never imported by pytest (the golden one needs torch)
collect_ignore = [
    "multiprocess_worker.py",
    "golden/make_torch_golden.py",
    "golden/make_sbx_golden.py",
]


import contextlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def xla_cpu_defaults():
    """``compiler_options`` that give one compile XLA:CPU's default fusions back (the
    suite turns its fusion emitters off, above)."""
    off = _FUSION_EMITTERS_OFF in os.environ.get("XLA_FLAGS", "").split()
    return {"xla_cpu_use_fusion_emitters": True} if off else {}


@pytest.fixture(scope="session")
def user_env():
    """The environment of a process a user starts (the demo, a notebook's kernel): this
    one's without the suite's XLA flags, compilation cache and matplotlib backend. A
    notebook's or the demo's programs are their own, so the cache would only write. (The
    xdist worker's cores are still the process's: that changes threads, not results.)"""
    drop = ("XLA_FLAGS", "MPLBACKEND", "JAX_COMPILATION_CACHE_DIR")
    return {k: v for k, v in os.environ.items() if k not in drop and "PERSISTENT_CACHE" not in k}


@pytest.fixture(scope="session")
def clean_program():
    """A context manager: inside it, XLA:CPU runs the clean program (the one every other
    platform gets) instead of its own. The one private name the tests need for it."""
    from jaxbn._platform import use_clean_program

    return use_clean_program


@pytest.fixture(params=["cpu", "clean"])
def program(request, clean_program):
    """Runs a test with XLA:CPU's program and with the clean one every other platform gets."""
    with clean_program() if request.param == "clean" else contextlib.nullcontext():
        yield request.param


# The notebooks, slowest first: the longest file starts first, so it does not end last.
NOTEBOOKS_SLOWEST_FIRST = ("02_", "03_", "01_", "04_", "05_")


def pytest_collection_modifyitems(config, items):
    """Orders the tests for two xdist workers (pyproject: ``--dist loadfile``).

    Each test file runs on one worker, so its tests share its compiled programs and
    its fixtures (``--dist loadgroup`` with a group per file did not: xdist 3.8 tags a
    test's group onto ``item._nodeid``, which pytest 9.2's ``nodeid`` no longer reads,
    so every test was scheduled on its own). The notebooks go first, slowest first.
    """

    def notebook_rank(item):
        if "test_notebook_runs" not in item.nodeid:
            return len(NOTEBOOKS_SLOWEST_FIRST)
        return next(i for i, p in enumerate(NOTEBOOKS_SLOWEST_FIRST) if p in item.nodeid)

    items.sort(key=notebook_rank)  # stable: the rest keep their order


def pytest_sessionfinish(session):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
