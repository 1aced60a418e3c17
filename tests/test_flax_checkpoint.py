"""Checkpoints saved with orbax load both ways between Flax's BatchNorm and jaxbn's."""

from typing import Any

import jax
import numpy as np
import pytest
from reference import randn, rel_err

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
ocp = pytest.importorskip("orbax.checkpoint")

from flax_parity import LINEN, NNX  # noqa: E402

DIRECTIONS = [("flax", "jaxbn"), ("jaxbn", "flax")]


def save_and_restore(path, tree, abstract):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
        return ckptr.restore(path, abstract)


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


class LinenNet(nn.Module):
    bn: Any

    @nn.compact
    def __call__(self, x, train: bool):
        h = self.bn(use_running_average=not train, momentum=0.5)(nn.Dense(8, use_bias=False)(x))
        return nn.Dense(3)(nn.relu(h))


@pytest.mark.parametrize("saved,loaded", DIRECTIONS)
def test_linen_checkpoint_loads_into_the_other_module(tmp_path, saved, loaded):
    x1, x2, x_eval = (randn((16, 5), seed=i, scale=2.0, offset=1.0) for i in range(3))
    model = LinenNet(LINEN[saved])
    variables = model.init(jax.random.key(0), x1, train=False)
    for x in (x1, x2):  # statistics and parameters away from their initial values
        _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {
            "params": jax.tree.map(lambda p: p * 1.5 + 0.1, variables["params"]),
            **upd,
        }
    other = LinenNet(LINEN[loaded])
    abstract = jax.eval_shape(lambda: other.init(jax.random.key(1), x1, train=False))
    restored = save_and_restore(tmp_path / "ckpt", variables, abstract)
    assert_same_tree(restored, variables)
    y = other.apply(restored, x_eval, train=False)
    assert rel_err(y, model.apply(variables, x_eval, train=False)) < 1e-5


class NNXNet(nnx.Module):
    def __init__(self, bn, rngs):
        self.linear = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
        self.bn = bn(8, momentum=0.5, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.linear(x))))


@pytest.mark.parametrize("saved,loaded", DIRECTIONS)
def test_nnx_checkpoint_loads_into_the_other_module(tmp_path, saved, loaded):
    x1, x2, x_eval = (randn((16, 5), seed=i, scale=2.0, offset=1.0) for i in (3, 4, 5))
    model = NNXNet(NNX[saved], nnx.Rngs(0))
    for x in (x1, x2):
        model(x)
    model.linear.kernel[...] = model.linear.kernel[...] * 1.5
    model.eval()
    state = nnx.state(model)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NNXNet(NNX[loaded], nnx.Rngs(1))))
    restored = save_and_restore(tmp_path / "ckpt", state, abstract)
    assert_same_tree(restored, state)
    other = nnx.merge(graphdef, restored)
    other.eval()
    assert rel_err(other(x_eval), model(x_eval)) < 1e-5
