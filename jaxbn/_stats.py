"""Batch statistics: a stable, count-weighted mean and biased variance.

Two algorithms, chosen at run time by ``lax.cond`` (all features together):

Fast (one read of ``x`` per sum, no broadcast; flax's cost)::

    mean = sum(x) / n,   msq = sum(x * x) / n,   var = msq - mean ** 2

taken when every feature has ``msq <= K * var`` (``K = 16``, i.e. ``|mean| <= 3.9
std``) and a finite ``var``. The cancellation then costs at most ``2K + 1`` times the
sums' own relative error (about 1e-7 in float32), so var is within ~5e-6, and the
mean within 1e-7 * sqrt(K) std; an all-zero feature gives exactly 0 and 0.

Shifted (everything else: large offsets, constant features, overflow, NaN): the
corrected two-pass algorithm (Chan, Golub and LeVeque, 1983) on data shifted by
``shift``, one value of the batch per feature (its first)::

    d0    = sum(x - shift) / n                   # pass 1
    c     = (x - shift) - d0                     # pass 2 ...
    delta = d0 + sum(c) / n                      #   ... and its two sums
    var   = sum(c * c) / n - (sum(c) / n) ** 2   # clamped at 0
    mean  = shift + delta

- ``x - shift`` is exact (Sterbenz) while x and shift are within 2x of each other,
  so a large common offset (|mean| = 1e6 * std in float32) costs nothing; the mean
  stays the pair ``(shift, delta)`` and ``x - mean`` is computed as
  ``(x - shift) - delta``: rounding ``mean`` to float32 alone would be off by 0.03 std.
- A constant feature gives ``x - shift == 0`` exactly, hence var == 0, delta == 0
  and an output of exactly ``beta``.
- Each sum is of ``v / N`` (N the static local size) and rescaled afterwards, so no
  sum overflows when its terms do not.

Why two: on XLA:CPU the fast sums are each one fused reduction of ``x``, while every
sum of ``x - shift`` costs 1.5-3x as much, and a broadcast shared by two
reductions is written out in full (hence the ``optimization_barrier`` copies).
Always shifting made the training forward 1.3-2.5x flax's; checking costs
nothing, and flax's default (the fast formula everywhere) loses ~(mean/std)^2 * 6e-8
relative instead.

Across devices the sums and the counts are psum'd, so devices with unequal numbers
of masked-in values are weighted exactly; every device takes the same branch (a
psum'd flag), and the shift is the first device's, taken exactly with a psum of one
value and zeros. Under ``vmap`` the ``cond`` becomes a select of both branches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

FAST_LIMIT = 16.0  # K: the fast formula only where msq <= K * var, see above.


class Moments(NamedTuple):
    """Batch statistics with the mean split in two for an exact ``x - mean``."""

    shift: jax.Array  # feature shape: a value of the batch per feature, or the mean.
    delta: jax.Array  # feature shape: mean - shift (zeros from the fast formula).
    var: jax.Array  # feature shape: biased variance, >= 0.
    count: jax.Array  # () or feature shape: values counted, over all devices.

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.delta


def compute_dtype(dtype) -> jnp.dtype:
    """Statistics and arithmetic happen in at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def expand(v, ndim: int, feature_axes: tuple[int, ...]):
    """Reshapes a feature-shaped array to broadcast against ``x`` (no transpose)."""
    if v is None or jnp.ndim(v) == 0:
        return v
    shape = [1] * ndim
    for a, d in zip(feature_axes, jnp.shape(v)):
        shape[a] = d
    return jnp.reshape(v, shape)


def psum(tree, axis_name, axis_index_groups):
    if axis_name is None:
        return tree
    return lax.psum(tree, axis_name, axis_index_groups=axis_index_groups)


def _from_first_device(v, axis_name, axis_index_groups):
    """Every device gets the first device's ``v`` (of its group), bit for bit."""
    if axis_name is None:
        return v
    leaders = [0] if axis_index_groups is None else [g[0] for g in axis_index_groups]
    lead = jnp.isin(lax.axis_index(axis_name), jnp.asarray(leaders))
    return psum(jnp.where(lead, v, 0), axis_name, axis_index_groups)


