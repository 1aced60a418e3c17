r"""Batch norm fused with its activation and a residual add: ``z = act(y + r)``.

Forward: ``y`` is exactly :func:`jaxbn.batch_norm`'s (``jaxbn._core``: ``xc``,
``rstd``, ``a = gamma * rstd``), ``p = y + r`` (``r = 0`` without a residual) and
``z = act(p)`` for ``act`` in ``relu``, ``leaky_relu`` (slope ``s > 0``), ``identity``.

Backward. With ``g = dz * act'(p)`` (``act' = 1[p > 0]``, ``1[p >= 0] + s 1[p < 0]``
or 1, as ``jax.nn`` differentiates them), the rule of ``jaxbn._core`` applies with
``dy = g``, and ``dr = g``. ``g`` is not written out: each x-sized pass (one reduce
for ``S1 = sum(g)`` and ``S2 = sum(g * xc)``, then ``dx``) recomputes it from what was
kept. (XLA:CPU is the exception: keeping ``x``, there ``g`` is written once and the
backward is the core's with ``dy = g``, the program XLA:CPU makes of ``batch_norm``
then the activation: it runs a reduction with a mask inside slower than a write and
plain sums.) Two ways to keep it:

Keep ``x`` (the default). ``xc`` comes from ``x``; without a residual ``act'(p)`` comes
from ``x`` and the per-feature vectors (``p = y``, recomputed bit for bit as the
forward computed it), with one from a boolean ``p > 0``
(``p >= 0``: leaky) kept from the forward: a residual makes ``p`` depend on ``r``, and
one byte per value is cheaper than keeping ``r`` or ``z`` (``identity`` needs none).

Keep ``z`` (``inplace=True``; InPlace-ABN, Rota Bulo et al., CVPR 2018: ``identity`` and
``leaky_relu``). ``x`` is freed after the forward: ``act`` is invertible, so
``p = z`` where ``z >= 0``, ``z / s`` elsewhere, ``y = p - r``, and ``act'(p)`` is read from
the sign of ``z``. With a residual the backward also reads ``r``, an input that a ResNet
keeps anyway (the identity shortcut is the block's input, which its first convolution
keeps), so the op itself keeps nothing x-sized beyond ``z``. With
``u = y - beta = gamma * rstd * xc`` and ``ig = 1 / gamma``::

    T  = sum(g * u)                   # one reduce with S1 = sum(g), over z and dz
    S2 = sum(g * xc) = T * ig / rstd
    dx = a * g + m * (k0 + k1 * xc) = a * g + m * (k0 + (k1 * ig / rstd) * u)
    dgamma = rstd * S2 = T * ig,   dbeta = S1

with ``k0``, ``k1`` of ``jaxbn._core`` (``k1`` needs the psum'd ``S2``). ``gamma`` near 0:
InPlace-ABN makes the layer's scale ``|gamma| + eps`` in the forward, which changes the
function; here the forward stays ``batch_norm``'s and the backward is exact in exact
arithmetic for any ``gamma != 0``. In floats ``u`` carries the rounding of ``y`` and of
``y - beta`` (and of ``p - r``), about ``ulp(|y| + |beta| + |r|)``, so ``xc`` is off by
that over ``|gamma| rstd``:
small features' gradients lose ``log2((|y| + |beta|) / |gamma xhat|)`` bits. Where
``|gamma| <= sqrt(tiny)`` (1e-19 in float32) ``ig = 0``: ``z`` is then ``act(beta)``
and holds no ``xhat``, so ``dgamma = 0`` and ``dx`` lacks the ``dvar`` term (``dx``,
``dbeta`` otherwise exact, no NaN). That would leave a zero-initialized ``gamma`` at 0
for ever, which is why keeping ``z`` is opt-in; the default keeps ``x``, exact for
every ``gamma``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._batch_norm import _config, _eval, _update, _vary_like_x, unbiased
from jaxbn._core import _affine, _Config, _fwd, coefficients, differentiable_per_platform
from jaxbn._core import _backward_sums as _core_backward_sums
from jaxbn._core import _dx as _core_dx
from jaxbn._stats import compute_dtype, expand, psum, reduced_axes, standard_promotion, variadic_sum

ACTIVATIONS = ("relu", "leaky_relu", "identity")


class _Spec(NamedTuple):
    cfg: _Config
    activation: str
    slope: float
    keep: str  # "x" or "z": the x-sized residual of the backward.
    residual: bool  # whether r was given (and gets a gradient).


class _Vec(NamedTuple):
    """Per-feature vectors (feature shape) the backward's passes read."""

    shift: Any
    delta: Any
    rstd: Any
    gamma: Any  # or None
    beta: Any  # or None


