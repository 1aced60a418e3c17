"""``jaxbn.nnx.BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm``.

Change one import and the model keeps its constructor, call signature, variables
(``nnx.Param`` ``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``),
``train()``/``eval()`` and checkpoints; the normalization underneath is
:func:`jaxbn.batch_norm`. This module creates the variables, picks training or
evaluation and calls the core: it holds no arithmetic.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

try:
    from flax import nnx
    from flax.nnx.nn import dtypes, initializers
except ImportError as err:  # flax is an optional extra
    raise ImportError(
        'jaxbn.nnx needs flax, which is not installed; install it with pip install "jaxbn[flax]".'
    ) from err

from jaxbn import _checks
from jaxbn._modules import call_core, call_renorm
from jaxbn._state import BatchNormState

__all__ = ["BatchNorm", "BatchRenorm"]

_ZEROS, _ONES = initializers.zeros_init(), initializers.ones_init()  # Flax's defaults


def _param(use: bool, init, rngs: nnx.Rngs, shape, dtype, metadata=MappingProxyType({})):
    """``nnx.Param(init(key, shape, dtype))``, or ``nnx.data(None)`` when not used."""
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata) if use else nnx.data(None)


def _check_features(module, x) -> None:
    """``x`` has the module's ``num_features`` along its ``axis``."""
    axes = _checks.normalize_axes(module.axis, x.ndim)
    shape = tuple(x.shape[a] for a in axes)
    if shape != module.mean[...].shape:
        raise ValueError(
            f"x of shape {x.shape} has {shape if len(shape) > 1 else shape[0]} "
            f"features along axis {module.axis}, but {type(module).__name__} was built with "
            f"num_features={module.num_features!r}; expected x.shape[axis] == num_features."
        )


def _use_running_average(module, call) -> bool:
    """The call's value, else the module's (set by the constructor, train() or eval())."""
    value = module.use_running_average if call is None else call
    if value is None:
        raise ValueError(
            f"use_running_average is None both on the module and at call time; pass "
            f"use_running_average=True/False to {type(module).__name__}(...) or the call, "
            f"or use model.train() / model.eval()."
        )
    return _checks.check_use_running_average(value)


