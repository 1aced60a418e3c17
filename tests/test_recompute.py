"""Recomputation (``jax.checkpoint``, ``nn.remat``, ``nnx.remat``) never updates the
running statistics twice: the state is a value the forward returns once, so a block
recomputed in the backward gives the same new state and gradients as without.

PyTorch's in-place running statistics are updated again by every recomputed forward
(pytorch#96136, fairscale#1035); each test compares against the same block without
recomputation, and checks that the state moved exactly one momentum step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import jaxbn.linen  # noqa: E402
import jaxbn.nnx  # noqa: E402

RS = np.random.RandomState(0)
X = jnp.asarray(RS.randn(16, 5) * 2 + 1, jnp.float32)
W = jnp.asarray(RS.randn(16, 5), jnp.float32)
K = jnp.asarray(RS.randn(5, 5) * 0.5, jnp.float32)


def assert_close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


def test_jax_checkpoint_updates_the_state_once():
    def block(k, x, state):
        y, new = jaxbn.batch_norm(x @ k, None, None, state, training=True)
        return jnp.tanh(y), new

    def loss(k, x, state, remat):
        f = jax.checkpoint(block) if remat else block
        y, new = f(k, x, state)
        y, new = f(k, y, new)  # two applications: two updates, no more
        return jnp.sum(y * W), new

    state = jaxbn.init_state(5)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=3)
    (_, new_r), g_r = grad(K, X, state, True)
    (_, new), g = grad(K, X, state, False)
    assert_close((new_r, g_r), (new, g))
    assert int(new_r.count) == 2


def test_linen_remat_updates_batch_stats_once():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(jaxbn.linen.BatchNorm(use_running_average=False)(nn.Dense(5)(x)))

    def run(cls):
        model = cls()
        variables = model.init(jax.random.key(0), X)

        def loss(params):
            y, upd = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                X,
                mutable=["batch_stats"],
            )
            return jnp.sum(y * W), upd

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"]), variables

    ((_, upd_r), g_r), v0 = run(nn.remat(Block))
    ((_, upd), g), _ = run(Block)
    assert_close((upd_r, g_r), (upd, g))
    stats0 = v0["batch_stats"]["BatchNorm_0"]
    dense = v0["params"]["Dense_0"]
    h = np.asarray(X, np.float64) @ np.asarray(dense["kernel"], np.float64) + np.asarray(
        dense["bias"]
    )
    expect = 0.99 * np.asarray(stats0["mean"]) + 0.01 * h.mean(0)
    np.testing.assert_allclose(
        np.asarray(upd_r["batch_stats"]["BatchNorm_0"]["mean"]), expect, rtol=1e-5
    )


def test_nnx_remat_updates_batch_stats_once():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(5, 5, rngs=rngs)
            self.bn = jaxbn.nnx.BatchNorm(5, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.bn(self.dense(x)))

    def run(remat):
        model = Block(nnx.Rngs(0))
        before = np.asarray(model.bn.mean[...])

        def loss(model):
            f = nnx.remat(lambda m, x: m(x)) if remat else (lambda m, x: m(x))
            return jnp.sum(f(model, X) * W)

        _, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return before, nnx.state(model, nnx.BatchStat), grads, model

    before, stats_r, g_r, model = run(True)
    _, stats, g, _ = run(False)
    assert_close((stats_r, g_r), (stats, g))
    h = np.asarray(X, np.float64) @ np.asarray(model.dense.kernel[...], np.float64)
    h = h + np.asarray(model.dense.bias[...])
    np.testing.assert_allclose(
        np.asarray(model.bn.mean[...]), 0.99 * before + 0.01 * h.mean(0), rtol=1e-5
    )
