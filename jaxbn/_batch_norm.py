"""The public functions: checks, train/eval switch and the running-statistics update."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks
from jaxbn._compat import pvary, varying_axes
from jaxbn._core import (
    _FORWARD_MODE_HINT,
    BatchNormResiduals,
    Renorm,
    _affine,
    _bwd,
    _Config,
    _fwd,
    _train,
)
from jaxbn._state import BatchNormState
from jaxbn._stats import standard_promotion


def _groups(axis_index_groups, axis_name):
    if axis_index_groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            "axis_index_groups was given without axis_name; pass the named axis "
            "that the groups index."
        )
    return tuple(tuple(int(i) for i in g) for g in axis_index_groups)


def _config(
    x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask
) -> tuple[_Config, jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    x = _checks.check_x(x)
    axes = _checks.normalize_axes(axis, x.ndim)
    fshape = tuple(x.shape[a] for a in axes)
    gamma = _checks.check_per_feature("gamma", gamma, fshape)
    beta = _checks.check_per_feature("beta", beta, fshape)
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v is not None and jnp.iscomplexobj(v) and not jnp.iscomplexobj(x):
            raise TypeError(
                f"{name} is complex ({v.dtype}) but x is real ({x.dtype}); expected a real {name}."
            )
    mask = _checks.check_mask(mask, x.shape)
    cfg = _Config(
        axes,
        _checks.check_eps(eps, x.dtype),
        axis_name,
        _groups(axis_index_groups, axis_name),
        None if beta is None else beta.dtype,
    )
    return cfg, x, gamma, beta, mask


def _vary_like_x(v, x):
    """Under shard_map, marks a replicated ``v`` as varying along x's manual axes.

    The custom rule returns this device's share of dgamma; shard_map accepts it
    only for an input that varies like ``x``, and autodiff then psums the shares,
    exactly as it does for ``gamma * xhat`` written in plain jnp. This holds with
    or without ``axis_name`` (per-device statistics).
    """
    if v is None:
        return v
    missing = tuple(sorted(varying_axes(x) - varying_axes(v), key=str))
    return pvary(v, missing) if missing else v


def _update(state: BatchNormState, mean, var, seen, momentum) -> BatchNormState:
    """running = momentum * running + (1 - momentum) * batch, in the state's dtype."""
    dt = state.var.dtype
    # complex input: the running mean becomes complex, as Flax's does (var stays real)
    mean_dt = (
        jnp.promote_types(state.mean.dtype, dt)
        if not jnp.iscomplexobj(mean)
        else (jnp.promote_types(state.mean.dtype, jnp.result_type(mean.dtype, dt)))
    )
    if momentum is None:  # cumulative average, PyTorch's momentum=None
        w = 1 / (state.count.astype(dt) + 1)
        keep = 1 - w
    else:
        keep, w = jnp.asarray(momentum, dt), jnp.asarray(1 - momentum, dt)
    new_mean = keep * state.mean.astype(mean_dt) + w * mean.astype(mean_dt)
    new_var = keep * state.var + w * var.astype(dt)
    step = jnp.ones((), state.count.dtype)
    if seen is not None:  # masked: a feature that saw no value keeps its statistics,
        new_mean = jnp.where(seen, new_mean, state.mean)
        new_var = jnp.where(seen, new_var, state.var)
        step = jnp.any(seen).astype(state.count.dtype)  # and a step that saw none is no update
    return BatchNormState(new_mean, new_var, state.count + step)


def unbiased(var, count):
    """``var * n / (n - 1)`` where ``n = count > 1`` (PyTorch's running variance)."""
    return jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), var)


def _normalize_train(cfg, x, gamma, beta, mask, renorm, custom_vjp, fallback):
    """Training-mode output and batch statistics ``(y, mean, var, count)``."""
    if not custom_vjp or jnp.iscomplexobj(x):  # complex x: autodiff of the same forward
        return _fwd(cfg, x, gamma, beta, mask, renorm, fallback)[0]
    gamma, beta = _vary_like_x(gamma, x), _vary_like_x(beta, x)
    try:
        return _train(cfg, x, gamma, beta, mask, renorm, fallback)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise TypeError(_FORWARD_MODE_HINT) from err


def _ghost(cfg, x, gamma, beta, mask, renorm, custom_vjp, fallback, size):
    """Ghost batches: axis 0 split into groups of ``size``, each with its own statistics.

    The groups become one more kept axis, so the core normalizes them unchanged;
    returns the per-group statistics with the group axis first.
    """
    groups = x.shape[0] // size
    xg = x.reshape((groups, size) + x.shape[1:])
    tile = lambda v: None if v is None else jnp.broadcast_to(v, (groups,) + v.shape)  # noqa: E731
    gcfg = cfg._replace(axes=(0,) + tuple(a + 1 for a in cfg.axes))
    mg = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(xg.shape)
    rg = None if renorm is None else renorm._replace(mean=tile(renorm.mean), var=tile(renorm.var))
    fg = None if fallback is None else tuple(tile(v) for v in fallback)
    y, mean, var, count = _normalize_train(
        gcfg, xg, tile(gamma), tile(beta), mg, rg, custom_vjp, fg
    )
    return y.reshape(x.shape), mean, var, count


