"""What the Flax and Equinox suite runners share: a peer library's own test files, run
in a fresh pytest process with jaxbn's layer swapped in by a plugin.

Neither suite is vendored: each runner takes a git directory of the library (bare or
not), extracts ``tests/`` and ``pyproject.toml`` at a fixed release, and runs the files
it names with the library's own pytest settings (``tests/flax_suite/run_flax_tests.py``,
``tests/equinox_suite/run_equinox_tests.py``).
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


def extract(git_dir: str, commit: str, dest: Path) -> None:
    """Writes ``tests/`` and ``pyproject.toml`` of ``commit`` under ``dest``."""
    tar = subprocess.run(
        ["git", "--git-dir", git_dir, "archive", commit, "tests", "pyproject.toml"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")


def parse(argv, *, description: str, library: str, baseline: str, commit: str):
    """``(args, pytest_args)``: the git directory, ``--module jaxbn|baseline``,
    ``--commit``, and whatever follows ``--`` (for pytest)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("git_dir", help=f"a git directory of {library} (bare or not)")
    p.add_argument("--module", choices=["jaxbn", baseline], default="jaxbn")
    p.add_argument("--commit", default=commit)
    args, pytest_args = p.parse_known_args(argv)
    return args, [a for a in pytest_args if a != "--"]


def run(
    args, pytest_args, *, files, plugin_dir: Path, env: dict, options: list, prefix: str
) -> int:
    """Runs ``files`` of ``args.commit`` in a fresh ``python -m pytest``, with
    ``plugin_dir`` on ``PYTHONPATH`` (where the swap-in plugin lives), ``env`` added to
    the environment and ``options`` before the files; returns pytest's exit code."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        extract(args.git_dir, args.commit, root)
        path = os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])
        full_env = dict(os.environ, **env, PYTHONPATH=path)
        cmd = [sys.executable, "-m", "pytest", "-c", str(root / "pyproject.toml")]
        cmd += ["--rootdir", str(root), *options, "-p", "no:cacheprovider", "-q"]
        cmd += [*pytest_args, *(str(root / f) for f in files)]
        return subprocess.run(cmd, env=full_env, cwd=root).returncode
