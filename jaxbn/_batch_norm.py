"""The public functions: one pipeline from the checks to the running-statistics update.

``batch_norm`` and ``batch_norm_act`` are two entries to :func:`normalize`::

    checks (jaxbn._checks) -> training? -> the rule (jaxbn._core: statistics,
    normalization, activation and residual; its backward) -> running-state update
    (jaxbn._state); evaluation: the running statistics' affine map, then the activation.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks, _core
from jaxbn._compat import standard_promotion, vary_like
from jaxbn._core import BatchNormResiduals, Renorm, Spec
from jaxbn._state import BatchNormState, check_state, unbiased, update

_FORWARD_MODE_HINT = (
    "forward-mode differentiation (jax.jvp, jax.jacfwd) cannot use jaxbn's "
    "hand-derived reverse rule; pass custom_vjp=False to batch_norm (or "
    "batch_norm_act) to differentiate the same forward computation with JAX's autodiff."
)


def _spec_and_inputs(
    x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask, **act
) -> tuple[Spec, jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    """The checked ``(spec, x, gamma, beta, mask)``; ``act``: the rule's activation fields."""
    x = _checks.check_x(x)
    axes = _checks.normalize_axes(axis, x.ndim)
    fshape = tuple(x.shape[a] for a in axes)
    gamma = _checks.check_per_feature("gamma", gamma, fshape, x)
    beta = _checks.check_per_feature("beta", beta, fshape, x)
    mask = _checks.check_mask(mask, x.shape)
    axis_name = _checks.check_axis_name(axis_name)
    groups = _checks.check_groups(axis_index_groups, axis_name)
    spec = Spec(axes, _checks.check_eps(eps, x.dtype), axis_name, groups, **act)
    return spec, x, gamma, beta, mask


@standard_promotion
def normalize(
    x,
    gamma,
    beta,
    state,
    *,
    training,
    axis=-1,
    momentum=0.9,
    eps=1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    unbiased_running_var=False,
    renorm=None,
    virtual_batch_size=None,
    custom_vjp=True,
    activation="identity",
    negative_slope=0.01,
    residual=None,
    inplace=False,
    one_value=False,
):
    """:func:`batch_norm_act`'s arguments; ``one_value``: allow one value per feature in
    training (Flax's and Equinox's modules do: ``var = 0``, ``y = beta``), where
    :func:`batch_norm` raises, as PyTorch does."""
    training = _checks.check_training(training)
    act = _checks.check_activation(activation, negative_slope, inplace)
    spec, x, gamma, beta, mask = _spec_and_inputs(
        x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask, **act
    )
    residual = _checks.check_residual(residual, x)
    spec = spec._replace(residual=residual is not None)
    state = check_state(state, tuple(x.shape[a] for a in spec.axes))
    momentum = _checks.check_momentum(momentum)
    limits = _checks.check_renorm(renorm)
    if not training:  # ghost batches are a training-time option: any eval batch works
        _checks.check_virtual_batch_size(virtual_batch_size, None, spec.axes, axis_name)
        y = _eval(spec, x, gamma, beta, state)
        y = y if residual is None else y + residual
        return _core.activate(spec.activation, spec.slope, y), state
    size = _checks.check_virtual_batch_size(virtual_batch_size, x.shape, spec.axes, axis_name)
    reduced = [i for i in range(x.ndim) if i not in spec.axes]
    _checks.check_batch_size(x.shape, reduced, axis_name, spec.groups, allow_one=one_value)
    if size:
        _checks.check_batch_size(
            (size,) + x.shape[1:], reduced, None, None, "virtual_batch_size", one_value
        )
    if limits is not None and jnp.iscomplexobj(x):  # a training option: eval ignores it
        raise TypeError(f"renorm needs real x (r and d are clipped), got dtype {x.dtype}.")
    rn = None if limits is None else Renorm(state.mean, state.var, *limits)
    fallback = None if mask is None else (state.mean, state.var)
    args = (x, gamma, beta, residual, mask, rn, fallback)
    try:
        out = _ghost(spec, *args, custom_vjp, size) if size else _train(spec, *args, custom_vjp)
    except NotImplementedError as err:
        if spec.groups is None:
            raise
        raise NotImplementedError(_checks.GROUPS_UNSUPPORTED) from err
    y, mean, var, count = out
    if unbiased_running_var:
        var = unbiased(var, count)
    seen = None if mask is None else count > 0
    if size and seen is None:  # the mean of the groups' statistics
        mean, var = jnp.mean(mean, 0), jnp.mean(var, 0)
    elif size:  # ... over the groups that saw a value of the feature
        mean, var = (jnp.sum(v * seen, 0) / jnp.maximum(jnp.sum(seen, 0), 1) for v in (mean, var))
        seen = jnp.any(seen, 0)
    return y, update(state, mean, var, seen, momentum)


def _train(spec, x, gamma, beta, residual, mask, renorm, fallback, custom_vjp):
    """Training-mode output and batch statistics ``(z, mean, var, count)``."""
    args = (x, gamma, beta, residual, mask, renorm, fallback)
    if not custom_vjp or jnp.iscomplexobj(x):  # complex x: autodiff of the same forward
        return _core.forward(spec, *args)[0]
    # shard_map: dgamma is this device's share, accepted for a gamma that varies like x
    gamma, beta = vary_like(gamma, x), vary_like(beta, x)
    try:
        return _core.train(spec, x, gamma, beta, residual, mask, renorm, fallback)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise TypeError(_FORWARD_MODE_HINT) from err


