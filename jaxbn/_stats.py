"""Batch statistics: a stable, count-weighted mean and biased variance.

The variance is the corrected two-pass algorithm (Chan, Golub and LeVeque, 1983) on
data shifted by ``shift``, one value of the batch per feature (its first):

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
- E[x^2] - E[x]^2 (flax's default) loses ~(mean/std)^2 * 6e-8 relative instead.
- Each sum is of ``v / N`` (N the static local size) and rescaled afterwards, so no
  sum overflows when its terms do not.
- Across devices the sums and the counts are psum'd, so devices with unequal
  numbers of masked-in values are weighted exactly; the shift is the first
  device's, taken exactly with a psum of one value and zeros.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Moments(NamedTuple):
    """Batch statistics with the mean split in two for an exact ``x - mean``."""

    shift: jax.Array  # feature shape: one value of the batch per feature.
    delta: jax.Array  # feature shape: mean - shift.
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
    first = tuple(slice(0, 1) if a in red else slice(None) for a in range(x.ndim))
    size = math.prod(x.shape[a] for a in red)
    inv = 1.0 / size
    sync = lambda t: psum(t, axis_name, axis_index_groups)  # noqa: E731
    feat = lambda v: jnp.reshape(v, [x.shape[a] for a in feature_axes])  # noqa: E731

    xf = x.astype(dt)
    shift = xf[first]
    if mask is None:
        m = None
        n = sync(jnp.asarray(size, dt))
    else:
        m = jnp.broadcast_to(mask, x.shape)
        # a masked-out value may be anything, even inf: never use it as the shift.
        shift = jnp.where(m[first], shift, 0)
        n = sync(jnp.sum(m, red, dtype=dt))
    shift = _from_first_device(shift, axis_name, axis_index_groups)
    scale = size / jnp.maximum(n, 1)

    xs = xf - shift
    if m is not None:
        xs = jnp.where(m, xs, 0)
    d0 = sync(jnp.sum(xs * inv, red)) * scale
    c = xs - expand(d0, x.ndim, feature_axes)
    if m is not None:
        c = jnp.where(m, c, 0)
    s1, s2 = sync((jnp.sum(c * inv, red), jnp.sum(c * c * inv, red)))
    s1, s2 = s1 * scale, s2 * scale
    var = jnp.maximum(s2 - s1 * s1, 0)
    return Moments(feat(shift), d0 + s1, var, n)
