"""``jaxbn.linen.BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm``.

Change one import and the model keeps its fields, call signature, variable names
(``params/{scale,bias}``, ``batch_stats/{mean,var}``) and checkpoints; the
normalization underneath is :func:`jaxbn.batch_norm`. This module creates the
variables, picks training or evaluation and calls the core: it holds no arithmetic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

try:
    import flax.linen as nn
    from flax.errors import FlaxError, ModifyScopeVariableError
    from flax.linen.dtypes import canonicalize_dtype
except ImportError as err:  # flax is an optional extra
    raise ImportError(
        'jaxbn.linen needs flax, which is not installed; install it with pip install "jaxbn[flax]".'
    ) from err

from jaxbn import _checks
from jaxbn._batch_norm import normalize
from jaxbn._modules import call_core, call_renorm
from jaxbn._state import BatchNormState

__all__ = ["BatchNorm", "BatchRenorm"]


def _merge_use_running_average(constructor, call) -> bool:
    """linen's rule: ``use_running_average`` comes from exactly one of the two places."""
    if constructor is None and call is None:
        raise ValueError(
            "use_running_average was given neither to BatchNorm(...) nor at call time; "
            "pass it once, e.g. BatchNorm(use_running_average=not train) or bn(x, "
            "use_running_average=not train)."
        )
    if constructor is not None and call is not None:
        raise ValueError(
            f"use_running_average was given both to BatchNorm(...) ({constructor!r}) and "
            f"at call time ({call!r}); pass it in one place only."
        )
    return _checks.check_use_running_average(constructor if call is None else call)


def _core_state(mean, var, count=None) -> BatchNormState:
    """The core's state from stored statistics; Flax stores no count (only momentum=None needs one)."""
    var_dt = jnp.promote_types(var.dtype, jnp.float32)
    mean_dt = jnp.promote_types(mean.dtype, var_dt)  # complex after training on complex x
    count = jnp.zeros((), jnp.int32) if count is None else count
    return BatchNormState(mean.astype(mean_dt), var.astype(var_dt), count)


def _immutable_batch_stats(module: nn.Module) -> ModifyScopeVariableError:
    """Flax's own error for training without ``mutable=["batch_stats"]``, saying what to pass."""
    path = "/" if module.scope is None else module.scope.path_text
    err = ModifyScopeVariableError.__new__(ModifyScopeVariableError)
    FlaxError.__init__(  # Flax's message, then the remedy; Flax appends its docs link
        err,
        f'Cannot update variable "mean" in "{path}" because collection "batch_stats" is '
        "immutable. Training (use_running_average=False) updates the running statistics: "
        'pass mutable=["batch_stats"] to apply and keep the returned updates, or '
        "use_running_average=True to evaluate.",
    )
    return err


def _scale_bias(module: nn.Module, shape):
    """The ``scale`` and ``bias`` params of ``module`` (BatchNorm's fields), None where unused."""
    scale = bias = None
    if module.use_scale:
        scale = module.param("scale", module.scale_init, shape, module.param_dtype)
    if module.use_bias:
        bias = module.param("bias", module.bias_init, shape, module.param_dtype)
    return scale, bias


def _stored_dtype(stats_dtype, value):
    """The stored statistics keep their dtype, but for a complex running mean, as in Flax."""
    return jnp.promote_types(stats_dtype, value.dtype) if jnp.iscomplexobj(value) else stats_dtype


