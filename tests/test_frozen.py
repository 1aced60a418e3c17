"""Frozen batch norm (jaxbn.frozen_batch_norm, frozen=True on the modules): eval mode's
fixed affine map, with no gradient to the statistics (nor to gamma and beta unless
trainable), and no input-sized residual."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from reference import problem, rel_err, vjp_jit

import jaxbn
import jaxbn.linen
import jaxbn.nnx


def frozen_problem():
    x, gamma, beta, ct = problem((16, 4, 4, 5))
    rs = np.random.RandomState(3)
    state = jaxbn.BatchNormState(
        jnp.asarray(rs.randn(5), jnp.float32),
        jnp.asarray(rs.rand(5) + 0.5, jnp.float32),
        jnp.asarray(9, jnp.int32),
    )
    return x, gamma, beta, ct, state


def test_frozen_equals_eval_mode_and_gradients():
    x, gamma, beta, ct, state = frozen_problem()
    y_eval, grads_eval = vjp_jit(
        lambda x, g, b: jaxbn.batch_norm(x, g, b, state, training=False)[0], (x, gamma, beta), ct
    )
    y, grads = vjp_jit(
        lambda x, g, b: jaxbn.frozen_batch_norm(x, g, b, state, trainable=True),
        (x, gamma, beta),
        ct,
    )
    assert rel_err(y, y_eval) == 0
    for a, b in zip(grads, grads_eval):
        assert rel_err(a, b) < 1e-6
    frozen = lambda x, g, b: jaxbn.frozen_batch_norm(x, g, b, state)  # noqa: E731
    _, (dx, dg, db) = vjp_jit(frozen, (x, gamma, beta), ct)
    assert rel_err(dx, grads_eval[0]) < 1e-6
    assert not np.any(np.asarray(dg)) and not np.any(np.asarray(db))


def test_frozen_state_gets_no_gradient():
    x, gamma, beta, ct, state = frozen_problem()
    f = lambda m, v: jnp.sum(
        jaxbn.frozen_batch_norm(x, gamma, beta, state._replace(mean=m, var=v)) * ct
    )  # noqa: E731
    dm, dv = jax.jit(jax.grad(f, (0, 1)))(state.mean, state.var)
    assert not np.any(np.asarray(dm)) and not np.any(np.asarray(dv))


def test_frozen_backward_keeps_no_input_sized_residual():
    x, gamma, beta, _, state = frozen_problem()

    def full_size_residuals(f):
        _, vjp = jax.vjp(f, x)
        return [
            leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "size") and leaf.size == x.size
        ]

    assert full_size_residuals(lambda x: jaxbn.frozen_batch_norm(x, gamma, beta, state)) == []
    trainable = lambda x, g, b: jaxbn.frozen_batch_norm(x, g, b, state, trainable=True)  # noqa: E731
    _, vjp = jax.vjp(trainable, x, gamma, beta)  # dgamma needs x: one input-sized residual
    assert [leaf.size for leaf in jax.tree.leaves(vjp) if getattr(leaf, "size", 0) == x.size]


# --- frozen=True on the Flax modules ---------------------------------------------------


def test_linen_frozen_is_a_fixed_affine_map_without_gradients_for_its_params():
    x = jnp.asarray(np.random.RandomState(1).randn(8, 4, 4, 3) + 2, jnp.float32)

    class Net(nn.Module):
        frozen: bool

        @nn.compact
        def __call__(self, x):
            return jaxbn.linen.BatchNorm(use_running_average=False, frozen=self.frozen)(x)

    variables = Net(True).init(jax.random.key(0), x)
    mean, var = jnp.full(3, 2.0), jnp.full(3, 0.5)
    stats = {"BatchNorm_0": {"mean": mean, "var": var}}
    variables = {"params": variables["params"], "batch_stats": stats}
    y = Net(True).apply(variables, x)  # no mutable collection needed: nothing updates
    y_eval, _ = jaxbn.batch_norm(
        x,
        jnp.ones(3),
        jnp.zeros(3),
        jaxbn.BatchNormState(mean, var, jnp.asarray(0)),
        training=False,
    )
    assert rel_err(y, y_eval) == 0
    grads = jax.jit(
        jax.grad(lambda p: jnp.sum(Net(True).apply({"params": p, "batch_stats": stats}, x) ** 2))
    )(variables["params"])
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(grads))


def test_nnx_frozen_keeps_its_statistics_in_training():
    bn = jaxbn.nnx.BatchNorm(3, frozen=True, rngs=nnx.Rngs(0))
    bn.train()
    x = jnp.asarray(np.random.RandomState(2).randn(8, 3) + 5, jnp.float32)
    y = bn(x)
    assert float(bn.mean[...].sum()) == 0.0 and float(bn.var[...].sum()) == 3.0
    assert rel_err(y, x / np.sqrt(1 + 1e-5)) < 1e-6
