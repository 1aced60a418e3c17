r"""Batch normalization as a pure function, with a hand-derived ``custom_vjp``.

Forward, training mode. Per feature, over the ``n`` values that count (``m`` is the
mask as 0/1, all ones without one; the statistics come from ``jaxbn._stats``)::

    xc   = (x - shift) - delta          # = x - mean, mean = sum(m * x) / n
    var  = sum(m * xc**2) / n           # biased, as in the notes
    rstd = (var + eps) ** -0.5
    y    = gamma * rstd * xc + beta

The rule returns ``(y, mean, var, n)``. Backward. Given ``dy = dL/dy`` and the
cotangents ``dmean``, ``dvar`` of the returned batch statistics (zero unless a loss
reads the new running state; ``n`` gets none), write
``a = gamma * rstd``, ``S1 = sum(dy)`` and ``S2 = sum(dy * xc)``, the sums over
every reduced position, masked or not (each output depends on the statistics)::

    dbeta  = S1
    dgamma = rstd * S2
    dL/dmean = -a * S1 + dmean                    # dy_q/dmean = -a; dvar/dmean = 0
    dL/dvar  = -a * rstd**2 * S2 / 2 + dvar       # dy_q/dvar = -a * rstd**2 * xc_q / 2
    dx = a * dy + m / n * (dL/dmean + 2 * xc * dL/dvar)   # dmean/dx = m/n, dvar/dx = 2 m xc/n
       = a * dy + m * (k0 + k1 * xc),
         k0 = (dmean - a * S1) / n,   k1 = (2 * dvar - a * rstd**2 * S2) / n

Batch renormalization (``Renorm``) outputs ``y = gamma * (r * rstd * xc + d) + beta``
with ``r``, ``d`` constants: the same rule with ``gamma * r`` for ``gamma`` (in ``a``)
and ``dgamma = r * rstd * S2 + d * S1``.

This is the notes' closed form (``batchnorm_backward_alt``) with the mask and the
statistics' cotangents added; their staged version multiplies two branches that
must be added (see ERRATA). The residuals are ``x`` itself and per-feature vectors:
``xc`` is recomputed, so nothing of the input's size is stored twice, and both
sums are read straight from ``x`` and ``dy`` (on CPU, ``S2`` as ``sum(dy * x) - mean * S1``
where every ``|mean| <= 4 std``: see ``_sum_dy_xc_cpu``).

Across devices (``axis_name``), ``n``, ``S1`` and ``S2`` are psum'd, since every
device's outputs depend on the shared statistics; ``dgamma`` and ``dbeta`` stay this
device's share, as autodiff of ``gamma * xhat + beta`` would give.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._stats import compute_dtype, expand, moments, psum

_FORWARD_MODE_HINT = (
    "forward-mode differentiation (jax.jvp, jax.jacfwd) of batch_norm cannot use "
    "jaxbn's hand-derived reverse rule; pass custom_vjp=False to batch_norm to "
    "differentiate the same forward computation with JAX's autodiff."
)


class BatchNormResiduals(NamedTuple):
    """What the forward keeps for the backward: ``x`` and per-feature vectors."""

    x: jax.Array  # input, any shape, its own dtype.
    shift: jax.Array  # feature shape: see jaxbn._stats.
    delta: jax.Array  # feature shape: mean - shift.
    rstd: jax.Array  # feature shape: (var + eps) ** -0.5.
    gamma: jax.Array | None  # feature shape, or None without scale.
    mask: jax.Array | None  # boolean, broadcastable to x, or None.
    count: jax.Array  # type: ignore[assignment]  # () or feature shape: n, over all devices.
    r: jax.Array | None = None  # feature shape: batch renorm's r, or None.
    d: jax.Array | None = None  # feature shape: batch renorm's d, or None.


class Renorm(NamedTuple):
    """Batch renormalization's inputs (Ioffe, 2017): running statistics and limits."""

    mean: jax.Array  # feature shape: running mean.
    var: jax.Array  # feature shape: running variance.
    rmax: jax.Array  # (): r is clipped to [1 / rmax, rmax].
    dmax: jax.Array  # (): d is clipped to [-dmax, dmax].


class _Config(NamedTuple):
    axes: tuple[int, ...]  # feature axes, sorted, non-negative.
    eps: float
    axis_name: object
    groups: tuple[tuple[int, ...], ...] | None
    beta_dtype: Any  # numpy dtype of beta, or None without offset.


def _affine(x, shift, delta, rstd, gamma, beta, axes):
    """y = gamma * rstd * ((x - shift) - delta) + beta, in float32 or wider."""
    dt = compute_dtype(x.dtype)
    e = functools.partial(expand, ndim=x.ndim, feature_axes=axes)
    scale = rstd if gamma is None else rstd * gamma.astype(dt)
    xc = x.astype(dt) - e(shift)
    if delta is not None:
        xc = xc - e(delta)
    y = xc * e(scale)
    if beta is not None:
        y = y + e(beta.astype(dt))
    return y.astype(x.dtype)