def _act(spec: _Spec, p):
    return _apply(spec.activation, spec.slope, p)


def _apply(activation: str, slope: float, p):
    if activation == "relu":
        return jax.nn.relu(p)
    if activation == "leaky_relu":
        return jax.nn.leaky_relu(p, slope)
    return p


def activate(y, activation: str, negative_slope: float = 0.01, residual=None):
    """``act(y + residual)`` as :func:`batch_norm_act` computes it, for a given ``y``."""
    slope = _check_activation(activation, negative_slope)
    return _apply(activation, slope, y if residual is None else y + residual)


def _sign(spec: _Spec, p):
    return p > 0 if spec.activation == "relu" else p >= 0


def _g_u(spec: _Spec, dz, big, pos, v: _Vec):
    """``g = dz * act'(p)`` and the centred operand ``u`` (see the module docstring)."""
    axes = spec.cfg.axes
    dt = compute_dtype(big.dtype)
    e = functools.partial(expand, ndim=big.ndim, feature_axes=axes)
    bf = big.astype(dt)
    if spec.keep == "z":  # pos holds the residual r, if any: y = act^-1(z) - r
        r, pos = pos, bf >= 0
        p = bf if spec.activation == "identity" else jnp.where(pos, bf, bf / spec.slope)
        y = p if r is None else p - r.astype(dt)
        u = y if v.beta is None else y - e(v.beta.astype(dt))
    else:
        if pos is None and spec.activation != "identity":  # no residual: p = y, recomputed
            pos = _sign(spec, _affine(big, v.shift, v.delta, v.rstd, v.gamma, v.beta, axes))
        u = bf - e(v.shift)
    g = dz.astype(dt)
    if spec.activation != "identity":
        g = jnp.where(pos, g, 0 if spec.activation == "relu" else spec.slope * g)
    return g, u


def _sums(spec: _Spec, dz, big, pos, v: _Vec, fused, split=False):
    """This device's ``(sum(g), sum(g * u))``, feature shape, in one reduce (``fused``)."""
    g, u = _g_u(spec, dz, big, pos, v)
    ops = (g, g * u)
    red = reduced_axes(big.ndim, spec.cfg.axes)
    s1, s2 = variadic_sum(ops, red, split) if fused else (jnp.sum(o, red) for o in ops)
    return jnp.reshape(s1, v.rstd.shape), jnp.reshape(s2, v.rstd.shape)


def _dx(spec: _Spec, dz, big, pos, v: _Vec, a, k0, k1, mask):
    """``dx = a * g + m * (k0 + k1 * u)`` and ``dr = g``, in one pass."""
    e = functools.partial(expand, ndim=big.ndim, feature_axes=spec.cfg.axes)
    g, u = _g_u(spec, dz, big, pos, v)
    stat = e(k0) + u * e(k1)
    if mask is not None:
        stat = jnp.where(mask, stat, 0)
    return (e(a) * g + stat).astype(dz.dtype), g.astype(dz.dtype)


