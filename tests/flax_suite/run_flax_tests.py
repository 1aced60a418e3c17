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

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
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


def extract(git_dir: str, commit: str, dest: Path) -> None:
    """Writes ``tests/`` and ``pyproject.toml`` of ``commit`` under ``dest``."""
    tar = subprocess.run(
        ["git", "--git-dir", git_dir, "archive", commit, "tests", "pyproject.toml"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("git_dir", help="a git directory of google/flax (bare or not)")
    p.add_argument("--module", choices=["jaxbn", "flax"], default="jaxbn")
    p.add_argument("--commit", default=FLAX_0_12_8)
    args, pytest_args = p.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]
    with tempfile.TemporaryDirectory(prefix="flax-tests-") as tmp:
        root = Path(tmp)
        extract(args.git_dir, args.commit, root)
        env = dict(
            os.environ,
            JAXBN_FLAX_SUITE=args.module,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
            ),
        )
        cmd = [sys.executable, "-m", "pytest", "-c", str(root / "pyproject.toml")]
        cmd += ["--rootdir", str(root), "-p", "flax_dropin_plugin", "-p", "no:cacheprovider"]
        cmd += ["-q", *pytest_args, *(str(root / f) for f in FILES)]
        return subprocess.run(cmd, env=env, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())