def _ghost(spec, x, gamma, beta, residual, mask, renorm, fallback, custom_vjp, size):
    """Ghost batches: axis 0 split into groups of ``size``, each with its own statistics.

    The groups become one more kept axis, so the rule normalizes them unchanged;
    returns the per-group statistics with the group axis first.
    """
    groups = x.shape[0] // size
    split = lambda v: None if v is None else v.reshape((groups, size) + x.shape[1:])  # noqa: E731
    tile = lambda v: None if v is None else jnp.broadcast_to(v, (groups,) + v.shape)  # noqa: E731
    gspec = spec._replace(axes=(0,) + tuple(a + 1 for a in spec.axes))
    mg = None if mask is None else split(jnp.broadcast_to(mask, x.shape))
    rg = None if renorm is None else renorm._replace(mean=tile(renorm.mean), var=tile(renorm.var))
    fg = None if fallback is None else tuple(tile(v) for v in fallback)
    y, mean, var, count = _train(
        gspec, split(x), tile(gamma), tile(beta), split(residual), mg, rg, fg, custom_vjp
    )
    return y.reshape(x.shape), mean, var, count


def _eval(spec, x, gamma, beta, state):
    """(x - mean) * (gamma * rsqrt(var + eps)) + beta with the running statistics."""
    rstd = lax.rsqrt(state.var + spec.eps)
    return _core.affine(x, state.mean, None, rstd, gamma, beta, spec.axes)


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
    return normalize(
        x,
        gamma,
        beta,
        state,
        training=training,
        axis=axis,
        momentum=momentum,
        eps=eps,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        unbiased_running_var=unbiased_running_var,
        renorm=renorm,
        virtual_batch_size=virtual_batch_size,
        custom_vjp=custom_vjp,
    )


@standard_promotion
def batch_norm_act(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    state: BatchNormState,
    *,
    training: bool,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: ArrayLike | None = None,
    inplace: bool = False,
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
    """Batch norm, a residual add and an activation as one op: ``z = act(y + residual)``.

    ``y`` is :func:`jaxbn.batch_norm`'s output (training or evaluation); the
    hand-derived backward does not write ``dL/dy`` (but on CPU, keeping ``x``, where
    writing it once is fastest) and keeps ``x`` alone (``relu``, or any
    activation with a residual: plus one byte per value of ``sign(y + residual)`` for
    ``relu``/``leaky_relu``) or, with ``inplace=True``, the output ``z`` alone
    (``identity`` and ``leaky_relu``, as InPlace-ABN; with a residual, also the
    residual, an input the caller usually keeps anyway). See ``jaxbn._core`` for the
    derivation.

    Args:
      x, gamma, beta, state, training: as for :func:`jaxbn.batch_norm`.
      activation: ``"relu"``, ``"leaky_relu"`` or ``"identity"``.
      negative_slope: leaky_relu's slope for negative inputs, a number > 0.
      residual: None, or an array of x's shape and dtype added before the activation.
      inplace: keep only ``z`` (and ``residual``) for the backward, so ``x`` can be
        freed after the forward (InPlace-ABN); not with ``"relu"``. Opt-in: where
        ``|gamma| <= sqrt(tiny)`` (a zero-initialized gamma) ``z`` holds no ``xhat``,
        and ``dgamma`` is 0 there instead of its value.
      axis, momentum, eps, axis_name, axis_index_groups, mask, unbiased_running_var,
        renorm, virtual_batch_size, custom_vjp: as for :func:`jaxbn.batch_norm`.

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
    return normalize(
        x,
        gamma,
        beta,
        state,
        training=training,
        activation=activation,
        negative_slope=negative_slope,
        residual=residual,
        inplace=inplace,
        axis=axis,
        momentum=momentum,
        eps=eps,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        unbiased_running_var=unbiased_running_var,
        renorm=renorm,
        virtual_batch_size=virtual_batch_size,
        custom_vjp=custom_vjp,
    )


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
    spec, x, gamma, beta, _ = _spec_and_inputs(x, gamma, beta, axis, eps, None, None, None)
    state = check_state(state, tuple(x.shape[a] for a in spec.axes))
    if not trainable:
        gamma, beta = lax.stop_gradient(gamma), lax.stop_gradient(beta)
    return _eval(spec, x, gamma, beta, lax.stop_gradient(state))


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
      ``((y, mean, var, count), residuals)``: the normalized output, the batch mean and
      biased variance (feature shape, float32 or wider), the number of values counted,
      and the :class:`BatchNormResiduals` that :func:`batch_norm_bwd` takes.
    """
    spec, x, gamma, beta, mask = _spec_and_inputs(
        x, gamma, beta, axis, eps, axis_name, axis_index_groups, mask
    )
    reduced = [i for i in range(x.ndim) if i not in spec.axes]
    _checks.check_batch_size(x.shape, reduced, axis_name, spec.groups, allow_one=True)
    out, saved = _core.forward(spec, x, gamma, beta, mask=mask)
    return out, saved.res


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
    axes = _checks.normalize_axes(axis, residuals.x.ndim)
    dy = _checks.check_cotangents(residuals, axes, dy, dmean, dvar)
    zeros = jnp.zeros_like(residuals.rstd)
    spec = Spec(axes, 1.0, axis_name, _checks.check_groups(axis_index_groups, axis_name))
    saved = _core.Saved(residuals, zeros, None, None)  # dbeta in the statistics' dtype
    cts = (dy, zeros if dmean is None else dmean, zeros if dvar is None else dvar)
    return _core.backward(spec, saved, cts)[:3]