def _grads(
    spec: _Spec, dz, big, pos, v: _Vec, dmean, dvar, n, mask, *, cpu, fused=True, split=False
):
    """``(dx, dr, s1, s2)``: ``s1 = sum(g)`` and ``s2 = sum(g * xc)`` are this device's."""
    cfg, dt = spec.cfg, v.rstd.dtype
    rstd, gamma = v.rstd, v.gamma
    a = rstd if gamma is None else rstd * gamma.astype(dt)
    cpu_keep_x = cpu and spec.keep == "x"
    if cpu_keep_x:
        # XLA:CPU runs a reduction with a mask or a broadcast inside 2-3x slower than a
        # plain sum (measured on its YNNPACK reductions), so there g is written once, as
        # an unfused dy would be (exactly, in dz's dtype, but for leaky_relu), and the
        # core's CPU backward runs with dy = g: u = x - shift, dx = a * g + m * (...).
        g = _g_u(spec, dz, big, pos, v)[0]
        g = g if spec.activation == "leaky_relu" else g.astype(dz.dtype)
        s1, s2 = _core_backward_sums(cfg, g, big, v.shift, v.delta, rstd, cpu=True)
    else:
        # The one variadic reduce, also on XLA:CPU when keeping z (a memory option):
        # separate sums, with or without barrier copies, write g and u out there
        # (measured: a ResNet-18 step's temporary memory then exceeds keeping x's).
        s1, s2 = _sums(spec, dz, big, pos, v, fused, split)
    ig: Any = 1.0
    if spec.keep == "z":
        if gamma is not None:
            small = jnp.abs(gamma.astype(dt)) <= np.sqrt(np.finfo(dt).tiny)
            ig = jnp.where(small, 0, 1 / jnp.where(small, 1, gamma.astype(dt)))
        s2 = s2 * ig / rstd  # T -> sum(g * xc)
    elif not cpu_keep_x:
        s2 = s2 - v.delta * s1  # sum(g * (x - shift)) -> sum(g * xc)
    S1, S2 = psum((s1, s2), cfg.axis_name, cfg.groups)
    k0, k1 = coefficients(a, rstd, S1, S2, dmean, dvar, n)
    if spec.keep == "z":
        dx, dr = _dx(spec, dz, big, pos, v, a, k0, k1 * ig / rstd, mask)
    elif cpu_keep_x:
        dx = _core_dx(cfg, g, big, v.shift, a, k0 - k1 * v.delta, k1, mask, cpu=True)
        dr = g.astype(dz.dtype)
    else:
        dx, dr = _dx(spec, dz, big, pos, v, a, k0 - k1 * v.delta, k1, mask)
    return dx, dr, s1, s2


_grads_pp = differentiable_per_platform(_grads, split=True, fused=False)


