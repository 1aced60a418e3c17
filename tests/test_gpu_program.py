"""``benchmarks/gpu_program.py``: how it reads a compiled program, on XLA:CPU's own output.

The compiled H100 programs themselves are checked by ``.ci/run``
(``python benchmarks/gpu_program.py --check``, in an environment with JAX's CUDA plugin).
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import lax

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_program.py"
_spec = importlib.util.spec_from_file_location("gpu_program", _PATH)
gp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gp)

X = jnp.ones((256, 64), jnp.float32)


def traffic(f, *args):
    text = jax.jit(f).lower(*args).compile().as_text()
    return gp.traffic(text, X.size, X.nbytes)


def test_an_elementwise_pass_reads_and_writes_x_once():
    t = traffic(lambda x: x * 2 + 1, X)
    assert (t["S"], t["kernels"], t["control"]) == (2, 1, [])


def test_a_sum_reads_x_once_and_a_second_input_counts_too():
    assert traffic(lambda x: jnp.sum(x, 0), X)["S"] == 1
    assert traffic(lambda x, w: jnp.sum(x * w, 0), X, X)["S"] == 2


def test_values_read_through_slices_are_not_a_pass_over_x():
    t = traffic(lambda x: x[0] + x[128] + x[-1], X)
    assert t["S"] == 0 and t["all_S"] < 0.05


def test_control_flow_is_reported():
    f = lambda x: lax.cond(jnp.sum(x) > 0, lambda x: x + 1, lambda x: x - 1, x)  # noqa: E731
    assert traffic(f, X)["control"] == ["conditional"]


@pytest.mark.parametrize(
    "row, problems",
    [
        (dict(floor=3, jaxbn=dict(S=3, kernels=5, control=[]), flax=dict(S=3, kernels=5)), 0),
        (dict(floor=3, jaxbn=dict(S=4, kernels=5, control=[]), flax=dict(S=3, kernels=5)), 2),
        (dict(floor=3, jaxbn=dict(S=3, kernels=13, control=[]), flax=dict(S=3, kernels=5)), 1),
        (
            dict(floor=3, jaxbn=dict(S=3, kernels=5, control=["while"]), flax=dict(S=3, kernels=5)),
            1,
        ),
    ],
)
def test_check_flags_what_is_over(row, problems):
    row = dict(row, mode="fwd", layout="NHWC", dtype="float32")
    assert len(gp.check([row])) == problems
