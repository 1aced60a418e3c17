"""Batch statistics: a stable, count-weighted mean and biased variance.

Two algorithms, picked at run time for all features at once by ``lax.cond``.

Fast, where it is provably accurate: two plain sums, each one fused read of ``x``
(flax's formula and flax's cost)::

    mean = sum(x) / n,   msq = sum(x * x) / n,   var = msq - mean ** 2

taken only if every feature has a finite ``var`` and ``msq <= K * var`` (``K = 16``,
i.e. ``|mean| <= 3.9 std``). The cancellation then multiplies the sums' own relative
error (~1.5e-7 in float32 on XLA:CPU) by at most ``2K + 1``: var within 6e-6 at the
limit (measured), the mean within 1e-6 std. An all-zero feature gives exactly 0, 0.

Shifted, otherwise (larger offsets, constant features, overflow, NaN): the corrected
two-pass algorithm (Chan, Golub and LeVeque, 1983) on data shifted by ``s``, one value
of the batch per feature (its first)::

    d0  = sum(x - s) / n                     # pass 1
    c   = (x - s) - d0                       # pass 2 ...
    d   = d0 + sum(c) / n                    #   ... and its two sums: mean = s + d
    var = sum(c * c) / n - (sum(c) / n) ** 2   # clamped at 0

- ``x - s`` is exact (Sterbenz) while x and s are within 2x of each other, so a large
  common offset (|mean| = 1e6 * std in float32) costs nothing.
- A constant feature gives ``x - s == 0`` exactly, hence var == 0 and d == 0.
- Each sum is of ``v / N`` (N the static local size) and rescaled afterwards, so no
  sum overflows when its terms do not.

Either way the mean comes as a pair: ``shift``, the mean rounded to the compute
dtype, and ``delta``, its exact rounding error (TwoSum of ``s + d``; 0 from the fast
formula), so ``|delta| <= ulp(mean) / 2`` for a finite mean. ``x - mean`` is
``(x - shift) - delta``: rounding the mean alone would be off by 0.03 std at a 1e6
offset, and a constant feature still gives exactly 0, hence an output of exactly
``beta``. As ``delta`` is that small, a sum of ``x - mean`` can also be taken as a sum
of ``x - shift`` corrected afterwards, with no cancellation.

Why two: on XLA:CPU (jax 0.10) a sum of ``x`` or ``x * x`` is one fused reduction, a
sum of ``x - s`` costs 1.5-3x as much, and a broadcast, conversion or subexpression
that two fusions share is written out in full (hence the ``optimization_barrier``
copies). The shifted algorithm alone made the training forward 2.4-4.3x flax's; with
the check it costs what flax's does (``python -m jaxbn bench``), and 1.7-3x where the
shifted branch runs, while flax's default (the fast formula everywhere) then loses
~(mean/std)^2 * 6e-8 relative.

Across devices the sums and the counts are psum'd, so devices with unequal numbers
of masked-in values are weighted exactly; every device takes the same branch (a
psum'd flag), and ``s`` is the first device's, taken exactly with a psum of one value
and zeros. Under ``vmap`` the ``cond`` becomes a select of both branches.
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

    shift: jax.Array  # feature shape: the mean, rounded.
    delta: jax.Array  # feature shape: mean - shift, |delta| <= ulp(shift) / 2.
    var: jax.Array  # feature shape: biased variance, >= 0.
    count: jax.Array  # type: ignore[assignment]  # () or feature shape: values counted, over all devices.

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


def _copies(tree, k: int):
    """``k`` equal copies that XLA will not merge, so each reduction fuses its own.

    XLA:CPU writes out in full a broadcast, a conversion or a subexpression that two
    fusions share; an ``optimization_barrier`` costs nothing at run time.
    """
    return lax.optimization_barrier((tree,) * k)


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

    m = None if mask is None else jnp.broadcast_to(mask, x.shape)
    if m is None:
        n = sync(jnp.asarray(math.prod(x.shape[a] for a in red), dt))
    else:
        n = sync(jnp.sum(m, red, dtype=dt))
    n1 = jnp.maximum(n, 1)
    (x1, m1), (x2, m2) = _copies((x, m), 2)
    x1, x2 = _masked(x1.astype(dt), m1), _masked(x2.astype(dt), m2)
    s1, s2 = sync((jnp.sum(x1, red), jnp.sum(x2 * x2, red)))
    mean, msq = s1 / n1, s2 / n1
    var = msq - mean * mean
    fast = jnp.all(jnp.isfinite(var) & (msq <= FAST_LIMIT * var))
    if axis_name is not None:  # the shifted branch has collectives: all devices agree
        fast = lax.psum(jnp.where(fast, 0, 1), axis_name) == 0

    def fast_moments():
        return Moments(feat(mean), jnp.zeros_like(feat(mean)), feat(jnp.maximum(var, 0)), n)

    def shifted_moments():
        return _shifted(x, m, n, feature_axes, axis_name, axis_index_groups)

    return lax.cond(fast, fast_moments, shifted_moments)


def _shifted(x, m, n, feature_axes, axis_name, axis_index_groups) -> Moments:
    """The corrected two-pass algorithm around the batch's first values (see above)."""
    dt = compute_dtype(x.dtype)
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    first = tuple(slice(0, 1) if a in red else slice(None) for a in range(x.ndim))
    size = math.prod(x.shape[a] for a in red)
    sync = lambda t: psum(t, axis_name, axis_index_groups)  # noqa: E731
    shift = x[first].astype(dt)
    if m is not None:
        # a masked-out value may be anything, even inf: never use it as the shift.
        shift = jnp.where(m[first], shift, 0)
    shift = _from_first_device(shift, axis_name, axis_index_groups)
    scale = size / jnp.maximum(n, 1)

    copies = _copies((x, m, shift, jnp.asarray(1.0 / size, dt)), 3)
    (x0, m0, sh0, i0), (x1, m1, sh1, i1), (x2, m2, sh2, i2) = copies
    d0 = sync(jnp.sum(_masked(x0.astype(dt) - sh0, m0) * i0, red)) * scale
    e1, e2 = _copies(expand(d0, x.ndim, feature_axes), 2)
    c1 = _masked((x1.astype(dt) - sh1) - e1, m1)
    c2 = _masked((x2.astype(dt) - sh2) - e2, m2)
    s1, s2 = sync((jnp.sum(c1 * i1, red), jnp.sum(c2 * c2 * i2, red)))
    s1, s2 = s1 * scale, s2 * scale
    var = jnp.maximum(s2 - s1 * s1, 0)
    feat = lambda v: jnp.reshape(v, [x.shape[a] for a in feature_axes])  # noqa: E731
    shift, delta = feat(shift), d0 + s1
    # TwoSum: the rounded mean and its exact rounding error, as the fast branch gives.
    mean = shift + delta
    back = mean - shift
    err = (shift - (mean - back)) + (delta - back)
    ok = jnp.isfinite(mean)
    return Moments(jnp.where(ok, mean, shift), jnp.where(ok, err, delta), var, n)
