"""jaxbn's functions as the feature files call them: jitted once per shape and options.

``use_clean_program`` and ``enable_x64`` are in jit's cache key. Run eagerly, every call
would dispatch, and first compile, each op on its own.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

STATIC = ("training", "axis", "momentum", "eps", "unbiased_running_var", "custom_vjp")
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=STATIC)


@functools.partial(jax.jit, static_argnames="axis")
def train(x, gamma=None, beta=None, axis=-1, **kw):
    """One training step from init_state with momentum 0: the new state is the batch's."""
    fshape = tuple(jnp.shape(x)[a] for a in np.atleast_1d(axis))
    state = jaxbn.init_state(fshape if len(fshape) > 1 else fshape[0])
    return jaxbn.batch_norm(x, gamma, beta, state, training=True, axis=axis, momentum=0.0, **kw)
