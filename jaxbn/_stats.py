r"""Reductions over ``x``: the batch statistics and the backward's two sums.

This is the clean program, the one every platform but CPU runs (``jaxbn._platform``;
XLA:CPU's variants are in ``jaxbn._cpu``). Each computation reads ``x`` once, in one
``reduce`` of two operands: XLA:GPU fuses the elementwise work into it and emits one
kernel (with three or more operands it writes them out first: see :func:`variadic_sum`).

Statistics, per feature, over the ``n`` values that count (``m`` the mask as 0/1,
``N`` the reduced positions)::

    s   = a value of the batch that counts                    # the shift: see shift_of
    h   = m * (x / 2 - s / 2)                                 # (x - s) / 2, exact near s
    S1, S2 = sum(h / N), sum((h * 2 / sqrt(N))**2)            # one pass, one reduce
    d/2 = S1 * N / n,   msq = S2 * N / n                      # mean(x - s)/2, mean((x - s)**2)
    var = max(msq - d**2, 0)
    shift, delta = 2 * TwoSum(s / 2, d / 2)                   # mean = shift + delta

Error. With ``g`` the relative error of a float sum of ``n`` terms (``g <= n u``,
about ``u log2 n`` for XLA's tree reductions, ``u`` the unit roundoff), ``S2`` is
off by at most ``g S2`` (positive terms; the scalings by 1/2 and the rounded
``2 / sqrt(N)`` add ``3 u``) and ``S1`` by ``g sum(|h|)``. Since ``msq = var + d**2``::

    |err var| <= g (var + d**2) + 2 |d| g sqrt(var + d**2) + u d**2
              <= 4 g (var + d**2),   so   |err var| / var <= 4 g (1 + (mean - s)**2 / var)

The bound does not depend on ``|mean|``, only on how far the shift lies from the mean in
standard deviations: a value of the batch is a few of them away, and ``s`` is the median
of three (see :func:`shift_of`), so one outlier among them is never the shift. It grows
as ``(mean - s)**2 / var <= n - 1`` (Samuelson's inequality) only for a shift that is
itself an extreme outlier. Flax's formula (``s = 0``) has ``(mean / std)**2`` there
instead. Measured in float32 (4096 rows, offsets up to 1e6 std, a 3000-std first row):
within 3.4e-5 relative when XLA:CPU runs this program (its variadic reduce is one
sequential loop, ``g ~ sqrt(n) u``), 3.4e-7 for ``jaxbn._cpu``'s. ``mean`` is off by
``g sqrt(var + d**2)``, i.e. ``g`` standard deviations times the same factor, and
``x - mean`` is taken as ``(x - shift) - delta``: rounding the mean to one float alone
would be off by 0.03 std at a 1e6 offset. A constant feature gives ``h == 0`` exactly,
hence ``var == 0``, ``delta == 0`` and an output of exactly ``beta``.

Range. Every term is finite for finite ``x``: ``h`` is a difference of halves, and each
square is divided by ``N`` before it is summed, so ``S1`` and ``S2`` overflow only where
``|mean - s|`` or ``msq`` is beyond the dtype's range. Where ``msq`` overflows, ``var``
is ``inf`` and that feature's output is ``beta`` (never NaN). That loses the variance
only where ``msq = var + (mean - s)**2`` exceeds the range while ``var`` does not: with
``s`` a value of the batch, ``var > msq / n``, so within a factor ``n`` of the dtype's
maximum (above 3.4e38 / n in float32). An earlier form kept that band with a second pair
of sums of ``x * 2**-64``; a reduce of four operands is not fused by XLA:GPU for NHWC
and ``(N, D)`` (11 S instead of 3 S for a training forward), so the band was given up
for the common case's bytes. Squares below the smallest normal number
(``|x - s| < 1e-19 sqrt(N)`` in float32) round towards 0, as ``var + eps`` does anyway.

Across devices (``axis_name``), ``s`` is the value of the first device that holds one (a
``pmin`` and a ``psum`` of feature vectors), so one shift serves all, and the sums and
counts are psum'd: unequal per-device counts are weighted exactly. Counts are int32.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Moments(NamedTuple):
    """Batch statistics with the mean split in two for an exact ``x - mean``."""

    shift: jax.Array  # feature shape: the mean, rounded.
    delta: jax.Array  # feature shape: mean - shift, |delta| <= ulp(shift) / 2.
    var: jax.Array  # feature shape: biased variance, >= 0 (inf beyond the dtype's range).
    count: jax.Array  # type: ignore[assignment]  # int32, () or feature shape (masked): values counted.

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.delta


def compute_dtype(dtype) -> jnp.dtype:
    """Statistics and arithmetic happen in at least float32 (complex64 for complex x)."""
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
    """The variance's dtype: real, of the compute dtype's precision."""
    dt = compute_dtype(dtype)
    return jnp.finfo(dt).dtype if jnp.issubdtype(dt, jnp.complexfloating) else dt


def abs2(v):
    """``|v|**2``, real: ``v * v`` for real ``v``."""
    return v.real * v.real + v.imag * v.imag if jnp.iscomplexobj(v) else v * v


def _median3(a, b, c):
    if jnp.iscomplexobj(a):  # componentwise: one outlier among the three is never chosen
        return lax.complex(_median3(a.real, b.real, c.real), _median3(a.imag, b.imag, c.imag))
    return jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))


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


def reduced_axes(ndim: int, feature_axes) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in feature_axes)


def variadic_sum(operands, axes, split=False):
    """The sums of several same-shaped arrays over ``axes`` in one ``reduce`` (one kernel).

    ``split`` is XLA:GPU's tactic (``jaxbn._platform`` passes it for GPUs only). Where
    ``axes`` are the leading axes (features minor: NHWC, ``(N, D)``), the sum is a
    column reduction, and XLA:GPU fuses an elementwise producer that reads a
    per-feature vector (``x - s``, a mask) into one only when the reduced extent is split
    in two: unsplit, it writes the operands out and reads them back (measured on the
    compiled H100 program: 7 S instead of 3 S for a (4096, 1024) forward). XLA splits
    large extents itself; with ``split`` every one is, as ``(k, R / k)`` with ``k`` the
    largest divisor of ``R`` up to ``sqrt(R)``, summed over ``R / k`` and then over
    ``k`` (a pairwise step, which only lowers the rounding error). On a TPU the same
    reshape costs a relayout of ``x`` (XLA's cost analysis: 7 S instead of 3 S), so
    the other platforms sum in one step.
    """
    shape = jnp.shape(operands[0])
    lead = len(axes)
    static = all(isinstance(d, int) for d in shape)  # not under symbolic shapes (jax.export)
    static = split and static and not _explicitly_sharded(operands[0])  # JAX refuses that reshape
    k = _split(math.prod(shape[:lead])) if static and tuple(axes) == tuple(range(lead)) else 1
    if k > 1:
        r = math.prod(shape[:lead])
        ops = tuple(jnp.reshape(o, (k, r // k) + tuple(shape[lead:])) for o in operands)
        return _reduce(_reduce(ops, (1,)), (0,))
    return _reduce(tuple(operands), tuple(axes))


def _explicitly_sharded(a) -> bool:
    """Whether ``a`` is sharded along a mesh's Explicit axes (its type says so)."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", ())
    return any(p is not None for p in spec)


def _split(r: int) -> int:
    """The largest divisor of ``r`` up to ``sqrt(r)`` (1 for ``r < 16``: nothing to gain)."""
    return 1 if r < 16 else max(d for d in range(1, math.isqrt(r) + 1) if r % d == 0)


def _reduce(operands, axes):
    zeros = tuple(jnp.zeros((), o.dtype) for o in operands)
    return lax.reduce(tuple(operands), zeros, lambda a, b: tuple(p + q for p, q in zip(a, b)), axes)


def shift_of(x, m, feature_axes, axis_name, axis_index_groups):
    """``s`` per feature: the median of three values of the batch that count.

    The three are the first, the last and the first at or after the middle (in
    row-major order over the reduced axes), so one outlier among them is never the
    shift. Without a mask they are three slices; with one, their positions come from
    one ``min``/``max`` reduce over the mask's own shape, then a gather. A feature with
    no value that counts gets 0. Across devices, the first device (of its group)
    that holds a value gives its ``s`` to all.
    """
    vals, has = _candidates(x, m, feature_axes)
    a, b, c = (jnp.where(has, v, 0) for v in vals)  # an uncounted value may be inf
    s = _median3(a, b, c)
    if axis_name is not None:
        me = lax.axis_index(axis_name)
        big = np.iinfo(np.int32).max
        lead = lax.pmin(jnp.where(has, me, big), axis_name, axis_index_groups=axis_index_groups)
        s = psum(jnp.where(me == lead, s, 0), axis_name, axis_index_groups)
    return s


def _candidates(x, m, feature_axes):
    """Three values per feature (see :func:`shift_of`) and whether any counts."""
    dt = compute_dtype(x.dtype)
    red = reduced_axes(x.ndim, feature_axes)
    sizes = [x.shape[a] for a in red]
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(red))]
    total = math.prod(sizes)
    kept = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    fshape = tuple(x.shape[a] for a in feature_axes)
    # static positions: slices (not under symbolic shapes, nor on Explicit sharded axes)
    slices = m is None and isinstance(total, int) and total > 0 and not _explicitly_sharded(x)
    if m is None:
        positions = [0, total // 2, total - 1]
        has = jnp.full(fshape, total > 0)
    else:
        lin = jnp.zeros(m.shape, jnp.int32)
        for a, st in zip(red, strides):
            if m.shape[a] != 1:
                lin = lin + lax.broadcasted_iota(jnp.int32, m.shape, a) * st
        big = np.iinfo(np.int32).max
        at_mid = m & (lin >= total // 2)
        ops = (jnp.where(m, lin, big), jnp.where(at_mid, lin, big), jnp.where(m, lin, -1))
        first, mid, last = variadic_minmax(ops, red)
        has = first < big
        mid = jnp.where(mid < big, mid, last)
        positions = [jnp.where(has, p, 0) for p in (first, mid, last)]
        has = jnp.reshape(jnp.broadcast_to(has, kept), fshape)
    vals = []
    for p in positions:
        if not slices:
            p = jnp.clip(jnp.asarray(p, jnp.int32), 0, None)
        at = {a: (p // st) % sz for a, st, sz in zip(red, strides, sizes)}  # p's coordinates
        if slices:  # static positions: slices, not gathers
            idx = tuple(at.get(a, slice(None)) for a in range(x.ndim))
        else:
            at |= {a: lax.broadcasted_iota(jnp.int32, kept, a) for a in feature_axes}
            idx = tuple(jnp.broadcast_to(at[a], kept) for a in range(x.ndim))
        vals.append(jnp.reshape(_gather(x, idx).astype(dt), fshape))
    return vals, has


def _gather(x, idx):
    """``x[idx]``, replicated when ``x`` is sharded along a mesh's Explicit axes.

    The replicated sharding is built on ``x``'s own mesh, so no mesh context
    (``jax.set_mesh``) is needed: JAX does not ask one of a user who jits sharded arrays.
    """
    if _explicitly_sharded(x):
        mesh = jax.typeof(x).sharding.mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return x.at[idx].get(out_sharding=replicated)
    return x[idx]


def variadic_minmax(operands, axes):
    """min, min, max of three int32 arrays over ``axes``, in one ``reduce``."""
    big = np.iinfo(np.int32).max
    init = (jnp.int32(big), jnp.int32(big), jnp.int32(-1))
    comb = lambda a, b: (lax.min(a[0], b[0]), lax.min(a[1], b[1]), lax.max(a[2], b[2]))  # noqa: E731
    return tuple(jnp.expand_dims(r, axes) for r in lax.reduce(tuple(operands), init, comb, axes))


def stat_operands(x, m, s, feature_axes):
    """The x-sized operands of the statistics' two sums: ``h / N`` and ``(h c)**2``.

    ``h = x / 2 - s / 2`` is ``(x - s) / 2``, exact where ``x - s`` is and finite for
    every finite ``x`` and ``s``; ``c = 2 / sqrt(N)`` makes ``(h c)**2 = (x - s)**2 / N``.
    ``N`` is the static number of reduced positions on this device: terms divided
    before they are summed keep every partial sum within the total's range.
    """
    dt = compute_dtype(x.dtype)
    size = jnp.maximum(jnp.asarray(reduced_size(x, feature_axes), real_dtype(dt)), 1)
    se = expand(s, x.ndim, feature_axes)
    h = x.astype(dt) * 0.5 - se * 0.5
    if m is not None:
        h = jnp.where(m, h, 0)
    return h * (1 / size), abs2(h * (2 / jnp.sqrt(size)))


def reduced_size(x, feature_axes):
    return math.prod(x.shape[a] for a in reduced_axes(x.ndim, feature_axes))


def combine(sums, s, n, size) -> Moments:
    """Moments from the (psum'd) sums of :func:`stat_operands` around ``s``.

    ``n`` is the count (all devices), ``size`` the static ``N`` of one device.
    """
    s1, s2 = sums
    dt = s2.dtype  # real
    r = jnp.maximum(jnp.asarray(size, dt), 1) / jnp.maximum(n, 1).astype(dt)
    half_d, msq = s1 * r, s2 * r  # mean(x - s) / 2 and mean((x - s)**2)
    var = jnp.where(jnp.isfinite(msq), jnp.maximum(msq - 4 * abs2(half_d), 0), jnp.inf)
    hs = s * 0.5  # mean / 2 = hs + half_d, both finite: TwoSum on the halves, then * 2
    if jnp.iscomplexobj(s):
        (hr, lr), (hi, li) = _two_sum(hs.real, half_d.real), _two_sum(hs.imag, half_d.imag)
        hi_, lo = lax.complex(hr, hi), lax.complex(lr, li)
    else:
        hi_, lo = _two_sum(hs, half_d)
    return Moments(hi_ * 2, lo * 2, var, n)


def _two_sum(a, b):
    """TwoSum: the rounded ``a + b`` and its exact rounding error."""
    hi = a + b
    back = hi - a
    return hi, (a - (hi - back)) + (b - back)


def count_of(x, m, feature_axes, axis_name, axis_index_groups):
    """n (int32, all devices): per feature with a mask, a static scalar without."""
    red = reduced_axes(x.ndim, feature_axes)
    fshape = tuple(x.shape[a] for a in feature_axes)
    if m is None:
        n = jnp.asarray(math.prod(x.shape[a] for a in red), jnp.int32)
    else:  # each value of a mask broadcast along a reduced axis counts that many times
        times = math.prod(x.shape[a] for a in red if m.shape[a] == 1)
        n = jnp.sum(m, red, dtype=jnp.int32, keepdims=True) * times
        kept = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
        n = jnp.reshape(jnp.broadcast_to(n, kept), fshape)
    return psum(n, axis_name, axis_index_groups)


def moments(x, m, feature_axes, axis_name=None, axis_index_groups=None, split=False) -> Moments:
    """The clean program's statistics: one reduce over ``x`` (see the module docstring).

    Args:
      x: any shape; ``feature_axes`` (sorted, non-negative) are kept.
      m: None or a boolean array broadcastable to ``x``: the values that count.
      axis_name, axis_index_groups: devices that share the statistics (``lax.psum``).
      split: XLA:GPU's two-step column sums (see :func:`variadic_sum`).
    """
    red = reduced_axes(x.ndim, feature_axes)
    s = shift_of(x, m, feature_axes, axis_name, axis_index_groups)
    sums = variadic_sum(stat_operands(x, m, s, feature_axes), red, split)
    sums = psum(tuple(jnp.reshape(t, s.shape) for t in sums), axis_name, axis_index_groups)
    n = count_of(x, m, feature_axes, axis_name, axis_index_groups)
    return combine(sums, s, n, reduced_size(x, feature_axes))


def moments_tangent(x, m, feature_axes, axis_name, axis_index_groups, mo: Moments, dx):
    """The tangent of :func:`moments` (either form): ``dmean``, ``dvar`` and zeros.

    ``dmean = sum(m * dx) / n`` and ``dvar = 2 * sum(m * xc * dx) / n``, the latter
    since ``sum(m * xc) == 0``.
    """
    dt = mo.shift.dtype
    red = reduced_axes(x.ndim, feature_axes)
    e = lambda v: expand(v, x.ndim, feature_axes)  # noqa: E731
    xc = (x.astype(dt) - e(mo.shift)) - e(mo.delta)
    dxf = dx.astype(dt)
    t1, t2 = dxf, (jnp.conj(xc) * dxf).real if jnp.iscomplexobj(xc) else xc * dxf
    if m is not None:
        t1, t2 = jnp.where(m, t1, 0), jnp.where(m, t2, 0)
    t1, t2 = psum((jnp.sum(t1, red), jnp.sum(t2, red)), axis_name, axis_index_groups)
    n1 = jnp.maximum(mo.count, 1).astype(mo.var.dtype)
    fshape = mo.shift.shape
    dmean, dvar = jnp.reshape(t1, fshape) / n1, 2 * jnp.reshape(t2, fshape) / n1
    dvar = jnp.where(jnp.isfinite(mo.var), dvar, 0)
    dcount: Any = np.zeros(jnp.shape(mo.count), jax.dtypes.float0)  # an integer's tangent
    return Moments(dmean, jnp.zeros_like(dmean), dvar, dcount)