def _renorm_rd(mean, rstd, renorm: Renorm, eps):
    """r = sigma_batch / sigma_running and d = (mean - running mean) / sigma_running, clipped.

    Both are constants for differentiation (stop_gradient), as in the paper.
    """
    inv_run = lax.rsqrt(renorm.var.astype(rstd.dtype) + eps)
    r = jnp.clip(inv_run / rstd, 1 / renorm.rmax, renorm.rmax)
    d = jnp.clip((mean - renorm.mean.astype(rstd.dtype)) * inv_run, -renorm.dmax, renorm.dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _fwd(cfg: _Config, x, gamma, beta, mask, renorm=None):
    mo = moments(x, cfg.axes, mask, cfg.axis_name, cfg.groups)
    rstd = lax.rsqrt(mo.var + cfg.eps)
    r = d = None
    if renorm is not None:
        # y = gamma * (r * xhat + d) + beta: a batch norm with scale gamma * r and
        # offset beta + gamma * d, so the backward below needs only those two.
        r, d = _renorm_rd(mo.mean, rstd, renorm, cfg.eps)
        g = 1 if gamma is None else gamma.astype(rstd.dtype)
        y = _affine(
            x, mo.shift, mo.delta, rstd, g * r, g * d if beta is None else beta + g * d, cfg.axes
        )
    else:
        y = _affine(x, mo.shift, mo.delta, rstd, gamma, beta, cfg.axes)
    res = BatchNormResiduals(x, mo.shift, mo.delta, rstd, gamma, mask, mo.count, r, d)
    return (y, mo.mean, mo.var, mo.count), res


BWD_LIMIT = 16.0  # sum(dy * x) - mean * sum(dy) is taken where every mean**2 * rstd**2 <= this


def _sum_dy_xc(red, e, dy, x, shift, delta, rstd, s_dy):
    """S2 = sum(dy * xc), xc = (x - shift) - delta.

    |delta| <= ulp(mean) / 2 (jaxbn._stats), so taking it out of the sum cancels nothing.
    """
    dy, x = dy.astype(s_dy.dtype), x.astype(s_dy.dtype)
    return jnp.sum(dy * (x - e(shift)), red) - delta * s_dy


def _sum_dy_xc_cpu(red, e, dy, x, shift, delta, rstd, s_dy):
    """S2 on XLA:CPU, where a broadcast subtract inside the reduction costs 10-20%.

    Where every feature has |mean| <= 4 / rstd, S2 = sum(dy * x) - mean * S1. Its
    rounding error is a few ulp of sum(|dy| * (|xc| + |mean|)) instead of
    sum(|dy| * |xc|); dx takes S2 as k1 * xc, k1 = -a * rstd**2 * S2 / n, so the
    error in dx is a few ulp of a * average(|dy| * (rstd * |xc| + 4)) * rstd * |xc|:
    still a small multiple of ulp(a * |dy|) (measured in float32: 8e-7 relative at
    3.9 std, against 2e-7 for the shifted sum). Elsewhere, or with NaN, the shifted sum.
    """
    mean = shift + delta
    small = jnp.all(mean * mean * (rstd * rstd) <= BWD_LIMIT)
    return lax.cond(
        small,
        lambda: jnp.sum(dy.astype(mean.dtype) * x.astype(mean.dtype), red) - mean * s_dy,
        lambda: _sum_dy_xc(red, e, dy, x, shift, delta, rstd, s_dy),
    )


def _bwd(cfg: _Config, res: BatchNormResiduals, cotangents):
    x, shift, delta, rstd, gamma, mask, n, r, d = res
    dy, dmean, dvar = cotangents[:3]  # the count's cotangent, if any, is ignored
    dt = compute_dtype(x.dtype)
    e = functools.partial(expand, ndim=x.ndim, feature_axes=cfg.axes)
    red = tuple(i for i in range(x.ndim) if i not in cfg.axes)

    # XLA:CPU writes out in full a conversion, broadcast or subexpression that two
    # fusions share (here, or with the forward under one jit): each pass over x gets
    # its own copies, behind an optimization_barrier (free at run time).
    copies = lax.optimization_barrier(((dy, x, shift),) * 3 + ((delta, rstd, gamma),))
    (dy1, _, _), (dy2, x2, sh2), (dy3, x3, sh3), (delta, rstd, gamma) = copies
    s_dy = jnp.sum(dy1.astype(dt), red)
    args = (dy2, x2, sh2, delta, rstd, s_dy)
    s_dyxc = lax.platform_dependent(
        *args,
        cpu=functools.partial(_sum_dy_xc_cpu, red, e),
        default=functools.partial(_sum_dy_xc, red, e),
    )
    S1, S2 = psum((s_dy, s_dyxc), cfg.axis_name, cfg.groups)
    a = rstd if gamma is None else rstd * gamma.astype(dt)
    if r is not None:
        a = a * r
    n1 = jnp.maximum(n, 1)
    k0 = (dmean.astype(dt) - a * S1) / n1
    k1 = (2 * dvar.astype(dt) - a * rstd * rstd * S2) / n1
    stat_term = e(k0 - k1 * delta) + (x3.astype(dt) - e(sh3)) * e(k1)
    if mask is not None:
        stat_term = jnp.where(mask, stat_term, 0)
    dx = (e(a) * dy3.astype(dt) + stat_term).astype(x.dtype)
    if gamma is None:
        dgamma = None
    elif r is None or d is None:
        dgamma = (rstd * s_dyxc).astype(gamma.dtype)
    else:
        dgamma = (r * rstd * s_dyxc + d * s_dy).astype(gamma.dtype)
    dbeta = None if cfg.beta_dtype is None else s_dy.astype(cfg.beta_dtype)
    return dx, dgamma, dbeta


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(cfg, x, gamma, beta, mask, renorm):
    return _fwd(cfg, x, gamma, beta, mask, renorm)[0]


def _train_fwd(cfg, x, gamma, beta, mask, renorm):
    out, res = _fwd(cfg, x, gamma, beta, mask, renorm)
    return out, (res, renorm)


def _train_bwd(cfg, res_and_renorm, cotangents):
    res, renorm = res_and_renorm
    dx, dgamma, dbeta = _bwd(cfg, res, cotangents)
    return dx, dgamma, dbeta, None, jax.tree.map(jnp.zeros_like, renorm)


_train.defvjp(_train_fwd, _train_bwd)
