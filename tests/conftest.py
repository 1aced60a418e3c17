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
