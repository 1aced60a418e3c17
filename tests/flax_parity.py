"""The harness of the Flax wrappers' parity tests: the same model built with jaxbn's
module and with Flax's own ``BatchNorm`` (``use_fast_variance=False``, the oracle), fed
the same data, compared leaf by leaf (``tests/test_linen.py``, ``tests/test_nnx.py`` and
the feature files' module tests)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import rel_err

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import jaxbn.linen  # noqa: E402
import jaxbn.nnx  # noqa: E402

TOL = 1e-5
LINEN = {
    "jaxbn": jaxbn.linen.BatchNorm,
    "flax": functools.partial(nn.BatchNorm, use_fast_variance=False),
}
NNX = {
    "jaxbn": jaxbn.nnx.BatchNorm,
    "flax": functools.partial(nnx.BatchNorm, use_fast_variance=False),
}
INITS = dict(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
CONSOLE = dict(force_terminal=False, no_color=True, width=10_000)


def both(run, modules):
    """``(run(jaxbn's class), run(Flax's class))``."""
    out = {name: run(cls) for name, cls in modules.items()}
    return out["jaxbn"], out["flax"]


def assert_same(ours, theirs, atol=1e-5):
    """Same tree structure, shapes and dtypes; values within float32 rounding."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    flat = jax.tree_util.tree_flatten_with_path(ours)[0]
    for (path, u), v in zip(flat, jax.tree.leaves(theirs)):
        assert (u.shape, u.dtype) == (v.shape, v.dtype), path
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=atol, err_msg=str(path))


def assert_close(a, b):
    """Every leaf of two trees equal to float32 rounding."""
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


def assert_trees_close(a, b, tol=TOL):
    """Same tree structure, shapes and dtypes; each leaf within ``tol`` relative error."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape, path
        assert rel_err(u, v) <= tol, (path, rel_err(u, v))


def randn(seed, shape, scale=1.0, offset=0.0):
    """``offset + scale * N(0, 1)`` from ``jax.random.key(seed)``."""
    return jax.random.normal(jax.random.key(seed), shape) * scale + offset


def explicit_batch(shape, seed=0):
    """``(mesh, x, xs)``: 8 devices on one Explicit axis (JAX's default axis type), a batch
    ``x`` and the same batch sharded over the devices along its first axis."""
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = randn(seed, shape, 2.0, 1.0)
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    return mesh, x, xs


def batches(kind, steps=5, n=16, seed=0):
    """``steps + 1`` batches of images (``kind="cnn"``) or vectors, with learnable labels."""
    rs = np.random.RandomState(seed)
    shape = (steps + 1, n, 8, 8, 3) if kind == "cnn" else (steps + 1, n, 12)
    x = rs.randn(*shape) * 3 + 2
    flat = x.reshape(steps + 1, n, -1)
    labels = np.argmax(flat @ rs.randn(flat.shape[-1], 10), -1)  # learnable
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels)
