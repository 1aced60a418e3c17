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
``xc`` is recomputed, so nothing of the input's size is stored twice. The backward
reads ``x`` and ``dy`` twice, once for both sums (one reduce, ``jaxbn._stats``) and once
for ``dx``; with the forward's two (statistics, then ``y``) that is the physical floor.

A feature with no value that counts (a mask excludes all of it) has no batch
statistics: it is normalized with ``fallback`` (the running statistics in
``batch_norm``; mean 0 and variance 1 in ``batch_norm_fwd``), as a constant map, and
those are the statistics returned for it. Its ``m`` is 0 everywhere, so the rule
above already gives ``dx = a * dy`` there.

Across devices (``axis_name``), ``n``, ``S1`` and ``S2`` are psum'd, since every
device's outputs depend on the shared statistics; ``dgamma`` and ``dbeta`` stay this
device's share, as autodiff of ``gamma * xhat + beta`` would give.

Complex ``x`` is normalized as Flax does (``var = sum(m * |xc|**2) / n``, real); its
backward is JAX's autodiff of the same forward, not this rule.

The statistics and the backward's ``x``-sized work have an XLA:CPU form too
(``jaxbn._cpu``), chosen when the program is lowered (``jaxbn._platform``); both are
wrapped in a ``custom_jvp`` with a plain-jnp tangent, so they are differentiable
(``custom_vjp=False``, grad-of-grad, ``jax.hessian``) whatever form runs.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _cpu, _stats
from jaxbn._platform import per_platform
from jaxbn._stats import compute_dtype, expand, psum, standard_promotion

_FORWARD_MODE_HINT = (
    "forward-mode differentiation (jax.jvp, jax.jacfwd) of batch_norm cannot use "
    "jaxbn's hand-derived reverse rule; pass custom_vjp=False to batch_norm to "
    "differentiate the same forward computation with JAX's autodiff."
)


class BatchNormResiduals(NamedTuple):
    """What the forward keeps for the backward: ``x`` and per-feature vectors.

    Attributes:
      x: the input, any shape, its own dtype.
      shift: feature shape: the shift of the sums (see ``jaxbn._stats``).
      delta: feature shape: ``mean - shift``.
      rstd: feature shape: ``(var + eps) ** -0.5``.
      gamma: feature shape, or None without a scale.
      mask: boolean, broadcastable to ``x``, or None.
      count: ``()`` or feature shape: the values counted, over all devices.
      r: feature shape: batch renormalization's ``r``, or None.
      d: feature shape: batch renormalization's ``d``, or None.
    """

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


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _moments(cfg: _Config, x, mask) -> _stats.Moments:
    """The batch statistics, in the form of the platform the program is lowered for."""
    args = (cfg.axes, cfg.axis_name, cfg.groups)
    cpu = lambda x, m: _cpu.moments(x, m, *args)  # noqa: E731
    clean = lambda x, m: _stats.moments(x, m, *args)  # noqa: E731
    gpu = lambda x, m: _stats.moments(x, m, *args, split=True)  # noqa: E731
    return per_platform(cpu, clean, x, mask, gpu=gpu)


@_moments.defjvp
@standard_promotion
def _moments_jvp(cfg: _Config, primals, tangents):
    x, mask = primals
    mo = _moments(cfg, x, mask)
    return mo, _stats.moments_tangent(x, mask, cfg.axes, cfg.axis_name, cfg.groups, mo, tangents[0])


def _fwd(cfg: _Config, x, gamma, beta, mask, renorm=None, fallback=None):
    mo = _moments(cfg, x, mask)
    if mask is not None:  # a feature that no value counts for: see the module docstring
        fb_mean, fb_var = (0.0, 1.0) if fallback is None else fallback
        seen = mo.count > 0
        mo = _stats.Moments(
            jnp.where(seen, mo.shift, jnp.asarray(fb_mean, mo.shift.dtype)),
            jnp.where(seen, mo.delta, 0),
            jnp.where(seen, mo.var, jnp.asarray(fb_var, mo.var.dtype)),
            mo.count,
        )
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


def _backward_sums(cfg: _Config, dy, x, shift, delta, rstd, *, cpu, fused=True, split=False):
    """This device's ``(S1, S2)``: XLA:CPU's form (``jaxbn._cpu``) or one fused reduce."""
    if cpu:
        (dy1, _, _), (dy2, x2, sh2) = _cpu.copies((dy, x, shift), 2)
        delta, rstd = lax.optimization_barrier((delta, rstd))
        s_dy = jnp.reshape(
            jnp.sum(dy1.astype(rstd.dtype), _stats.reduced_axes(x.ndim, cfg.axes)), rstd.shape
        )
        s_dyxc = jnp.reshape(_cpu.sum_dy_xc(dy2, x2, sh2, delta, rstd, s_dy, cfg.axes), rstd.shape)
        return s_dy, s_dyxc
    s_dy, s_dyxc = _stats.backward_sums(dy, x, shift, delta, cfg.axes, fused=fused, split=split)
    return jnp.reshape(s_dy, rstd.shape), jnp.reshape(s_dyxc, rstd.shape)