def _forward(spec: _Spec, x, gamma, beta, residual, mask, fallback):
    (y, mean, var, n), res = _fwd(spec.cfg, x, gamma, beta, mask, None, fallback)
    p = y if residual is None else y + residual
    z = _act(spec, p)
    if spec.keep == "z":  # shift and delta are not needed: u comes from z (and r)
        v, big, pos = _Vec(None, None, res.rstd, gamma, beta), z, residual
    else:
        v, big = _Vec(res.shift, res.delta, res.rstd, gamma, beta), x
        recompute = residual is None or spec.activation == "identity"
        pos = None if recompute else _sign(spec, p)
    return (z, mean, var, n), (big, pos, v, mask, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(spec, x, gamma, beta, residual, mask, fallback):
    return _forward(spec, x, gamma, beta, residual, mask, fallback)[0]


def _train_fwd(spec, x, gamma, beta, residual, mask, fallback):
    out, saved = _forward(spec, x, gamma, beta, residual, mask, fallback)
    return out, (saved, fallback)


@standard_promotion
def _train_bwd(spec: _Spec, saved, cotangents):
    (big, pos, v, mask, n), fallback = saved
    dz, dmean, dvar = cotangents[:3]
    dx, dr, s1, s2 = _grads_pp(spec, dz, big, pos, v, dmean, dvar, n, mask)
    gamma, cfg = v.gamma, spec.cfg
    dgamma = None if gamma is None else (v.rstd * s2).astype(gamma.dtype)
    dbeta = None if cfg.beta_dtype is None else s1.astype(cfg.beta_dtype)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    return dx, dgamma, dbeta, dr if spec.residual else None, None, zeros(fallback)


_train.defvjp(_train_fwd, _train_bwd)


def _check_activation(activation, negative_slope):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if activation != "leaky_relu":
        return 0.0
    ok = isinstance(negative_slope, (int, float)) and not isinstance(negative_slope, bool)
    if not (ok and np.isfinite(negative_slope) and negative_slope > 0):  # invertible
        raise ValueError(f"negative_slope must be a finite number > 0, got {negative_slope!r}.")
    return float(negative_slope)


def _check_residual(residual, x):
    if residual is None:
        return None
    residual = jnp.asarray(residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual has shape {residual.shape} and dtype {residual.dtype}, but x has "
            f"{x.shape} and {x.dtype}; expected an array of x's shape and dtype."
        )
    return residual


@standard_promotion
def batch_norm_act(
    x,
    gamma,
    beta,
    state,
    *,
    training: bool,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual=None,
    axis=-1,
    momentum: float | None = 0.9,
    eps: float = 1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    unbiased_running_var: bool = False,
    inplace: bool = False,
    custom_vjp: bool = True,
):
    """Batch norm, a residual add and an activation as one op: ``z = act(y + residual)``.

    ``y`` is :func:`jaxbn.batch_norm`'s output (training or evaluation); the
    hand-derived backward does not write ``dL/dy`` (but on CPU, keeping ``x``, where
    writing it once is fastest) and keeps ``x`` alone (``relu``, or any
    activation with a residual: plus one byte per value of ``sign(y + residual)`` for
    ``relu``/``leaky_relu``) or, with ``inplace=True``, the output ``z`` alone
    (``identity`` and ``leaky_relu``, as InPlace-ABN; with a residual, also the
    residual, an input the caller usually keeps anyway). See ``jaxbn._act`` for the
    derivation.

    Args:
      x, gamma, beta, state, training, axis, momentum, eps, axis_name,
        axis_index_groups, mask, unbiased_running_var: as for :func:`jaxbn.batch_norm`.
      activation: ``"relu"``, ``"leaky_relu"`` or ``"identity"``.
      negative_slope: leaky_relu's slope for negative inputs, a number > 0.
      residual: None, or an array of x's shape and dtype added before the activation.
      inplace: keep only ``z`` (and ``residual``) for the backward, so ``x`` can be
        freed after the forward (InPlace-ABN); not with ``"relu"``. Opt-in: where
        ``|gamma| <= sqrt(tiny)`` (a zero-initialized gamma) ``z`` holds no ``xhat``,
        and ``dgamma`` is 0 there instead of its value.
      custom_vjp: the hand-derived backward (default), or JAX's autodiff of the same
        forward (False), which pure forward mode (``jax.jvp``) needs.

    Returns:
      ``(z, new_state)``: ``z`` has x's shape and dtype; ``new_state`` as for
      :func:`jaxbn.batch_norm`.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> z, state = jaxbn.batch_norm_act(x, None, None, jaxbn.init_state(2), training=True)
      >>> z.round(3)
      Array([[0., 0.],
             [1., 1.]], dtype=float32)
    """
    training = _checks.check_training(training)
    cfg, x, gamma, beta, mask = _config(
        x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask
    )
    state = _checks.check_state(state, tuple(x.shape[a] for a in cfg.axes))
    momentum = _checks.check_momentum(momentum)
    slope = _check_activation(activation, negative_slope)
    residual = _check_residual(residual, x)
    if inplace and activation == "relu":
        raise ValueError(
            "inplace=True recovers the input from the output, which needs an invertible "
            "activation ('leaky_relu' or 'identity'); got activation='relu'."
        )
    keep = "z" if inplace else "x"
    spec = _Spec(cfg, activation, slope, keep, residual is not None)
    if not training:
        y = _eval(cfg, x, gamma, beta, state)
        return _act(spec, y if residual is None else y + residual), state
    reduced = [i for i in range(x.ndim) if i not in cfg.axes]
    _checks.check_batch_size(x.shape, reduced, axis_name)
    fallback = None if mask is None else (state.mean, state.var)
    if not custom_vjp:
        out = _forward(spec, x, gamma, beta, residual, mask, fallback)[0]
    else:
        gamma, beta = _vary_like_x(gamma, x), _vary_like_x(beta, x)
        try:
            out = _train(spec, x, gamma, beta, residual, mask, fallback)
        except TypeError as err:
            if "forward-mode" not in str(err):
                raise
            raise TypeError(_FORWARD_MODE_HINT) from err
    z, mean, var, count = out
    if unbiased_running_var:
        var = unbiased(var, count)
    return z, _update(state, mean, var, None if mask is None else count > 0, momentum)


_FORWARD_MODE_HINT = (
    "forward-mode differentiation (jax.jvp, jax.jacfwd) of batch_norm_act cannot use "
    "its hand-derived reverse rule; pass custom_vjp=False to differentiate the same "
    "forward computation with JAX's autodiff."
)
