"""XLA:CPU tactics: the same computations as ``jaxbn._stats``, shaped for XLA:CPU.

Only CPU runs these (``jaxbn._platform`` decides). They exist because of three facts
about XLA:CPU (jax 0.10, measured with ``python benchmarks/cpu_bench.py``):

- a sum of ``x`` or ``x * x`` is one fast fused reduction, but a broadcast subtract
  inside a reduction (a sum of ``x - s``) costs 1.5-3x as much, and a variadic
  reduce about 3x as much as separate sums;
- a broadcast, conversion or subexpression that two fusions share is written out in
  full, so each reduction gets its own copies of its inputs behind an
  ``optimization_barrier`` (free at run time);
- a ``lax.cond`` on a flag costs nothing next to a pass over ``x``.

Statistics. Flax's two sums (``s = 0`` in ``jaxbn._stats``) where that is provably
accurate: every feature has a finite ``var`` and ``msq <= K * var`` (``K = 16``,
i.e. ``|mean| <= 3.9 std``). The error bound of ``jaxbn._stats`` is then at most
``4 g (1 + 16)``: var within 6e-6 at the limit (measured). Otherwise (offsets,
constant features, overflow, NaN), a ``cond`` runs the clean algorithm, its two sums
as separate reductions. Every device takes the same branch (a psum'd flag).

Backward. ``S2 = sum(dy * x) - mean * S1`` where every feature has
``|mean| <= 4 std``: the rounding error is then a few ulp of
``sum(|dy| * (|xc| + |mean|))`` instead of ``sum(|dy| * |xc|)``; ``dx`` takes ``S2`` as
``k1 * xc``, ``k1 = -a * rstd**2 * S2 / n``, so its error stays a small multiple of
``ulp(a * |dy|)`` (float32: 8e-7 relative at 3.9 std, 2e-7 for the shifted sum).
Elsewhere, or with NaN, the shifted sum of ``jaxbn._stats``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from jaxbn import _stats
from jaxbn._compat import vary_like
from jaxbn._stats import Moments, compute_dtype, expand, psum, reduced_axes

FAST_LIMIT = 16.0  # K: the fast statistics only where msq <= K * var.
BWD_LIMIT = 16.0  # S2 = sum(dy * x) - mean * S1 only where every mean**2 * rstd**2 <= this.


def copies(tree, k: int):
    """``k`` equal copies that XLA will not merge, so each reduction fuses its own."""
    return lax.optimization_barrier((tree,) * k)


def _masked(v, m):
    return v if m is None else jnp.where(m, v, 0)


def cond(pred, true_fn, false_fn, *operands):
    """``lax.cond`` with its operands passed, not closed over, and marked varying like
    ``pred`` first (:func:`jaxbn._compat.vary_like`)."""
    return lax.cond(pred, true_fn, false_fn, *(vary_like(v, pred) for v in operands))


def moments(x, m, feature_axes, axis_name=None, axis_index_groups=None) -> Moments:
    """:func:`jaxbn._stats.moments`, computed as XLA:CPU runs fastest (see above)."""
    dt = compute_dtype(x.dtype)
    red = reduced_axes(x.ndim, feature_axes)
    fshape = tuple(x.shape[a] for a in feature_axes)
    n = _stats.count_of(x, m, feature_axes, axis_name, axis_index_groups)
    n1 = jnp.maximum(n, 1).astype(_stats.real_dtype(dt))
    (x1, m1), (x2, m2) = copies((x, m), 2)
    x1, x2 = _masked(x1.astype(dt), m1), _masked(x2.astype(dt), m2)
    s1, s2 = psum((jnp.sum(x1, red), jnp.sum(_stats.abs2(x2), red)), axis_name, axis_index_groups)
    mean, msq = jnp.reshape(s1, fshape) / n1, jnp.reshape(s2, fshape) / n1
    var = msq - _stats.abs2(mean)
    fast = jnp.all(jnp.isfinite(var) & (msq <= FAST_LIMIT * var))
    if axis_name is not None:  # the shifted branch has collectives: all devices agree
        fast = lax.psum(jnp.where(fast, 0, 1), axis_name) == 0

    def fast_moments(x, m, mean, var, n):
        return mean, jnp.zeros_like(mean), jnp.maximum(var, 0)

    def shifted_moments(x, m, mean, var, n):  # the clean program's sums, each its own pass
        s = _stats.shift_of(x, m, feature_axes, axis_name, axis_index_groups)
        parts = copies((x, m, s), 2)
        sums = tuple(
            jnp.reshape(jnp.sum(_stats.stat_operands(xi, mi, si, feature_axes)[i], red), fshape)
            for i, (xi, mi, si) in enumerate(parts)
        )
        sums = psum(sums, axis_name, axis_index_groups)
        return _stats.combine(sums, s, n, _stats.reduced_size(x, feature_axes))[:3]

    # n stays out of the cond's outputs: its type is the clean form's (jaxbn._platform)
    shift, delta, var = cond(fast, fast_moments, shifted_moments, x, m, mean, var, n)
    return Moments(shift, delta, var, n)


def sum_dy_xc(dy, x, shift, delta, rstd, s_dy, feature_axes):
    """S2 = sum(dy * xc) of this device, from ``sum(dy * x)`` where that is accurate."""
    red = reduced_axes(x.ndim, feature_axes)
    mean = shift + delta
    small = jnp.all(mean * mean * (rstd * rstd) <= BWD_LIMIT)
    dt = mean.dtype

    def unshifted(dy, x, shift, delta, s_dy):
        return jnp.sum(dy.astype(dt) * x.astype(dt), red) - (shift + delta) * s_dy

    def shifted(dy, x, shift, delta, s_dy):
        dyf, xf = dy.astype(dt), x.astype(dt)
        return jnp.sum(dyf * (xf - expand(shift, x.ndim, feature_axes)), red) - delta * s_dy

    return cond(small, unshifted, shifted, dy, x, shift, delta, s_dy)


def backward_sums(dy, x, shift, delta, rstd, feature_axes):
    """``(S1, S2)`` of this device, each sum over its own copies of its inputs."""
    (dy1, _, _), (dy2, x2, sh2) = copies((dy, x, shift), 2)
    delta, rstd = lax.optimization_barrier((delta, rstd))
    red = reduced_axes(x.ndim, feature_axes)
    s_dy = jnp.reshape(jnp.sum(dy1.astype(rstd.dtype), red), rstd.shape)
    return s_dy, jnp.reshape(sum_dy_xc(dy2, x2, sh2, delta, rstd, s_dy, feature_axes), rstd.shape)


def dx(dy, x, shift, a, k0, k1, mask, feature_axes):
    """``dx = a * dy + m * (k0 + k1 * (x - shift))``, one pass over its own copies of its
    inputs (the vectors too: a broadcast the forward's ``y`` pass shares is written out)."""
    dy, x, shift, a, k0, k1 = copies((dy, x, shift, a, k0, k1), 1)[0]
    dt = compute_dtype(x.dtype)
    e = functools.partial(expand, ndim=x.ndim, feature_axes=feature_axes)
    stat = e(k0) + (x.astype(dt) - e(shift)) * e(k1)
    if mask is not None:
        stat = jnp.where(mask, stat, 0)
    return (e(a) * dy.astype(dt) + stat).astype(x.dtype)
