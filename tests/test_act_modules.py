"""``activation=`` on ``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm``.

The oracle is Flax's own ``BatchNorm`` (``use_fast_variance=False``) followed by the
activation, with the same variables: outputs, running statistics and gradients of a
random cotangent must agree, and a Flax checkpoint must load unchanged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.linen
import jaxbn.nnx

ACTS = {
    "relu": nn.relu,
    "leaky_relu": lambda p: nn.leaky_relu(p, 0.2),
    "identity": lambda p: p,
}
CASES = [("relu", False), ("leaky_relu", False), ("identity", True), ("relu", True)]


def _data(seed=0, shape=(16, 4, 4, 3)):
    kx, kr, kc = jax.random.split(jax.random.key(seed), 3)
    x = 2.0 + 3.0 * jax.random.normal(kx, shape)
    return x, jax.random.normal(kr, shape), jax.random.normal(kc, shape)


class _FlaxBlock(nn.Module):
    act: str

    @nn.compact
    def __call__(self, x, residual, train: bool):
        y = nn.BatchNorm(use_running_average=not train, use_fast_variance=False)(x)
        return ACTS[self.act](y if residual is None else y + residual)


class _JaxbnBlock(nn.Module):
    act: str

    @nn.compact
    def __call__(self, x, residual, train: bool):
        bn = jaxbn.linen.BatchNorm(
            use_running_average=not train, activation=self.act, negative_slope=0.2
        )
        return bn(x, residual=residual)


def _apply(model, variables, x, r, train):
    if train:
        return model.apply(variables, x, r, True, mutable=["batch_stats"])
    return model.apply(variables, x, r, False), {}


@pytest.mark.parametrize(
    "act,with_residual,train", [(a, r, True) for a, r in CASES] + [("relu", True, False)]
)
def test_linen_matches_flax_batchnorm_then_activation(act, with_residual, train):
    x, r, ct = _data()
    r = r if with_residual else None
    ours, theirs = _JaxbnBlock(act), _FlaxBlock(act)
    variables = theirs.init(jax.random.key(1), x, r, False)
    variables = jax.tree.map(
        lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables
    )
    # same auto-named variables: Flax's checkpoint is ours unchanged
    assert jax.tree.structure(ours.init(jax.random.key(1), x, r, False)) == jax.tree.structure(
        variables
    )

    def forward_and_grads(model):
        fn = lambda p, x_, r_: _apply(model, {**variables, "params": p}, x_, r_, train)  # noqa: E731
        (z, upd), pullback = jax.vjp(fn, variables["params"], x, r)
        zeros = jax.tree.map(jnp.zeros_like, upd)
        return z, upd, pullback((ct, zeros))

    z1, upd1, g1 = forward_and_grads(ours)
    z2, upd2, g2 = forward_and_grads(theirs)
    np.testing.assert_allclose(z1, z2, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(upd1), jax.tree.leaves(upd2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_linen_inplace_and_frozen_and_one_value():
    x, _, ct = _data(shape=(32, 5))
    flax_bn = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    variables = flax_bn.init(jax.random.key(0), x)
    ref = lambda v, x_: nn.leaky_relu(flax_bn.apply(v, x_, mutable=["batch_stats"])[0], 0.2)  # noqa: E731
    ours_bn = jaxbn.linen.BatchNorm(
        use_running_average=False, activation="leaky_relu", negative_slope=0.2, inplace=True
    )
    ours = lambda v, x_: ours_bn.apply(v, x_, mutable=["batch_stats"])[0]  # noqa: E731
    z1, pb1 = jax.vjp(ours, variables, x)
    z2, pb2 = jax.vjp(ref, variables, x)
    np.testing.assert_allclose(z1, z2, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pb1(ct)), jax.tree.leaves(pb2(ct))):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    # frozen: the stored statistics, then the activation
    stats = {"mean": jnp.arange(5.0), "var": jnp.linspace(0.5, 2.0, 5)}
    v = {**variables, "batch_stats": stats}
    frozen = jaxbn.linen.BatchNorm(True, frozen=True, activation="relu").apply(v, x)
    expected = nn.relu(nn.BatchNorm(use_running_average=True).apply(v, x))
    np.testing.assert_allclose(frozen, expected, atol=1e-5, rtol=1e-5)
    # one example per feature (init with one example): Flax's rule, then the activation
    one = x[:1]
    z, upd = ours_bn.apply(variables, one, mutable=["batch_stats"])
    zf, updf = flax_bn.apply(variables, one, mutable=["batch_stats"])
    np.testing.assert_allclose(z, nn.leaky_relu(zf, 0.2), atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], updf["batch_stats"]["var"], atol=1e-6)


@pytest.mark.parametrize("act,with_residual", [CASES[1], CASES[2]])
def test_nnx_matches_flax_batchnorm_then_activation(act, with_residual):
    x, r, ct = _data(seed=3)
    r = r if with_residual else None
    ours = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), activation=act, negative_slope=0.2)
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0), use_fast_variance=False)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))

    def grads(module, call):
        graphdef, state = nnx.split(module)

        def f(state, x_, r_):
            m = nnx.merge(graphdef, state)
            return call(m, x_, r_), nnx.state(m, nnx.BatchStat)

        (z, stats), pullback = jax.vjp(f, state, x, r)
        return z, stats, pullback((ct, jax.tree.map(jnp.zeros_like, stats)))

    z1, s1, g1 = grads(ours, lambda m, x_, r_: m(x_, residual=r_))
    z2, s2, g2 = grads(theirs, lambda m, x_, r_: ACTS[act](m(x_) if r_ is None else m(x_) + r_))
    np.testing.assert_allclose(z1, z2, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    ours.eval()
    theirs.eval()
    np.testing.assert_allclose(
        ours(x, residual=r), ACTS[act](theirs(x) if r is None else theirs(x) + r), atol=2e-5
    )


def test_activation_errors():
    x = jnp.ones((8, 3))
    bn = jaxbn.linen.BatchNorm(use_running_average=False, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        bn.init(jax.random.key(0), x)
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), activation="relu")
    with pytest.raises(ValueError, match="residual has shape"):
        bn(x, residual=jnp.ones((8, 1)))
