"""A user's script, type-checked by ``tests/test_typing.py``.

It calls the README's API the way a user would; ``assert_type`` fails under mypy and
pyright unless the public functions' annotations carry the returned types through.
(pytest's doctest collection imports it too, so it must also run.)
"""

from typing import assert_type

import jax
import jax.numpy as jnp

import jaxbn

x = jax.random.normal(jax.random.key(0), (32, 64, 8, 8))
gamma, beta = jnp.ones(64), jnp.zeros(64)
state = jaxbn.init_state(64)
assert_type(state, jaxbn.BatchNormState)

out = jaxbn.batch_norm(x, gamma, beta, state, training=True, axis=1)
assert_type(out, tuple[jax.Array, jaxbn.BatchNormState])
y, state = out
y, state = jaxbn.batch_norm(y, None, None, state, training=False, axis=1, momentum=None)
x4 = jnp.ones((16, 10, 8, 64))
y4, s4 = jaxbn.batch_norm(x4, None, None, jaxbn.init_state((8, 64)), training=True, axis=(2, 3))
assert_type(s4.mean, jax.Array)

frozen = jaxbn.frozen_batch_norm(x, gamma, beta, state, axis=1)
assert_type(frozen, jax.Array)

(y2, mean, var, count), res = jaxbn.batch_norm_fwd(x, gamma, beta, axis=1)
assert_type(y2, jax.Array)
assert_type(res, jaxbn.BatchNormResiduals)
dx, dgamma, dbeta = jaxbn.batch_norm_bwd(res, jnp.ones_like(x), axis=1)
assert_type(dx, jax.Array)
assert_type(dgamma, jax.Array | None)


def loss(params: dict[str, jax.Array], state: jaxbn.BatchNormState) -> jax.Array:
    h, _ = jaxbn.batch_norm(x, params["gamma"], params["beta"], state, training=True, axis=1)
    return jnp.mean(h**2)


grads = jax.grad(loss)({"gamma": gamma, "beta": beta}, state)