def _copies(v, k: int):
    """``k`` equal values that XLA will not merge, so each reduction fuses its own."""
    return lax.optimization_barrier((v,) * k) if v is not None else (None,) * k


def _masked(v, m):
    return v if m is None else jnp.where(m, v, 0)


def moments(x, feature_axes, mask=None, axis_name=None, axis_index_groups=None) -> Moments:
    """Mean and biased variance of ``x`` over every axis but ``feature_axes``.

    Args:
      x: any shape; ``feature_axes`` are kept, the others are reduced.
      feature_axes: sorted, non-negative ints.
      mask: None or boolean broadcastable to ``x``: the values that count.
      axis_name: None or a named axis whose devices hold parts of one batch.
      axis_index_groups: passed to ``lax.psum``.

    Returns:
      :class:`Moments` in ``compute_dtype(x.dtype)``.
    """
    dt = compute_dtype(x.dtype)
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    sync = lambda t: psum(t, axis_name, axis_index_groups)  # noqa: E731
    feat = lambda v: jnp.reshape(v, [x.shape[a] for a in feature_axes])  # noqa: E731

    xf = x.astype(dt)
    m = None if mask is None else jnp.broadcast_to(mask, x.shape)
    if m is None:
        n = sync(jnp.asarray(math.prod(x.shape[a] for a in red), dt))
    else:
        n = sync(jnp.sum(m, red, dtype=dt))
    n1 = jnp.maximum(n, 1)
    m1, m2 = _copies(m, 2)
    x1, x2 = _masked(xf, m1), _masked(xf, m2)
    s1, s2 = sync((jnp.sum(x1, red), jnp.sum(x2 * x2, red)))
    mean, msq = s1 / n1, s2 / n1
    var = msq - mean * mean
    fast = jnp.all(jnp.isfinite(var) & (msq <= FAST_LIMIT * var))
    if axis_name is not None:  # the shifted branch has collectives: all devices agree
        fast = lax.psum(jnp.where(fast, 0, 1), axis_name) == 0

    def fast_moments():
        return Moments(feat(mean), jnp.zeros_like(feat(mean)), feat(jnp.maximum(var, 0)), n)

    def shifted_moments():
        return _shifted(xf, m, n, feature_axes, axis_name, axis_index_groups)

    return lax.cond(fast, fast_moments, shifted_moments)


def _shifted(xf, m, n, feature_axes, axis_name, axis_index_groups) -> Moments:
    """The corrected two-pass algorithm around the batch's first value (see above)."""
    red = tuple(a for a in range(xf.ndim) if a not in feature_axes)
    first = tuple(slice(0, 1) if a in red else slice(None) for a in range(xf.ndim))
    size = math.prod(xf.shape[a] for a in red)
    sync = lambda t: psum(t, axis_name, axis_index_groups)  # noqa: E731
    shift = xf[first]
    if m is not None:
        # a masked-out value may be anything, even inf: never use it as the shift.
        shift = jnp.where(m[first], shift, 0)
    shift = _from_first_device(shift, axis_name, axis_index_groups)
    scale = size / jnp.maximum(n, 1)

    sh0, sh1, sh2 = _copies(shift, 3)
    m0, m1, m2 = _copies(m, 3)
    i0, i1, i2 = _copies(jnp.asarray(1.0 / size, xf.dtype), 3)
    d0 = sync(jnp.sum(_masked(xf - sh0, m0) * i0, red)) * scale
    e1, e2 = _copies(expand(d0, xf.ndim, feature_axes), 2)
    c1 = _masked((xf - sh1) - e1, m1)
    c2 = _masked((xf - sh2) - e2, m2)
    s1, s2 = sync((jnp.sum(c1 * i1, red), jnp.sum(c2 * c2 * i2, red)))
    s1, s2 = s1 * scale, s2 * scale
    var = jnp.maximum(s2 - s1 * s1, 0)
    feat = lambda v: jnp.reshape(v, [xf.shape[a] for a in feature_axes])  # noqa: E731
    return Moments(feat(shift), d0 + s1, var, n)