def _dx(cfg: _Config, dy, x, shift, a, k0, k1, mask, *, cpu):
    """``dx = a * dy + m * (k0 + k1 * (x - shift))``, one pass (its own inputs on CPU)."""
    if cpu:  # the vectors too: a broadcast the forward's y pass shares would be written out
        dy, x, shift, a, k0, k1 = _cpu.copies((dy, x, shift, a, k0, k1), 1)[0]
    dt = compute_dtype(x.dtype)
    e = functools.partial(expand, ndim=x.ndim, feature_axes=cfg.axes)
    stat_term = e(k0) + (x.astype(dt) - e(shift)) * e(k1)
    if mask is not None:
        stat_term = jnp.where(mask, stat_term, 0)
    return (e(a) * dy.astype(dt) + stat_term).astype(x.dtype)


def differentiable_per_platform(fn, *, split=False, **reference_kwargs):
    """``fn(cfg, *args, cpu=...)`` per platform, with the clean form's jvp as tangent.

    ``split``: GPUs get ``fn(..., cpu=False, split=True)`` (XLA:GPU's two-step column
    sums, ``jaxbn._stats.variadic_sum``). ``reference_kwargs`` go to the clean form used
    for the tangent (e.g. ``fused=False``: autodiff cannot transpose a variadic reduce).
    """

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def wrapped(cfg, *args):
        cpu = functools.partial(fn, cfg, cpu=True)
        gpu = functools.partial(fn, cfg, cpu=False, split=True) if split else None
        return per_platform(cpu, functools.partial(fn, cfg, cpu=False), *args, gpu=gpu)

    @wrapped.defjvp
    @standard_promotion
    def wrapped_jvp(cfg, primals, tangents):
        reference = functools.partial(fn, cfg, cpu=False, **reference_kwargs)
        return wrapped(cfg, *primals), jax.jvp(reference, primals, tangents)[1]

    return wrapped


_backward_sums_pp = differentiable_per_platform(_backward_sums, split=True, fused=False)
_dx_pp = differentiable_per_platform(_dx)


def coefficients(a, rstd, S1, S2, dmean, dvar, n):
    """``k0, k1`` of the rule above, from the (psum'd) sums ``S1``, ``S2`` and count ``n``."""
    dt = a.dtype
    n1 = jnp.maximum(n, 1).astype(dt)
    k0 = (dmean.astype(dt) - a * S1) / n1
    k1 = (2 * dvar.astype(dt) - a * rstd * rstd * S2) / n1
    return k0, k1


def _bwd(cfg: _Config, res: BatchNormResiduals, cotangents):
    x, shift, delta, rstd, gamma, mask, n, r, d = res
    dy, dmean, dvar = cotangents[:3]  # the count's cotangent, if any, is ignored
    dt = compute_dtype(x.dtype)
    a = rstd if gamma is None else rstd * gamma.astype(dt)
    if r is not None:
        a = a * r
    s_dy, s_dyxc = _backward_sums_pp(cfg, dy, x, shift, delta, rstd)
    S1, S2 = psum((s_dy, s_dyxc), cfg.axis_name, cfg.groups)
    k0, k1 = coefficients(a, rstd, S1, S2, dmean, dvar, n)
    dx = _dx_pp(cfg, dy, x, shift, a, k0 - k1 * delta, k1, mask)
    if gamma is None:
        dgamma = None
    elif r is None or d is None:
        dgamma = (rstd * s_dyxc).astype(gamma.dtype)
    else:
        dgamma = (r * rstd * s_dyxc + d * s_dy).astype(gamma.dtype)
    dbeta = None if cfg.beta_dtype is None else s_dy.astype(cfg.beta_dtype)
    return dx, dgamma, dbeta


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(cfg, x, gamma, beta, mask, renorm, fallback):
    return _fwd(cfg, x, gamma, beta, mask, renorm, fallback)[0]


def _train_fwd(cfg, x, gamma, beta, mask, renorm, fallback):
    out, res = _fwd(cfg, x, gamma, beta, mask, renorm, fallback)
    return out, (res, renorm, fallback)


@standard_promotion
def _train_bwd(cfg, saved, cotangents):
    res, renorm, fallback = saved
    dx, dgamma, dbeta = _bwd(cfg, res, cotangents)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    return dx, dgamma, dbeta, None, zeros(renorm), zeros(fallback)


_train.defvjp(_train_fwd, _train_bwd)