class BatchNorm(nnx.BatchNorm):
    """Batch normalization with running statistics, as ``flax.nnx.BatchNorm``.

    In training (``use_running_average=False``, ``model.train()``) each feature
    is normalized with the statistics of the batch and the running ones are
    updated::

        y = scale * (x - mean) / sqrt(var + epsilon) + bias
        self.mean = momentum * self.mean + (1 - momentum) * mean

    (the same for ``var``, the biased batch variance); in evaluation (``model.eval()``)
    the running statistics are used and left unchanged. ``axis`` names the *feature*
    axes (kept) and ``momentum`` is the weight on the old value, both as in Flax.

    Differences from Flax, all in what is computed, none in the interface:

    - The variance is always jaxbn's stable shifted two-pass one (see
      ``jaxbn._stats``). Flax's default ``use_fast_variance=True`` computes
      ``E[x^2] - E[x]^2``, which loses about ``(mean/std)^2 * 6e-8`` of relative
      precision in float32: at ``x = 1e4 + randn`` its variance is off by tens of
      times. The argument is accepted and ignored; results match Flax's
      ``use_fast_variance=False``.
    - The running statistics stay float32 even with ``dtype=jnp.bfloat16``;
      ``promote_dtype`` is applied to ``x``, ``scale`` and ``bias`` only.
    - The gradient is jaxbn's hand-derived backward.

    The last eight arguments are jaxbn's options, with defaults that keep the module
    a drop-in for Flax's. ``momentum=None`` keeps a cumulative average and adds a
    ``count`` ``nnx.BatchStat``; ``activation="relu"`` (or ``"leaky_relu"``,
    ``"identity"``) returns ``activation(y + residual)`` computed by
    :func:`jaxbn.batch_norm_act`, with the same variables.

    Args:
      num_features: ``x.shape[axis]``; a tuple of sizes for several feature axes.
      use_running_average: True normalizes with the stored statistics; a value
        given at call time takes precedence (default False).
      axis: the feature axis, or a tuple of feature axes (default -1, NHWC).
      momentum: weight on the old running value, in ``[0, 1]`` (default 0.99).
      epsilon: added to the variance (default 1e-5).
      dtype: dtype of the output (default: promoted from ``x``, the statistics
        and the params, as in Flax).
      param_dtype: dtype of ``scale`` and ``bias`` (default float32).
      use_bias: learn an offset ``bias`` (beta).
      use_scale: learn a scale ``scale`` (gamma).
      bias_init: initializer for ``bias`` (default zeros).
      scale_init: initializer for ``scale`` (default ones).
      axis_name: named axis (``shard_map``, ``nnx.vmap``) whose devices hold
        parts of one batch; not needed under ``jit`` with sharded inputs.
      axis_index_groups: groups of devices along ``axis_name`` that share
        statistics, as for ``lax.psum``.
      use_fast_variance: accepted for compatibility; jaxbn's variance is always
        the stable one (see above).
      promote_dtype: Flax's dtype promotion, called with
        ``(x, mean, var, scale, bias)``; its ``x``, ``scale`` and ``bias`` are used.
      rngs: :class:`flax.nnx.Rngs` for the initializers.
      bias_metadata: metadata for the ``bias`` ``nnx.Param``.
      scale_metadata: metadata for the ``scale`` ``nnx.Param``.
      unbiased_running_var, renorm, virtual_batch_size, frozen, custom_vjp, activation, negative_slope, inplace: as for :class:`jaxbn.linen.BatchNorm`.

    Raises:
      TypeError, ValueError: if ``num_features`` is not a positive int (or a
        tuple of them).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.nnx import BatchNorm
      >>> bn = BatchNorm(2, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> bn(x).round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> bn.mean[...].round(3)
      Array([0.02, 0.2 ], dtype=float32)
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Any = MappingProxyType({}),
        scale_metadata: Any = MappingProxyType({}),
        unbiased_running_var: bool = False,
        renorm: tuple[float, float] | None = None,
        virtual_batch_size: int | None = None,
        frozen: bool = False,
        custom_vjp: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        inplace: bool = False,
    ):
        shape = _checks.feature_shape_of(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        if momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        # scale before bias: the order in which Flax draws keys from rngs.params
        self.scale = _param(use_scale, scale_init, rngs, shape, param_dtype, scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self.num_features = num_features  # type: ignore[assignment]  # wider than Flax's int
        self.use_running_average = use_running_average
        self.axis = axis  # type: ignore[assignment]  # wider than Flax's int
        self.momentum = _checks.check_momentum(momentum)
        self.epsilon = _checks.check_eps(epsilon, name="epsilon")
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var
        self.renorm = renorm
        self.virtual_batch_size = virtual_batch_size
        self.frozen = frozen
        self.custom_vjp = custom_vjp
        self.activation = activation
        self.negative_slope = negative_slope
        self.inplace = inplace

    def __call__(
        self,
        x,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
        residual: jax.Array | None = None,
    ):
        """Normalizes ``x`` and, in training, updates ``mean`` and ``var``.

        Args:
          x: array with ``num_features`` along ``axis``, e.g. NHWC
            ``(N, H, W, C)`` or ``(N, C)``.
          use_running_average: True for evaluation; overrides the attribute
            set by the constructor, ``train()`` or ``eval()``.
          mask: boolean, broadcastable to ``x``: the values that count toward the
            statistics.
          residual: None, or an array of ``x``'s shape added to the normalized
            ``x`` before the activation (``"identity"`` if there is none); its
            gradient flows back.

        Returns:
          The normalized ``x`` (with the residual and activation, if any), same
          shape, in the dtype described above.

        Raises:
          ValueError: if ``use_running_average`` is None both here and on the
            module, or ``x`` does not have ``num_features`` along ``axis``.
        """
        use_running_average = _use_running_average(self, use_running_average)
        x = jnp.asarray(x)
        _check_features(self, x)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        mean, var = self.mean[...], self.var[...]
        x, _, _, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
        count = self.count[...] if self.momentum is None else jnp.zeros((), jnp.int32)
        state = BatchNormState(mean, var, count)
        if residual is not None:  # as act(bn(x) + residual) promotes
            residual = jnp.asarray(residual)
            dt = jnp.promote_types(x.dtype, residual.dtype)
            x, residual = x.astype(dt), residual.astype(dt)
        training = not use_running_average
        y, new = call_core(self, x, scale, bias, state, training, mask, residual)
        if new is not None and training:
            # As Flax does: the stored statistics carry no tangent (a hijax variable,
            # updated in place, cannot hold one).
            can_update = self.mean._can_update or self.var._can_update
            keep = jax.lax.stop_gradient if can_update else lambda v: v
            self.mean[...] = keep(new.mean)
            self.var[...] = keep(new.var)
            if self.momentum is None:
                self.count[...] = new.count
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``.

        Args:
          use_running_average: if given, sets the module's attribute.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(nnx.Module):
    """Batch renormalization with a warm-up, as :class:`jaxbn.linen.BatchRenorm`, for NNX.

    The same behaviour (sbx's ``BatchRenorm``: plain batch norm for ``warmup_steps``
    training calls, then renormalization with ``r_max`` and ``d_max``; see
    :func:`jaxbn.batch_renorm`) and a state of the same names: ``nnx.Param``
    ``scale``/``bias``, ``nnx.BatchStat`` ``mean``, ``var``, ``r_max``, ``d_max`` and
    ``steps``. ``train()``/``eval()`` set ``use_running_average``, as for
    :class:`BatchNorm`.

    Args:
      num_features: ``x.shape[axis]`` (a tuple for several feature axes).
      use_running_average, axis, momentum, epsilon, warmup_steps, dtype, param_dtype,
        use_bias, use_scale, bias_init, scale_init, axis_name, axis_index_groups: as
        for :class:`jaxbn.linen.BatchRenorm` (defaults 0.99, 0.001, 100_000).
      r_max, d_max: the limits' initial values (3 and 5).
      rngs: :class:`flax.nnx.Rngs` for the initializers.
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float = 0.99,
        epsilon: float = 0.001,
        warmup_steps: int = 100_000,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        r_max: float = 3.0,
        d_max: float = 5.0,
        rngs: nnx.Rngs,
    ):
        shape = _checks.feature_shape_of(num_features)
        _checks.check_limits(r_max, d_max)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.r_max = nnx.BatchStat(jnp.asarray(r_max, jnp.float32))
        self.d_max = nnx.BatchStat(jnp.asarray(d_max, jnp.float32))
        self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.scale = _param(use_scale, scale_init, rngs, shape, param_dtype)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = _checks.check_momentum(momentum)
        self.epsilon = _checks.check_eps(epsilon, name="epsilon")
        self.warmup_steps = warmup_steps
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    def __call__(self, x, use_running_average: bool | None = None):
        """Normalizes ``x``; in training updates ``mean``, ``var`` and ``steps``."""
        use_running_average = _use_running_average(self, use_running_average)
        x = jnp.asarray(x)
        _check_features(self, x)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, scale, bias = dtypes.promote_dtype((x, scale, bias), dtype=self.dtype)
        state = BatchNormState(self.mean[...], self.var[...], self.steps[...])
        training, r_max, d_max = not use_running_average, self.r_max[...], self.d_max[...]
        y, new = call_renorm(self, x, scale, bias, state, training, r_max, d_max, self.warmup_steps)
        if training:
            self.mean[...] = jax.lax.stop_gradient(new.mean)
            self.var[...] = jax.lax.stop_gradient(new.var)
            self.steps[...] = new.count
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: sets ``use_running_average`` if given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
