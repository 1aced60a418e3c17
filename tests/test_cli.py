"""The command line: ``python -m jaxbn`` answers help and version without jax, says what
to install when an extra is missing, and ``jaxbn check`` passes with jax alone.

A missing package is simulated in a child process by ``sys.modules[name] = None``, which
makes both ``import name`` and ``importlib.util.find_spec(name)`` report it missing.
"""

import re
import subprocess
import sys

import pytest

import jaxbn

EXTRAS = ("optax", "sklearn", "matplotlib", "flax", "orbax", "tqdm")  # all but jax's own
DRIVER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
from jaxbn.cli import main
code = main(sys.argv[1:])
print("jax imported:", "jax" in sys.modules)
sys.exit(code)
"""


def jaxbn_cli(*argv, blocked=EXTRAS):
    """``jaxbn *argv`` in a child process without the packages in ``blocked``."""
    code = DRIVER.format(blocked=blocked)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["check", "--help"], ["demo", "--help"]],
    ids=" ".join,
)
def test_help_and_version_answer_without_importing_jax(argv):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "jaxbn", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    imported = re.findall(r"^import time:.*\|\s*(\S+)$", proc.stderr, re.M)
    assert "jaxbn" in imported and "jax" not in imported and "numpy" not in imported
    assert "``" not in proc.stdout  # docstring markup does not reach the terminal
    if argv == ["--version"]:
        assert proc.stdout == f"jaxbn {jaxbn.__version__}\n"
    else:
        assert proc.stdout.startswith("usage: jaxbn")


@pytest.mark.parametrize("argv", [["demo"], ["demo", "--epochs", "1"]], ids=" ".join)
def test_a_missing_extra_says_what_to_install(argv):
    proc = jaxbn_cli(*argv)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert 'with pip install "jaxbn[examples]".' in proc.stderr, proc.stderr
    assert "jax imported: False" in proc.stdout


def test_a_partly_missing_extra_names_what_is_missing():
    proc = jaxbn_cli("demo", blocked=("sklearn",))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        "jaxbn demo needs optax, scikit-learn and matplotlib (scikit-learn is not installed); "
        'install them with pip install "jaxbn[examples]".\n'
    )


def test_demo_help_names_its_extra_even_without_it():
    proc = jaxbn_cli("demo", "--help")
    assert proc.returncode == 0 and 'pip install "jaxbn[examples]"' in proc.stdout, proc.stderr


def test_check_needs_only_jax_and_prints_a_passing_table():
    proc = jaxbn_cli("check", "--quick", "--reps", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if re.match(r"(\(N, D\)|NHWC|NCHW|\(N, L)", ln)]
    assert len(rows) == 8 and any("bfloat16" in r for r in rows), proc.stdout
    assert "OK: 8 of 8 cases within tolerance" in proc.stdout


@pytest.mark.parametrize("name", ["nope", "bench"])  # the benchmark is benchmarks/cpu_bench.py
def test_unknown_commands_are_rejected(name):
    proc = subprocess.run([sys.executable, "-m", "jaxbn", name], capture_output=True, text=True)
    assert proc.returncode == 2 and f"unknown command {name!r}" in proc.stderr
    assert "expected one of check, demo" in proc.stderr


def test_public_names_resolve_lazily_and_completely():
    assert sorted(jaxbn.__all__) == sorted(jaxbn._EXPORTS) == sorted(set(jaxbn.__all__))
    for name in jaxbn.__all__:
        assert getattr(jaxbn, name).__name__ == name
    with pytest.raises(AttributeError, match="has no attribute 'batchnorm'"):
        jaxbn.batchnorm  # noqa: B018


FIRST_USE_IN_A_TRACE = """
import jax, jax.numpy as jnp
import jaxbn
traces = []
def f(x):
    traces.append(1)  # jaxbn.batch_norm is first looked up here, inside the trace
    return jaxbn.batch_norm(x, None, None, jaxbn.init_state(3), training=True)[0]
g = jax.jit(f)
for _ in range(3):
    g(jnp.ones((4, 3)))
print(len(traces))
"""


def test_first_use_inside_a_jitted_function_traces_it_once():
    # jaxbn._platform's jit cache-key context, made mid-trace, retraced and recompiled
    # the user's function on its second call
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_USE_IN_A_TRACE], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
