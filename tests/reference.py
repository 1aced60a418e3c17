"""Oracles that share no code with jaxbn (plain-jnp batch norm for ``jax.vjp``, float64
NumPy statistics and forward, ``rel_err``), and the suite's seeded test data
(``randn``, ``affine``, ``problem``)."""

import jax
import jax.numpy as jnp
import numpy as np


def reduce_axes(ndim, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    axes = {a % ndim for a in axes}
    return tuple(i for i in range(ndim) if i not in axes)


def bn_ref(x, gamma, beta, axis=-1, eps=1e-5, mask=None):
    """Textbook two-pass batch norm in plain jnp; returns (y, mean, var)."""
    red = reduce_axes(x.ndim, axis)
    keep = [1 if i in red else s for i, s in enumerate(x.shape)]
    if mask is None:
        mean = jnp.mean(x, red, keepdims=True)
        var = jnp.mean((x - mean) ** 2, red, keepdims=True)
    else:
        m = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
        n = jnp.sum(m, red, keepdims=True)
        mean = jnp.sum(m * x, red, keepdims=True) / n
        var = jnp.sum(m * (x - mean) ** 2, red, keepdims=True) / n
    y = (x - mean) / jnp.sqrt(var + eps)
    if gamma is not None:
        y = y * jnp.reshape(gamma, keep)
    if beta is not None:
        y = y + jnp.reshape(beta, keep)
    fshape = [s for i, s in enumerate(x.shape) if i not in red]
    return y, jnp.reshape(mean, fshape), jnp.reshape(var, fshape)


def np_stats(x, axis=-1, mask=None):
    """Float64 NumPy mean and biased variance over the non-feature axes."""
    x = np.asarray(x, np.float64)
    red = reduce_axes(x.ndim, axis)
    if mask is None:
        return x.mean(red), x.var(red)
    m = np.broadcast_to(np.asarray(mask), x.shape).astype(np.float64)
    n = m.sum(red)
    mean = (m * x).sum(red) / n
    keep = np.expand_dims(mean, red)
    return mean, (m * (x - keep) ** 2).sum(red) / n


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def vjp_jit(f, primals, cotangents):
    """``(f(*primals), vjp(cotangents))`` as one jitted program.

    Most of the suite's time is XLA compiling: run eagerly, a vjp compiles every
    primitive on its own (seconds per case); jitted, each case compiles once.
    """

    def run(primals, cotangents):
        out, pullback = jax.vjp(f, *primals)
        return out, pullback(cotangents)

    return jax.jit(run)(primals, cotangents)


def np_batch_norm(x, gamma=None, beta=None, axis=-1, eps=1e-5, mask=None):
    """Float64 NumPy batch norm: ``(y, mean, var)`` with the biased batch variance."""
    x = np.asarray(x, np.float64)
    red = reduce_axes(x.ndim, axis)
    mean, var = np_stats(x, axis, mask)
    keep = lambda v: np.expand_dims(np.asarray(v, np.float64), red)  # noqa: E731
    y = (x - keep(mean)) / np.sqrt(keep(var) + eps)
    if gamma is not None:
        y = y * keep(gamma)
    if beta is not None:
        y = y + keep(beta)
    return y, mean, var


def randn(shape, *, seed=0, scale=1.0, offset=0.0, dtype=np.float32):
    """Seeded test data: ``offset + scale * N(0, 1)`` of ``shape``, as a jnp array."""
    return jnp.asarray(np.random.RandomState(seed).randn(*shape) * scale + offset, dtype)


def affine(features, *, seed=0, dtype=np.float32):
    """Seeded ``(gamma, beta)`` of shape ``features``: gamma in [0.5, 1.5), beta N(0, 1)."""
    rs = np.random.RandomState(seed)
    shape = (features,) if isinstance(features, int) else tuple(features)
    return jnp.asarray(rs.rand(*shape) + 0.5, dtype), jnp.asarray(rs.randn(*shape), dtype)


def problem(shape, axis=-1, *, seed=0, dtype=np.float32, scale=2.0, offset=1.0):
    """Seeded ``(x, gamma, beta, cotangent)`` for a batch norm over ``axis``: ``x`` is
    ``offset + scale * N(0, 1)``, the cotangent ``N(0, 1)`` of x's shape."""
    red = reduce_axes(len(shape), axis)
    features = tuple(s for i, s in enumerate(shape) if i not in red)
    x = randn(shape, seed=seed, scale=scale, offset=offset, dtype=dtype)
    gamma, beta = affine(features, seed=seed + 1, dtype=dtype)
    return x, gamma, beta, randn(shape, seed=seed + 2, dtype=dtype)


def y_ref(x, mask=None):
    """Float64 NumPy ``(x - mean) / sqrt(var + eps)`` and the batch variance."""
    y, _, var = np_batch_norm(x, mask=mask)
    return y, var
