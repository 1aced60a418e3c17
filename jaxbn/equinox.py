"""``jaxbn.equinox.BatchNorm``: a replacement for ``equinox.nn.BatchNorm``.

Change one import and the model keeps its constructor, fields, call signature
``(x, state, *, key=None, inference=None) -> (y, state)``, its ``eqx.nn.State`` layout
(``batch_counter``, ``batch_state_index`` in ``mode="batch"``; ``ema_first_time_index``,
``ema_state_index`` in ``"ema"``; leaves serialise both ways), its default mode with its
warning, and ``eqx.nn.inference_mode``; the normalization underneath is
:func:`jaxbn.batch_norm`. This module reads and writes the state, picks training or
inference and calls the core: it holds no arithmetic.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

try:
    import equinox as eqx
except ImportError as err:  # equinox is an optional extra; checked before jax is imported
    raise ImportError(
        "jaxbn.equinox needs equinox, which is not installed; install it with "
        'pip install "jaxbn[equinox]".'
    ) from err

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._batch_norm import batch_norm, normalize
from jaxbn._checks import UnboundAxisNameError
from jaxbn._core import moments
from jaxbn._state import BatchNormState, unbiased, update

__all__ = ["BatchNorm", "UnboundAxisNameError"]


_LEGACY_WARNING = (  # Equinox 0.13.8's, for a mode left unspecified
    "When `eqx.nn.BatchNorm(..., mode=...)` is unspecified it defaults to "
    "'ema', for backward compatibility. This typically has a performance "
    "impact, and for new code the user is encouraged to use 'batch' "
    "instead. See `https://github.com/patrick-kidger/equinox/issues/659`."
)


def _check_axis(axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(
            f"axis must be an int, the channel axis of one example (0: channel-first, "
            f"-1: channel-last), got {axis!r}."
        )
    return int(axis)


class BatchNorm(eqx.nn.BatchNorm):
    """Batch normalization with running statistics, as ``eqx.nn.BatchNorm``.

    ``mode="batch"``: in training each channel is normalized with the statistics of
    the batch (all spatial positions of all examples along ``axis_name``), and the
    running ones are updated::

        y = weight * (x - mean) / sqrt(var + eps) + bias
        running_mean = momentum * running_mean + (1 - momentum) * mean

    (the same for ``var``, the biased batch variance); in inference the running
    statistics are used and the state is returned unchanged. ``mode="ema"``
    (Equinox's default when ``mode`` is not given, with Equinox's warning) normalizes
    a training batch with the running average itself, updated first
    (``momentum * running + (1 - momentum) * batch``; the batch's own on the first
    call), and differentiates through the batch's part, as Equinox does. Write the model for
    one example and ``jax.vmap`` it with ``axis_name``, as in Equinox::

        bn, state = eqx.nn.make_with_state(BatchNorm)(32, "batch", mode="batch")
        y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)

    Where it deliberately differs from Equinox's layer:

    - **Inference uses the running statistics as stored**, as PyTorch and Flax
      do. Equinox's ``mode="batch"`` divides both by ``1 - momentum**count``;
      that debiases the mean, which starts at 0, but not the variance, which
      starts at 1: with ``momentum=0.99`` and a true variance of 4 its inference
      variance is ``(0.99 + 0.01 * 4) / 0.01 = 103`` after one step. Here it is
      ``0.99 + 0.01 * 4``, the running average. The stored values themselves are
      the same as Equinox's (same update from the same start), so states load
      both ways; only their reading in inference differs.
    - **``mode="ema"`` is computed with jaxbn's statistics** (the stable variance)
      and JAX's autodiff (``custom_vjp`` applies to ``"batch"`` only); it takes a
      ``momentum`` (not None). Prefer ``mode="batch"``, which is batch
      normalization and what Equinox recommends for new code.
    - **``axis_name`` is optional.** ``None`` takes the whole batch without a
      ``vmap``: ``x`` of shape ``(N, input_size, *spatial)`` (``axis=0``) or
      ``(N, *spatial, input_size)`` (``axis=-1``), batch axis first, statistics
      over all axes but the channel's (also right under ``jit`` with a sharded
      batch). Equinox requires a name.
    - **``axis``**: the channel axis of one example, 0 (channel-first, Equinox's
      only layout) or -1 for channel-last (any int).
    - **Running statistics are kept in at least float32**: a ``dtype`` below
      float32 applies to ``weight`` and ``bias`` only.
    - **Arguments are checked before tracing**: ``x`` must have ``input_size`` channels
      along ``axis`` and be real and floating, and training needs a value per channel
      (exactly one, a batch of one example without spatial positions, gives ``y = bias``
      as in Equinox, where :func:`jaxbn.batch_norm` itself raises); ``eps`` must be
      finite and > 0, ``momentum`` in ``[0, 1]`` or None. An unbound ``axis_name`` in
      training raises :class:`UnboundAxisNameError`, a ``NameError`` as in Equinox and a
      ``ValueError``.
    - **More fields**, keyword-only with defaults that keep Equinox's behaviour:
      ``axis``, ``unbiased_running_var`` and ``custom_vjp``; ``momentum=None``
      (a cumulative average) is jaxbn's too.
    - The gradient is jaxbn's hand-derived backward (``custom_vjp=False`` for
      JAX's autodiff, which forward mode needs).

    The output dtype is that of ``x`` promoted with ``weight`` and ``bias``.

    Args:
      input_size: the number of channels, ``x.shape[axis]``.
      axis_name: the named axis (or a tuple of them) of ``jax.vmap``,
        ``jax.pmap`` or ``jax.shard_map`` that holds the batch; None: ``x`` is
        the whole batch (see above).
      eps: added to the variance (default 1e-5).
      channelwise_affine: learn ``weight`` (ones) and ``bias`` (zeros).
      momentum: weight on the old running value, in ``[0, 1]`` (default 0.99);
        None keeps a cumulative average over steps (PyTorch's ``momentum=None``).
      inference: True normalizes with the running statistics; toggled by
        ``eqx.nn.inference_mode`` and overridden by the call's ``inference``.
      dtype: of ``weight``, ``bias`` and (at least float32) the running
        statistics; default float32, float64 with ``jax_enable_x64``.
      mode: ``"batch"`` or ``"ema"`` (see above); not given: ``"ema"`` with
        Equinox's warning, as Equinox's layer.
      axis: channel axis of one example (default 0).
      unbiased_running_var: store the unbiased batch variance ``var * n / (n - 1)``
        in the running variance, as PyTorch does (Equinox's docs say unbiased;
        its code, and the default here, store the biased one).
      custom_vjp: differentiate training with jaxbn's hand-derived backward.

    Raises:
      TypeError, ValueError: for arguments that do not fit.

    Example:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> from jaxbn.equinox import BatchNorm
      >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, "batch", mode="batch")
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> y.round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> state.get(bn.batch_state_index)[0].round(3)
      Array([0.02, 0.2 ], dtype=float32)
    """

    weight: jax.Array | None
    bias: jax.Array | None
    ema_first_time_index: eqx.nn.StateIndex | None
    ema_state_index: eqx.nn.StateIndex | None
    batch_counter: eqx.nn.StateIndex | None
    batch_state_index: eqx.nn.StateIndex | None
    axis_name: Hashable | Sequence[Hashable] | None
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)  # type: ignore[assignment]  # wider than Equinox's
    mode: str = eqx.field(static=True)  # type: ignore[assignment]  # wider than Equinox's
    axis: int = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    custom_vjp: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "legacy",
        *,
        axis: int = 0,
        unbiased_running_var: bool = False,
        custom_vjp: bool = True,
    ):
        if mode == "legacy":  # Equinox's default and its warning, word for word
            mode = "ema"
            warnings.warn(_LEGACY_WARNING, stacklevel=2)
        if mode not in ("ema", "batch"):
            raise ValueError(f"mode must be 'ema' or 'batch' (as Equinox's), got {mode!r}.")
        if mode == "ema" and momentum is None:
            raise ValueError(
                "momentum=None (a cumulative average) needs mode='batch'; mode='ema' "
                "normalizes with the running average itself, which needs a momentum."
            )
        input_size = _checks.feature_shape_of(input_size, "input_size", tuples=False)[0]
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a real floating dtype, got {dtype}.")
        # the running statistics: at least float32 (no promotion, which strict mode refuses)
        stats_dtype = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
        shape = (input_size,)
        self.weight = jnp.ones(shape, dtype) if channelwise_affine else None
        self.bias = jnp.zeros(shape, dtype) if channelwise_affine else None
        self.ema_first_time_index = self.ema_state_index = None
        self.batch_counter = self.batch_state_index = None
        if mode == "ema":  # Equinox's "ema" layout: a first-call flag and (mean, var)
            self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True))
            stats = (jnp.zeros(shape, stats_dtype), jnp.ones(shape, stats_dtype))
            self.ema_state_index = eqx.nn.StateIndex(stats)
        else:  # Equinox's "batch" layout: a counter (int32, not weakly typed, as the
            # core's count), and (mean, var) from zeros and ones
            self.batch_counter = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))
            stats = (jnp.zeros(shape, stats_dtype), jnp.ones(shape, stats_dtype))
            self.batch_state_index = eqx.nn.StateIndex(stats)
        # a sequence of names, as Equinox takes; JAX's is a tuple
        self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = _checks.check_eps(eps)
        self.channelwise_affine = bool(channelwise_affine)
        self.momentum = _checks.check_momentum(momentum)
        self.mode = mode
        self.axis = _check_axis(axis)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.custom_vjp = bool(custom_vjp)

    def running_state(self, state: eqx.nn.State) -> BatchNormState:
        """This layer's running statistics in ``state``, as a :class:`jaxbn.BatchNormState`.

        For jaxbn's functions that take one, e.g. :func:`jaxbn.fold_batch_norm`. In
        ``"ema"`` mode the count is 0 (that layout keeps none).
        """
        if self.mode == "ema":
            assert self.ema_state_index is not None
            mean, var = state.get(self.ema_state_index)
            return BatchNormState(mean, var, jnp.zeros((), jnp.int32))
        assert self.batch_state_index is not None and self.batch_counter is not None
        mean, var = state.get(self.batch_state_index)
        return BatchNormState(mean, var, state.get(self.batch_counter))

    def _feature_axis(self, x: jax.Array) -> int:
        """The channel axis of ``x``: one example's under a named axis, else a batch's."""
        batched = self.axis_name is None
        example_ndim = x.ndim - 1 if batched else x.ndim
        layout = (
            f"a batch (N, {self.input_size}, ...) or (N, ..., {self.input_size}), batch axis "
            f"first (axis_name=None; for one example per call, vmap the layer over a named "
            f"axis and pass it as axis_name)"
            if batched
            else f"one example of the batch along axis_name {self.axis_name!r}"
        )
        if example_ndim < 1 or not -example_ndim <= self.axis < example_ndim:
            raise ValueError(
                f"x of shape {x.shape} has no channel axis {self.axis}; expected {layout}."
            )
        a = self.axis % example_ndim + (1 if batched else 0)
        if x.shape[a] != self.input_size:
            raise ValueError(
                f"x of shape {x.shape} has {x.shape[a]} channels along axis {a}, but "
                f"BatchNorm was built with input_size={self.input_size}; expected {layout}."
            )
        return a

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes ``x`` and, in training, updates the running statistics in ``state``.

        Args:
          x: one example, ``(input_size, *spatial)`` with ``axis=0`` (channel-last
            ``(*spatial, input_size)`` with ``axis=-1``), under a ``vmap`` of
            ``axis_name``; the whole batch, batch axis first, with ``axis_name=None``.
          state: an ``eqx.nn.State`` holding this layer's running statistics.
          key: ignored, as in Equinox.
          inference: overrides the ``inference`` field if given.

        Returns:
          ``(y, state)``: the normalized ``x`` (same shape) and the updated state
          (the same one in inference).

        Raises:
          TypeError, ValueError: for an ``x`` that does not fit (see the class).
          UnboundAxisNameError: in training outside a transform that binds
            ``axis_name``.
        """
        del key
        inference = self.inference if inference is None else inference
        if not isinstance(inference, (bool, np.bool_)):
            raise TypeError(
                f"inference must be a Python bool (static, as for Equinox's layer), got "
                f"{inference!r} of type {type(inference).__name__}."
            )
        x = _checks.check_x(x)
        if jnp.iscomplexobj(x):
            raise TypeError(
                f"x must be real, got dtype {x.dtype}: the running statistics are stored "
                f"as real arrays in the state."
            )
        axis = self._feature_axis(x)
        out_dtype = x.dtype
        for p in (self.weight, self.bias):
            if p is not None and p.dtype != out_dtype:
                out_dtype = jnp.promote_types(out_dtype, p.dtype)
        x = x.astype(out_dtype)
        running = self.running_state(state)
        if inference:
            y, _ = batch_norm(
                x, self.weight, self.bias, running, training=False, axis=axis, eps=self.eps
            )
            return y, state
        train = functools.partial(  # train(weight, bias, running); one value per channel: y = bias
            normalize,
            x,
            training=True,
            one_value=True,
            axis=axis,
            momentum=self.momentum,
            eps=self.eps,
            axis_name=self.axis_name,
            unbiased_running_var=self.unbiased_running_var,
            custom_vjp=self.custom_vjp,
        )
        if self.mode == "ema":
            return self._ema(x, state, running, axis)
        assert self.batch_state_index is not None and self.batch_counter is not None
        y, new = train(self.weight, self.bias, running)
        state = state.set(self.batch_counter, new.count)
        state = state.set(self.batch_state_index, (new.mean, new.var))
        return y, state

    def _ema(self, x, state, running, axis):
        """Equinox's ``"ema"`` training step: normalize with the running average itself.

        The statistics are ``momentum * running + (1 - momentum) * batch`` (the
        batch's alone on the first call), differentiated through the batch's part, as
        Equinox's layer is by autodiff; they are also the new state. The batch's
        statistics come from the core's one statistics function (``jaxbn._core.moments``,
        differentiable), then its running-statistics update, then its evaluation with
        the result: one pass for the statistics and one for ``y``.
        """
        assert self.ema_first_time_index is not None and self.ema_state_index is not None
        first = state.get(self.ema_first_time_index)
        reduced = [a for a in range(x.ndim) if a != axis]
        _checks.check_batch_size(x.shape, reduced, self.axis_name, allow_one=True)
        mo = moments(x, None, (axis,), self.axis_name)
        dt = running.var.dtype
        batch_var = unbiased(mo.var, mo.count) if self.unbiased_running_var else mo.var
        batch = (mo.mean.astype(dt), batch_var.astype(dt))
        blend = update(running, *batch, None, self.momentum)
        mean, var = (jax.lax.select(first, b, e) for b, e in zip(batch, blend[:2]))
        stats = BatchNormState(mean, var, running.count)
        y, _ = batch_norm(x, self.weight, self.bias, stats, training=False, axis=axis, eps=self.eps)
        state = state.set(self.ema_first_time_index, jnp.array(False))
        state = state.set(self.ema_state_index, (stats.mean, stats.var))
        return y, state