class BatchNorm(nn.BatchNorm):
    """Batch normalization with running statistics, as ``flax.linen.BatchNorm``.

    In training (``use_running_average=False``) each feature is normalized with
    the statistics of the batch, and the running ones are updated::

        y = scale * (x - mean) / sqrt(var + epsilon) + bias
        batch_stats.mean = momentum * batch_stats.mean + (1 - momentum) * mean

    (the same for ``var``, the biased batch variance); in evaluation the running
    statistics are used and left unchanged. ``axis`` names the *feature* axes
    (kept) and ``momentum`` is the weight on the old value, both as in Flax.

    Differences from Flax, all in what is computed, none in the interface:

    - The variance is always jaxbn's stable shifted two-pass one (see
      ``jaxbn._stats``). Flax's default ``use_fast_variance=True`` computes
      ``E[x^2] - E[x]^2``, which loses about ``(mean/std)^2 * 6e-8`` of relative
      precision in float32: at ``x = 1e4 + randn`` its variance is off by tens of
      times. The field is accepted, so models and configs load unchanged, and
      ignored; results match Flax's ``use_fast_variance=False``.
    - ``force_float32_reductions`` is accepted and ignored for the arithmetic:
      statistics are always computed in at least float32. With False the stored
      ``batch_stats`` keep Flax's dtype (``param_dtype``), so trees still match.
    - ``init`` in training normalizes with the statistics of the batch it is
      given and does not update the running ones, as Flax's does; like Flax it
      ignores ``axis_name`` there, and jaxbn's ``virtual_batch_size`` too.
    - The gradient is jaxbn's hand-derived backward.

    The output dtype is Flax's: ``dtype`` if given, else the promoted dtype of
    ``x``, ``scale`` and ``bias``.

    Attributes:
      use_running_average: True normalizes with the stored statistics; give it
        here or at call time, not both.
      axis: the feature axis, or a tuple of feature axes (default -1, NHWC).
      momentum: weight on the old running value, in ``[0, 1]`` (default 0.99).
      epsilon: added to the variance (default 1e-5).
      dtype: dtype of the output (default: promoted from ``x`` and the params).
      param_dtype: dtype of ``scale`` and ``bias`` (default float32).
      use_bias: learn an offset ``bias`` (beta).
      use_scale: learn a scale ``scale`` (gamma).
      bias_init: initializer for ``bias`` (default zeros).
      scale_init: initializer for ``scale`` (default ones).
      axis_name: named axis (``shard_map``, ``pmap``, ``nn.vmap``) whose devices
        hold parts of one batch; not needed under ``jit`` with sharded inputs.
      axis_index_groups: groups of devices along ``axis_name`` that share
        statistics, as for ``lax.psum``.
      use_fast_variance: accepted for compatibility; jaxbn's variance is always
        the stable one (see above).
      force_float32_reductions: accepted for compatibility; reductions are always
        in at least float32 (see above).
      unbiased_running_var: store ``var * n / (n - 1)`` in the running variance,
        as PyTorch does.
      renorm: None or ``(rmax, dmax)``: batch renormalization in training.
      virtual_batch_size: ghost batch norm in training: groups of this size
        along axis 0, each with its own statistics.
      frozen: a fixed affine map (:func:`jaxbn.frozen_batch_norm`): the stored
        statistics in training and evaluation alike, never updated, and no
        gradient for ``scale`` and ``bias`` (for trainable ones with fixed
        statistics, use ``use_running_average=True``).
      custom_vjp: differentiate training with jaxbn's hand-derived backward
        (default); False uses JAX's autodiff of the same computation, which
        forward mode (``jax.jvp``, ``jax.jacfwd``) needs.
      activation: None (default: batch norm alone), or ``"relu"``, ``"leaky_relu"`` or
        ``"identity"``: the module returns ``activation(y + residual)`` computed by
        :func:`jaxbn.batch_norm_act`, whose backward does not write ``dL/dy`` (but on
        CPU, keeping ``x``). The variables are the same, so a checkpoint of
        ``BatchNorm`` followed by ``nn.relu`` loads into
        ``BatchNorm(activation="relu")`` (same auto-name too).
      negative_slope: leaky_relu's slope for negative inputs (> 0; default 0.01,
        ``nn.leaky_relu``'s).
      inplace: with ``activation="leaky_relu"`` or ``"identity"``, keep only the
        output (and the residual, if given) for the backward (InPlace-ABN; see
        :func:`jaxbn.batch_norm_act` for what it costs at ``scale`` near 0).

    The last eight are jaxbn's options (see :func:`jaxbn.batch_norm`), with
    defaults that keep the module a drop-in for Flax's. ``momentum=None`` keeps a cumulative average, as PyTorch's ``momentum=None``;
    then ``batch_stats`` also holds ``count``, the number of updates.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbn.linen import BatchNorm
      >>> bn = BatchNorm(use_running_average=False)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> variables = bn.init(jax.random.key(0), x)
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> y.round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> updates["batch_stats"]["mean"].round(3)
      Array([0.02, 0.2 ], dtype=float32)
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1  # type: ignore[assignment]  # wider than nn.BatchNorm's annotation
    momentum: float | None = 0.99  # type: ignore[assignment]  # wider than nn.BatchNorm's annotation
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    renorm: tuple[float, float] | None = None
    virtual_batch_size: int | None = None
    frozen: bool = False
    custom_vjp: bool = True
    activation: str | None = None
    negative_slope: float = 0.01
    inplace: bool = False

    @nn.compact
    def __call__(
        self,
        x,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
        residual: jax.Array | None = None,
    ):
        """Normalizes ``x`` and, in training, updates ``batch_stats``.

        Args:
          x: array with features along ``axis``, e.g. NHWC ``(N, H, W, C)`` or
            ``(N, C)``.
          use_running_average: True for evaluation; given here or to the
            constructor, not both.
          mask: broadcastable to ``x``: the values that count toward the
            statistics (read as booleans, as Flax's module does).
          residual: None, or an array of ``x``'s shape added to the normalized
            ``x`` before the activation (``"identity"`` if there is none); its
            gradient flows back.

        Returns:
          The normalized ``x`` (with the residual and activation, if any), same
          shape, in the dtype described above.

        Raises:
          ValueError: if ``use_running_average`` is given twice or never.
          flax.errors.ModifyScopeVariableError: in training when
            ``batch_stats`` is not mutable, as Flax's module raises (its message
            also says to pass ``mutable=["batch_stats"]``).
        """
        use_running_average = _merge_use_running_average(
            self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        axes = _checks.normalize_axes(self.axis, x.ndim)
        shape = tuple(x.shape[a] for a in axes)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, stats_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, shape, stats_dtype)
        count = None
        if self.momentum is None:
            count = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
        scale, bias = _scale_bias(self, shape)
        out_dtype = canonicalize_dtype(x, scale, bias, residual, dtype=self.dtype)
        # The core returns x's dtype and computes in >= float32 inside; widening x
        # first keeps a float32 output from a bfloat16 x as precise as Flax's.
        x = x.astype(jnp.promote_types(x.dtype, out_dtype))
        if residual is not None:
            residual = jnp.asarray(residual).astype(x.dtype)
        if mask is not None:  # Flax's module takes any mask dtype as booleans
            mask = jnp.asarray(mask, bool)
        state = _core_state(ra_mean.value, ra_var.value, None if count is None else count.value)
        training, initializing = not use_running_average, self.is_initializing()
        y, new = call_core(self, x, scale, bias, state, training, mask, residual, initializing)
        if new is not None and training and not initializing:
            if not self.is_mutable_collection("batch_stats"):
                raise _immutable_batch_stats(self)
            ra_mean.value = new.mean.astype(_stored_dtype(stats_dtype, new.mean))
            ra_var.value = new.var.astype(stats_dtype)
            if count is not None:
                count.value = new.count
        return y.astype(out_dtype)


class BatchRenorm(nn.Module):
    """Batch renormalization with a warm-up: a drop-in for sbx's ``BatchRenorm``.

    Change one import (``from sbx.common.jax_layers import BatchRenorm``, or CrossQ's
    copy of it) and a model keeps its fields, call and variables:
    ``params/{scale,bias}`` and ``batch_stats/{mean,var,r_max,d_max,steps}``, so a
    checkpoint written with sbx's class loads into this one and back. The first
    ``warmup_steps`` training calls are plain batch norm, the later ones batch
    renormalization with the stored ``r_max`` and ``d_max`` (3 and 5); ``steps``
    counts training calls; the running statistics move in training, not at ``init``
    (where the output is normalized with the batch's own statistics, as sbx's).

    The function is sbx's, ``epsilon`` included: after the warm-up
    ``y = scale * (x - m) / sqrt(v + epsilon) + bias`` with ``m = mean - d * std / r``
    and ``v = var / r**2``, which is not the paper's ``r * xhat + d`` (see
    :func:`jaxbn.batch_renorm`). Where it differs from sbx's: the variance is jaxbn's
    stable one (sbx's is Flax's fast ``E[x^2] - E[x]^2``), and a constant feature's
    gradients are finite (sbx's are NaN). ``use_fast_variance`` (older copies) is
    accepted and ignored; ``warm_up_steps`` (older copies' spelling), if given, is used
    for ``warmup_steps``.

    Attributes:
      use_running_average: True normalizes with the stored statistics.
      axis: the feature axis (or axes).
      momentum: weight on the old running value (0.99).
      epsilon: added to the variance (0.001).
      warmup_steps: training calls of plain batch norm (100_000).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name,
        axis_index_groups: as for :class:`BatchNorm` and sbx's class.
      warm_up_steps: older copies' name for ``warmup_steps``.
      use_fast_variance: accepted, ignored.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 0.001
    warmup_steps: int = 100_000
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    warm_up_steps: int | None = None
    use_fast_variance: bool = True

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        """Normalizes ``x``; in training (not at ``init``) updates ``batch_stats``.

        Args:
          x: the input, features along ``axis``.
          use_running_average: overrides the field if given (one of the two must be).

        Returns:
          The normalized ``x``, its dtype promoted with the parameters' (or ``dtype``).
        """
        use_running_average = _checks.check_use_running_average(
            nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        )
        x = jnp.asarray(x)
        axes = _checks.normalize_axes(self.axis, x.ndim)
        shape = tuple(x.shape[a] for a in axes)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        r_max = self.variable("batch_stats", "r_max", lambda s: s, 3)
        d_max = self.variable("batch_stats", "d_max", lambda s: s, 5)
        steps = self.variable("batch_stats", "steps", lambda s: s, 0)
        scale, bias = _scale_bias(self, shape)
        out_dtype = canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        x = x.astype(jnp.promote_types(x.dtype, out_dtype))
        state = BatchNormState(ra_mean.value, ra_var.value, jnp.asarray(steps.value, jnp.int32))
        training = not use_running_average
        if training and self.is_initializing():  # sbx: the batch's own statistics, no update
            # (sbx's models are initialized with one example: one value per feature)
            y, _ = normalize(
                x, scale, bias, state, training=True, one_value=True, axis=axes, eps=self.epsilon
            )
            return y.astype(out_dtype)
        if training and not self.is_mutable_collection("batch_stats"):
            raise _immutable_batch_stats(self)
        warmup = self.warmup_steps if self.warm_up_steps is None else self.warm_up_steps
        y, new = call_renorm(
            self, x, scale, bias, state, training, r_max.value, d_max.value, warmup
        )
        if training:
            ra_mean.value, ra_var.value = new.mean, new.var
            steps.value = new.count
        return y.astype(out_dtype)
