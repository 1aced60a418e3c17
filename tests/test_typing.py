"""A user's type checker sees jaxbn's public API: ``tests/typing_user_script.py`` checks
clean under mypy and pyright, with the returned types (``tuple[jax.Array,
BatchNormState]``, ...) coming through.

Both run from the repository root on the script alone (mypy with the project's
``[tool.mypy]``, whose ``follow_imports = "silent"`` keeps jaxbn's own errors out; pyright
with its defaults). pyright needs Node.js, which it finds on ``PATH``.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = "tests/typing_user_script.py"


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def test_py_typed_marks_the_package():
    assert (ROOT / "jaxbn" / "py.typed").is_file()


def test_mypy_sees_the_public_types():
    pytest.importorskip("mypy")
    code, out = run([sys.executable, "-m", "mypy", "--no-error-summary", SCRIPT])
    assert code == 0, out


def test_pyright_sees_the_public_types():
    pytest.importorskip("pyright")
    if shutil.which("node") is None:
        pytest.skip("pyright needs Node.js on PATH")
    code, out = run([sys.executable, "-m", "pyright", "--pythonpath", sys.executable, SCRIPT])
    assert code == 0, out
