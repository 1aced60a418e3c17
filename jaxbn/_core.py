r"""The training forward and its hand-derived backward: one ``custom_vjp`` rule.

Forward, training mode. Per feature, over the ``n`` values that count (``m`` is the
mask as 0/1, all ones without one; the statistics come from ``jaxbn._stats``)::

    xc   = (x - shift) - delta          # = x - mean, mean = sum(m * x) / n
    var  = sum(m * xc**2) / n           # biased, as in the notes
    rstd = (var + eps) ** -0.5
    y    = gamma * rstd * xc + beta
    z    = act(y + r)                   # batch_norm: act = identity, r = 0

with ``act`` one of ``identity``, ``relu``, ``leaky_relu`` (slope ``s > 0``) and ``r``
an optional residual. The rule returns ``(z, mean, var, n)``.

Backward. Given ``dz = dL/dz`` and the cotangents ``dmean``, ``dvar`` of the returned
statistics (zero unless a loss reads the new running state; ``n`` gets none), write
``g = dz * act'(y + r)`` (``act'`` is 1, ``1[p > 0]`` or ``1[p >= 0] + s 1[p < 0]``, as
``jax.nn`` differentiates them), ``a = gamma * rstd``, ``S1 = sum(g)`` and
``S2 = sum(g * xc)``, the sums over every reduced position, masked or not (each output
depends on the statistics)::

    dr     = g
    dbeta  = S1
    dgamma = rstd * S2
    dL/dmean = -a * S1 + dmean                    # dy_q/dmean = -a; dvar/dmean = 0
    dL/dvar  = -a * rstd**2 * S2 / 2 + dvar       # dy_q/dvar = -a * rstd**2 * xc_q / 2
    dx = a * g + m / n * (dL/dmean + 2 * xc * dL/dvar)   # dmean/dx = m/n, dvar/dx = 2 m xc/n
       = a * g + m * (k0 + k1 * xc),
         k0 = (dmean - a * S1) / n,   k1 = (2 * dvar - a * rstd**2 * S2) / n

This is the notes' closed form (``batchnorm_backward_alt``) with the mask, the
statistics' cotangents and the activation added; their staged version multiplies two
branches that must be added (see ERRATA). Each x-sized pass of the backward (one
reduce for ``S1`` and ``S2``, then ``dx``) reads ``dz`` and one kept array, and
recomputes ``g`` rather than writing it; with the forward's two passes (statistics,
then ``z``) that is the physical floor. The kept array is one of two:

Keep ``x`` (the default). ``xc`` is recomputed from ``x`` and per-feature vectors, so
nothing of the input's size is stored twice: ``S2 = sum(g * (x - shift)) - delta * S1``
(``|delta| <= ulp(mean) / 2``, so taking it out of the sum cancels nothing). ``act'(p)`` comes from ``x`` too
(``p = y``, recomputed bit for bit as the forward computed it) or, with a residual
(``p`` then depends on ``r``), from a boolean ``p > 0`` (``p >= 0``: leaky) kept from
the forward, one byte per value.

Keep ``z`` (``inplace=True``; InPlace-ABN, Rota Bulo et al., CVPR 2018: ``identity``
and ``leaky_relu``). ``x`` is freed after the forward: ``act`` is invertible, so
``p = z`` where ``z >= 0``, ``z / s`` elsewhere, ``y = p - r``, and ``act'(p)`` is read
from the sign of ``z``. With a residual the backward also reads ``r``, an input that a
ResNet keeps anyway. With ``u = y - beta = gamma * rstd * xc`` and ``ig = 1 / gamma``::

    T  = sum(g * u)                   # one reduce with S1 = sum(g), over z and dz
    S2 = sum(g * xc) = T * ig / rstd
    dx = a * g + m * (k0 + (k1 * ig / rstd) * u),   dgamma = T * ig

In floats ``u`` carries the rounding of ``y``, ``y - beta`` and ``p - r``, about
``ulp(|y| + |beta| + |r|)``, so small features' gradients lose
``log2((|y| + |beta|) / |gamma xhat|)`` bits. Where ``|gamma| <= sqrt(tiny)`` (1e-19 in
float32) ``ig = 0``: ``z`` is then ``act(beta)`` and holds no ``xhat``, so
``dgamma = 0`` and ``dx`` lacks the ``dvar`` term. That would leave a zero-initialized
``gamma`` at 0 for ever, which is why keeping ``z`` is opt-in. (InPlace-ABN changes
the forward to a scale of ``|gamma| + eps`` instead.)

Batch renormalization (``Renorm``) outputs ``y = gamma * (r * rstd * xc + d) + beta``
with ``r``, ``d`` constants: the same rule with scale ``gamma * r`` and offset
``beta + gamma * d`` (``_scale_offset``), and ``dgamma = r * rstd * S2 + d * S1``.

A feature with no value that counts (a mask excludes all of it) has no batch
statistics: it is normalized with ``fallback`` (the running statistics in
``batch_norm``; mean 0 and variance 1 in ``batch_norm_fwd``), as a constant map, and
those are the statistics returned for it. Its ``m`` is 0 everywhere, so the rule
above already gives ``dx = a * g`` there. One value per feature (``n = 1``, allowed
for the modules, as Flax's) needs nothing special: ``xc = 0``, ``var = 0``, ``z = act(beta + r)``.

Across devices (``axis_name``), ``n``, ``S1`` and ``S2`` are psum'd, since every
device's outputs depend on the shared statistics; ``dgamma`` and ``dbeta`` stay this
device's share, as autodiff of ``gamma * xhat + beta`` would give.

Complex ``x`` is normalized as Flax does (``var = sum(m * |xc|**2) / n``, real); its
backward is JAX's autodiff of the same forward, not this rule.

The statistics and the backward's passes have an XLA:CPU form (``jaxbn._cpu``),
chosen when the program is lowered (``jaxbn._platform``); each sits in a
``custom_jvp`` with a plain-jnp tangent, so any form is differentiable
(``custom_vjp=False``, grad-of-grad, ``jax.hessian``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _cpu, _stats
from jaxbn._compat import standard_promotion
from jaxbn._platform import differentiable_per_platform, per_platform
from jaxbn._stats import compute_dtype, expand, psum, reduced_axes, variadic_sum


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

    x: jax.Array  # input, any shape, its own dtype (keep "z": the output z).
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


class Spec(NamedTuple):
    """The rule's static configuration."""

    axes: tuple[int, ...]  # feature axes, sorted, non-negative.
    eps: float
    axis_name: Any = None
    groups: tuple[tuple[int, ...], ...] | None = None
    activation: str = "identity"  # or "relu", "leaky_relu".
    slope: float = 0.0  # leaky_relu's slope for p < 0.
    keep: str = "x"  # the backward's x-sized residual: "x", or "z" (inplace).
    residual: bool = False  # whether r is given (and gets a gradient).


