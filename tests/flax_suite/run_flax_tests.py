"""Runs Flax 0.12.8's own BatchNorm tests with jaxbn's modules swapped in.

Flax's tests are not vendored: give this script a git directory of google/flax
(``git clone --bare https://github.com/google/flax``) and it extracts ``tests/`` and
``pyproject.toml`` at the commit of the 0.12.8 release, then runs, in a fresh
process, the tests of ``FILES`` whose code names ``BatchNorm`` (see
``flax_dropin_plugin.py``), with Flax's own pytest settings and 4 simulated CPU
devices, as Flax's CI does::

    python tests/flax_suite/run_flax_tests.py /path/to/flax.git            # jaxbn's modules
    python tests/flax_suite/run_flax_tests.py /path/to/flax.git --module flax  # the baseline
    python tests/flax_suite/run_flax_tests.py /path/to/flax.git -- -x -k tabulate

Arguments after ``--`` go to pytest. The tests need ``absl-py``, ``optax``,
``orbax-checkpoint`` and ``cloudpickle`` (all in jaxbn's ``test`` extra or its
dependencies).
"""

from __future__ import annotations

import sys
from pathlib import Path

FLAX_0_12_8 = "3a491108"  # google/flax "update to v0.12.8" (the release has no tag in every mirror)
FILES = [
    "tests/checkpoints_test.py",
    "tests/linen/linen_module_test.py",
    "tests/linen/linen_test.py",
    "tests/linen/linen_transforms_test.py",
    "tests/linen/summary_test.py",
    "tests/nnx/bridge/wrappers_test.py",
    "tests/nnx/graph_utils_test.py",
    "tests/nnx/helpers_test.py",
    "tests/nnx/integration_test.py",
    "tests/nnx/module_test.py",
    "tests/nnx/nn/linear_test.py",
    "tests/nnx/nn/normalization_test.py",
    "tests/nnx/summary_test.py",
    "tests/nnx/transforms_test.py",
]


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for peer_suites
    import peer_suites

    args, pytest_args = peer_suites.parse(
        argv,
        description=__doc__.split("\n\n")[0],
        library="google/flax",
        baseline="flax",
        commit=FLAX_0_12_8,
    )
    return peer_suites.run(
        args,
        pytest_args,
        files=FILES,
        plugin_dir=Path(__file__).parent,
        env={
            "JAXBN_FLAX_SUITE": args.module,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        },
        options=["-p", "flax_dropin_plugin"],
        prefix="flax-tests-",
    )


if __name__ == "__main__":
    sys.exit(main())