@standard_promotion
def batch_norm(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    state: BatchNormState,
    *,
    training: bool,
    axis: int | Sequence[int] = -1,
    momentum: float | None = 0.9,
    eps: float = 1e-5,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
    unbiased_running_var: bool = False,
    renorm: tuple[ArrayLike, ArrayLike] | None = None,
    virtual_batch_size: int | None = None,
    custom_vjp: bool = True,
) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization with explicit running statistics.

    Training (``training=True``) normalizes with the statistics of this batch::

        y = gamma * (x - mean) / sqrt(var + eps) + beta
        new_state.mean = momentum * state.mean + (1 - momentum) * mean

    (and the same for ``var``, the biased batch variance). Evaluation uses the
    running statistics, in the centred form ``(x - state.mean) * scale + beta`` with
    ``scale = gamma / sqrt(state.var + eps)``, and returns ``state`` unchanged.

    ``axis`` names the *feature* axes, which are kept: the statistics reduce over
    every other axis (haiku and ``jax.nn.standardize`` use ``axis`` for the reduced
    axes instead). ``momentum`` is the weight on the old value (PyTorch's is
    ``1 - momentum``).

    Args:
      x: floating array, e.g. ``(N, C)``, NHWC ``(N, H, W, C)`` with ``axis=-1`` or
        NCHW ``(N, C, H, W)`` with ``axis=1``; no transpose happens.
      gamma: scale, shape ``x.shape[axis]``, or None for no scale.
      beta: offset, shape ``x.shape[axis]``, or None for no offset.
      state: :class:`jaxbn.BatchNormState` from :func:`jaxbn.init_state`.
      training: required Python bool: batch statistics (True) or running ones.
      axis: feature axis, or tuple of feature axes.
      momentum: in ``[0, 1]``, or None for a cumulative average over updates
        (PyTorch's ``momentum=None``; uses ``state.count``).
      eps: added to the variance, finite and > 0.
      axis_name: named axis (``shard_map``, ``pmap``, ``vmap``) whose devices hold
        parts of one batch: statistics are those of the whole batch, counted
        exactly when devices hold unequal numbers of masked-in values.
      axis_index_groups: groups of devices along ``axis_name`` that share
        statistics, as for ``lax.psum``.
      mask: boolean, broadcastable to ``x``: the values that count toward the
        statistics (all of them are normalized).
      unbiased_running_var: store the unbiased batch variance ``var * n / (n - 1)``
        in the running variance, as PyTorch does (normalization still uses the
        biased one).
      renorm: None, or ``(rmax, dmax)`` for batch renormalization (Ioffe, 2017):
        in training, ``y = gamma * (r * xhat + d) + beta`` with
        ``r = clip(sigma / sigma_running, 1/rmax, rmax)`` and
        ``d = clip((mean - running_mean) / sigma_running, -dmax, dmax)``,
        ``sigma = sqrt(var + eps)``, both constants for differentiation. The
        limits may be traced scalars (for a schedule); Python numbers are checked.
      virtual_batch_size: ghost batch norm: in training, axis 0 is split into
        groups of this size, each normalized with its own statistics; the running
        statistics move toward the mean of the groups'. Evaluation is unchanged.
      custom_vjp: use the hand-derived backward (default). False differentiates
        the same computation with JAX's autodiff, which pure forward mode
        (``jax.jvp``, ``jax.jacfwd`` of batch_norm) needs; forward-over-reverse
        (``jax.hessian``, Hessian-vector products) works either way.

    Returns:
      ``(y, new_state)``: ``y`` has the shape and dtype of ``x``; ``new_state``
      has the shapes and dtypes of ``state``.

    Raises:
      TypeError, ValueError: for arguments that do not fit, before tracing.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> y, state = jaxbn.batch_norm(x, None, None, jaxbn.init_state(2), training=True)
      >>> y.round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> state.mean
      Array([0.2, 2. ], dtype=float32)
    """
    training = _checks.check_training(training)
    cfg, x, gamma, beta, mask = _config(
        x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask
    )
    state = _checks.check_state(state, tuple(x.shape[a] for a in cfg.axes))
    momentum = _checks.check_momentum(momentum)
    limits = _checks.check_renorm(renorm)
    if not training:  # ghost batches are a training-time option: any eval batch works
        _checks.check_virtual_batch_size(virtual_batch_size, None, cfg.axes, axis_name)
        return _eval(cfg, x, gamma, beta, state), state
    size = _checks.check_virtual_batch_size(virtual_batch_size, x.shape, cfg.axes, axis_name)
    reduced = [i for i in range(x.ndim) if i not in cfg.axes]
    _checks.check_batch_size(x.shape, reduced, axis_name, cfg.groups)
    if size:
        _checks.check_batch_size((size,) + x.shape[1:], reduced, None, None, "virtual_batch_size")
    if limits is not None and jnp.iscomplexobj(x):
        raise TypeError(f"renorm needs real x (r and d are clipped), got dtype {x.dtype}.")
    rn = None if limits is None else Renorm(state.mean, state.var, *limits)
    fallback = None if mask is None else (state.mean, state.var)
    try:
        if size:
            out = _ghost(cfg, x, gamma, beta, mask, rn, custom_vjp, fallback, size)
        else:
            out = _normalize_train(cfg, x, gamma, beta, mask, rn, custom_vjp, fallback)
    except NotImplementedError as err:
        if cfg.groups is None or str(err):
            raise
        raise NotImplementedError(_checks.GROUPS_UNSUPPORTED) from err
    y, mean, var, count = out
    if unbiased_running_var:
        var = unbiased(var, count)
    seen = None if mask is None else count > 0
    if size and seen is None:  # the mean of the groups' statistics
        mean, var = jnp.mean(mean, 0), jnp.mean(var, 0)
    elif size:  # ... over the groups that saw a value of the feature
        w = count > 0
        mean, var = (jnp.sum(v * w, 0) / jnp.maximum(jnp.sum(w, 0), 1) for v in (mean, var))
        seen = jnp.any(w, 0)
    return y, _update(state, mean, var, seen, momentum)


def _eval(cfg, x, gamma, beta, state):
    """(x - mean) * (gamma * rsqrt(var + eps)) + beta with the running statistics."""
    rstd = lax.rsqrt(state.var + cfg.eps)
    return _affine(x, state.mean, None, rstd, gamma, beta, cfg.axes)


@standard_promotion
def frozen_batch_norm(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    state: BatchNormState,
    *,
    axis: int | Sequence[int] = -1,
    eps: float = 1e-5,
    trainable: bool = False,
) -> jax.Array:
    """Batch norm as a fixed affine map (detectron2's ``FrozenBatchNorm2d``).

    ``y = (x - state.mean) * gamma / sqrt(state.var + eps) + beta`` in training and
    evaluation alike; the statistics never change and get no gradient. With
    ``trainable=False`` (the default) ``gamma`` and ``beta`` get none either, so the
    backward is ``dx = dy * scale`` and keeps no residual of ``x``'s size, cheaper
    than evaluation-mode :func:`batch_norm` (whose ``dgamma`` reads ``x``).

    Args:
      x, gamma, beta, axis, eps: as for :func:`batch_norm`.
      state: the frozen statistics.
      trainable: let gradients reach ``gamma`` and ``beta``.

    Returns:
      ``y``, the shape and dtype of ``x``.
    """
    cfg, x, gamma, beta, _ = _config(x, gamma, beta, axis, eps, None, None, None)
    state = _checks.check_state(state, tuple(x.shape[a] for a in cfg.axes))
    if not trainable:
        gamma, beta = lax.stop_gradient(gamma), lax.stop_gradient(beta)
    return _eval(cfg, x, gamma, beta, lax.stop_gradient(state))


@standard_promotion
def batch_norm_fwd(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    *,
    axis: int | Sequence[int] = -1,
    eps: float = 1e-5,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], BatchNormResiduals]:
    """The training-mode forward of the custom rule, for inspection and notebooks.

    Args:
      x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask: as for :func:`batch_norm`.

    Returns:
      ``((y, mean, var, count), residuals)``: the normalized output, the batch
      mean and biased variance (feature shape, float32 or wider), the number of
      values counted, and the
      :class:`BatchNormResiduals` that :func:`batch_norm_bwd` takes.
    """
    cfg, x, gamma, beta, mask = _config(
        x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask
    )
    reduced = [i for i in range(x.ndim) if i not in cfg.axes]
    _checks.check_batch_size(x.shape, reduced, axis_name, cfg.groups, allow_one=True)
    return _fwd(cfg, x, gamma, beta, mask)


@standard_promotion
def batch_norm_bwd(
    residuals: BatchNormResiduals,
    dy: ArrayLike,
    dmean: ArrayLike | None = None,
    dvar: ArrayLike | None = None,
    *,
    axis: int | Sequence[int] = -1,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The hand-derived backward (see ``jaxbn._core`` for the derivation).

    Args:
      residuals: from :func:`batch_norm_fwd` with the same ``axis``.
      dy: cotangent of ``y``, the shape of ``x``.
      dmean, dvar: cotangents of the batch statistics, or None for zero.

    Returns:
      ``(dx, dgamma, dbeta)``; ``dgamma`` is None when ``gamma`` was None.
    """
    x = residuals.x
    axes = _checks.normalize_axes(axis, x.ndim)
    dy = _checks.check_cotangents(residuals, axes, dy, dmean, dvar)
    zeros = jnp.zeros_like(residuals.rstd)
    cfg = _Config(axes, 1.0, axis_name, _groups(axis_index_groups, axis_name), residuals.rstd.dtype)
    cts = (dy, zeros if dmean is None else dmean, zeros if dvar is None else dvar)
    return _bwd(cfg, residuals, cts)