class Saved(NamedTuple):
    """The rule's residuals: ``res`` (``res.x`` is ``z`` when keeping ``z``) and the rest."""

    res: BatchNormResiduals
    beta: jax.Array | None  # for dbeta's dtype and, keeping z, u = y - beta.
    sign: jax.Array | None  # keep x with a residual: p > 0 (leaky: p >= 0), else None.
    residual: jax.Array | None  # keep z: r, to recover y = act^-1(z) - r.


def affine(x, shift, delta, rstd, gamma, beta, axes):
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


def activate(activation: str, slope: float, p):
    """``act(p)``, as ``jax.nn`` computes it."""
    if activation == "relu":
        return jax.nn.relu(p)
    if activation == "leaky_relu":
        return jax.nn.leaky_relu(p, slope)
    return p


def _sign(spec: Spec, p):
    return p > 0 if spec.activation == "relu" else p >= 0


def _scale_offset(gamma, beta, r, d, dt):
    """Batch renorm's ``gamma * (r * xhat + d) + beta`` as a batch norm's scale and offset."""
    if r is None:
        return gamma, beta
    g = 1 if gamma is None else gamma.astype(dt)
    return g * r, g * d if beta is None else beta + g * d


def _renorm_rd(mean, rstd, renorm: Renorm, eps):
    """r = sigma_batch / sigma_running and d = (mean - running mean) / sigma_running, clipped.

    Both are constants for differentiation (stop_gradient), as in the paper.
    """
    inv_run = lax.rsqrt(renorm.var.astype(rstd.dtype) + eps)
    r = jnp.clip(inv_run / rstd, 1 / renorm.rmax, renorm.rmax)
    d = jnp.clip((mean - renorm.mean.astype(rstd.dtype)) * inv_run, -renorm.dmax, renorm.dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def moments(x, mask, axes: tuple[int, ...], axis_name=None, groups=None) -> _stats.Moments:
    """The batch statistics (``mean = shift + delta``, ``var``, ``count``) of ``x`` over
    every axis but ``axes``, differentiable, in the form of the platform the program is
    lowered for. The rule, ``batch_renorm``, Equinox's ``ema`` mode and
    ``population_stats`` all take their statistics from here."""
    args = (axes, axis_name, groups)
    return per_platform(
        lambda x, m: _cpu.moments(x, m, *args),
        lambda x, m: _stats.moments(x, m, *args),
        x,
        mask,
        gpu=lambda x, m: _stats.moments(x, m, *args, split=True),
    )


@moments.defjvp
@standard_promotion
def _moments_jvp(axes, axis_name, groups, primals, tangents):
    x, mask = primals
    mo = moments(x, mask, axes, axis_name, groups)
    return mo, _stats.moments_tangent(x, mask, axes, axis_name, groups, mo, tangents[0])


def forward(spec: Spec, x, gamma, beta, residual=None, mask=None, renorm=None, fallback=None):
    """``((z, mean, var, n), saved)``: the rule's outputs and what its backward reads."""
    mo = moments(x, mask, spec.axes, spec.axis_name, spec.groups)
    if mask is not None:  # a feature that no value counts for: see the module docstring
        fb_mean, fb_var = (0.0, 1.0) if fallback is None else fallback
        # every operand of the selects typed like the statistics (sharded like x's
        # features on an Explicit mesh): a count from a mask broadcast along the
        # features, or a fallback made outside the mesh, is replicated or meshless
        like = jnp.zeros_like(mo.var)
        seen = (mo.count > 0) | (like != 0)
        mo = _stats.Moments(
            jnp.where(
                seen, mo.shift, like.astype(mo.shift.dtype) + jnp.asarray(fb_mean, mo.shift.dtype)
            ),
            jnp.where(seen, mo.delta, 0),
            jnp.where(seen, mo.var, like + jnp.asarray(fb_var, mo.var.dtype)),
            mo.count,
        )
    rstd = lax.rsqrt(mo.var + spec.eps)
    r = d = None
    if renorm is not None:
        r, d = _renorm_rd(mo.mean, rstd, renorm, spec.eps)
    scale, offset = _scale_offset(gamma, beta, r, d, rstd.dtype)
    y = affine(x, mo.shift, mo.delta, rstd, scale, offset, spec.axes)
    p = y if residual is None else y + residual
    z = activate(spec.activation, spec.slope, p)
    res = BatchNormResiduals(x, mo.shift, mo.delta, rstd, gamma, mask, mo.count, r, d)
    if spec.keep == "z":  # u comes from z (and r): x is not needed
        saved = Saved(res._replace(x=z), beta, None, residual)
    else:  # with a residual, p is not recomputed from x: its sign is kept
        keep_sign = residual is not None and spec.activation != "identity"
        saved = Saved(res, beta, _sign(spec, p) if keep_sign else None, None)
    return (z, mo.mean, mo.var, mo.count), saved


def _g_u(spec: Spec, dz, saved: Saved):
    """``g = dz * act'(p)`` and ``u``, with ``S2 = sum(g * u)`` (then corrected, see
    :func:`_grads`): ``x - shift`` keeping ``x``, ``y - beta`` keeping ``z``."""
    res = saved.res
    big, dt = res.x, res.rstd.dtype
    e = functools.partial(expand, ndim=big.ndim, feature_axes=spec.axes)
    bf = big.astype(dt)
    sign = saved.sign
    if spec.keep == "z":
        sign = bf >= 0
        p = bf if spec.activation == "identity" else jnp.where(sign, bf, bf / spec.slope)
        y = p if saved.residual is None else p - saved.residual.astype(dt)
        offset = _scale_offset(res.gamma, saved.beta, res.r, res.d, dt)[1]
        u = y if offset is None else y - e(offset.astype(dt))
    else:
        if sign is None and spec.activation != "identity":  # no residual: p = y, recomputed
            scale, offset = _scale_offset(res.gamma, saved.beta, res.r, res.d, dt)
            y = affine(big, res.shift, res.delta, res.rstd, scale, offset, spec.axes)
            sign = _sign(spec, y)
        u = bf - e(res.shift)
    g = dz.astype(dt)
    if spec.activation != "identity":
        assert sign is not None
        g = jnp.where(sign, g, 0 if spec.activation == "relu" else spec.slope * g)
    return g, u


def coefficients(a, rstd, S1, S2, dmean, dvar, n):
    """``k0, k1`` of the rule above, from the (psum'd) sums ``S1``, ``S2`` and count ``n``."""
    dt = a.dtype
    n1 = jnp.maximum(n, 1).astype(dt)
    k0 = (dmean.astype(dt) - a * S1) / n1
    k1 = (2 * dvar.astype(dt) - a * rstd * rstd * S2) / n1
    return k0, k1


def _xc_per_u(saved: Saved):
    """Keeping z, ``xc = c * u`` (``u = scale * rstd * xc``); 0 where ``|scale| <= sqrt(tiny)``."""
    res, dt = saved.res, saved.res.rstd.dtype
    scale = _scale_offset(res.gamma, saved.beta, res.r, res.d, dt)[0]
    c = 1 / res.rstd
    if scale is None:
        return c
    small = jnp.abs(scale.astype(dt)) <= np.sqrt(np.finfo(dt).tiny)
    return jnp.where(small, 0, 1 / jnp.where(small, 1, scale.astype(dt))) * c


def _sums(spec: Spec, dz, saved: Saved, *, fused=True, split=False):
    """This device's ``(S1, S2) = (sum(g), sum(g * xc))``, in one reduce (``fused``).

    ``fused=False``: separate sums (autodiff cannot transpose a variadic reduce).
    ``split``: XLA:GPU's two-step column sums (``jaxbn._stats.variadic_sum``).
    """
    res = saved.res
    g, u = _g_u(spec, dz, saved)
    red = reduced_axes(u.ndim, spec.axes)
    ops = (g, g * u)
    s1, s2 = variadic_sum(ops, red, split) if fused else (jnp.sum(o, red) for o in ops)
    s1, s2 = jnp.reshape(s1, res.rstd.shape), jnp.reshape(s2, res.rstd.shape)
    if spec.keep == "z":
        return s1, s2 * _xc_per_u(saved)
    return s1, s2 - res.delta * s1  # u = x - shift = xc + delta


def _dx(spec: Spec, dz, saved: Saved, a, k0, k1):
    """``dx = a * g + m * (k0 + k1 * u)`` and ``dr = g``, in one pass."""
    g, u = _g_u(spec, dz, saved)
    e = functools.partial(expand, ndim=u.ndim, feature_axes=spec.axes)
    stat = e(k0) + u * e(k1)
    if saved.res.mask is not None:
        stat = jnp.where(saved.res.mask, stat, 0)
    return (e(a) * g + stat).astype(dz.dtype), g.astype(dz.dtype)


# XLA:CPU, keeping x, writes g once and reads it with jaxbn._cpu's plain sums and dx pass
# (it runs a reduction with a mask or a broadcast inside 2-3x slower than a plain sum);
# keeping z it runs the clean forms (a memory option: written out, g and u exceed x).
def _g_cpu(spec: Spec, dz, saved: Saved):
    """``g``, exactly in dz's dtype (but for leaky_relu); ``batch_norm``'s is ``dz`` itself."""
    g = dz if spec.activation == "identity" else _g_u(spec, dz, saved)[0]
    return g if spec.activation == "leaky_relu" else g.astype(dz.dtype)


def _sums_cpu(spec: Spec, dz, saved: Saved):
    if spec.keep == "z":
        return _sums(spec, dz, saved)
    res = saved.res
    g = _g_cpu(spec, dz, saved)
    return _cpu.backward_sums(g, res.x, res.shift, res.delta, res.rstd, spec.axes)


def _dx_cpu(spec: Spec, dz, saved: Saved, a, k0, k1):
    if spec.keep == "z":
        return _dx(spec, dz, saved, a, k0, k1)
    res, g = saved.res, _g_cpu(spec, dz, saved)
    return _cpu.dx(g, res.x, res.shift, a, k0, k1, res.mask, spec.axes), g.astype(dz.dtype)


_sums_pp = differentiable_per_platform(
    _sums_cpu,
    _sums,
    gpu=functools.partial(_sums, split=True),
    tangent=functools.partial(_sums, fused=False),
)
_dx_pp = differentiable_per_platform(_dx_cpu, _dx)


def backward(spec: Spec, saved: Saved, cotangents):
    """``(dx, dgamma, dbeta, dr)`` from the rule's residuals and ``(dz, dmean, dvar[, dn])``."""
    dz, dmean, dvar = cotangents[:3]  # the count's cotangent, if any, is ignored
    res, rstd = saved.res, saved.res.rstd
    scale = _scale_offset(res.gamma, saved.beta, res.r, res.d, rstd.dtype)[0]
    a = rstd if scale is None else rstd * scale.astype(rstd.dtype)
    s1, s2 = _sums_pp(spec, dz, saved)
    S1, S2 = psum((s1, s2), spec.axis_name, spec.groups)
    k0, k1 = coefficients(a, rstd, S1, S2, dmean, dvar, res.count)
    if spec.keep == "z":  # xc = c * u
        k1 = k1 * _xc_per_u(saved)
    else:  # xc = u - delta
        k0 = k0 - k1 * res.delta
    dx, dr = _dx_pp(spec, dz, saved, a, k0, k1)
    dgamma = rstd * s2 if res.r is None or res.d is None else res.r * rstd * s2 + res.d * s1
    dgamma = None if res.gamma is None else dgamma.astype(res.gamma.dtype)
    dbeta = None if saved.beta is None else s1.astype(saved.beta.dtype)
    return dx, dgamma, dbeta, dr


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rule(spec: Spec, x, gamma, beta, residual, mask, renorm, fallback):
    """The training forward with the rule above as its reverse-mode derivative."""
    return forward(spec, x, gamma, beta, residual, mask, renorm, fallback)[0]


def _train_fwd(spec, x, gamma, beta, residual, mask, renorm, fallback):
    out, saved = forward(spec, x, gamma, beta, residual, mask, renorm, fallback)
    return out, (saved, renorm, fallback)


@standard_promotion
def _train_bwd(spec, saved, cotangents):
    saved, renorm, fallback = saved
    dx, dgamma, dbeta, dr = backward(spec, saved, cotangents)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    return dx, dgamma, dbeta, dr if spec.residual else None, None, zeros(renorm), zeros(fallback)


_rule.defvjp(_train_fwd, _train_bwd)
# ``train``: the rule, traced once per spec and argument types as jax.nn's functions are.
# JAX caches the trace and its transformations (vmap, jvp, transpose), so a model whose
# layers share shapes, or a program traced again, pays for the rule (its platform forms
# and their conds) once; XLA inlines the call before compiling.
train = jax.jit(_rule, static_argnums=0)
