"""Flax's and Equinox's own BatchNorm tests with jaxbn's modules swapped in, where a git
directory of the library is at hand (slow: minutes; tests/peer_suites.py runs them)."""

import os

import pytest


@pytest.mark.skipif(
    not os.environ.get("JAXBN_FLAX_GIT"),
    reason="set JAXBN_FLAX_GIT to a google/flax git directory to run Flax's own tests",
)
def test_flaxs_own_batchnorm_tests_pass_with_jaxbns_modules():
    from flax_suite.run_flax_tests import main

    assert main([os.environ["JAXBN_FLAX_GIT"], "--", "-x"]) == 0


@pytest.mark.skipif(
    not os.environ.get("JAXBN_EQUINOX_GIT"),
    reason="set JAXBN_EQUINOX_GIT to a patrick-kidger/equinox git directory to run Equinox's own tests",
)
def test_equinoxs_own_batchnorm_tests_pass_with_jaxbns_layer():
    from equinox_suite.run_equinox_tests import main

    assert main([os.environ["JAXBN_EQUINOX_GIT"], "--", "-x"]) == 0
