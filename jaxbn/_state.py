"""The running statistics of a batch norm layer: an explicit pytree value, its check and update."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbn._checks import check_state_dtype, feature_shape_of


class BatchNormState(NamedTuple):
    """Running statistics, threaded through training as a value and never mutated.

    Attributes:
      mean: running mean, feature shape, float32 or float64.
      var: running biased variance, feature shape, the dtype of ``mean``.
      count: ``()`` int32: the training updates folded in so far (optax's name;
        it shadows ``tuple.count``).
    """

    mean: jax.Array  # feature shape, float32 or float64: running mean.
    var: jax.Array  # feature shape, same dtype as mean: running biased variance.
    # (), int32: training updates folded in so far (optax's name; shadows tuple.count).
    count: jax.Array  # type: ignore[assignment]


# jax.export can serialize a function that takes or returns the state.
jax.export.register_namedtuple_serialization(BatchNormState, serialized_name="jaxbn.BatchNormState")


def init_state(num_features, dtype=jnp.float32) -> BatchNormState:
    """Creates fresh running statistics: mean zeros, variance ones, count zero.

    Args:
      num_features: the feature shape, an int ``C`` or a tuple of ints for
        multi-axis features; equals ``x.shape[axis]`` of the inputs to come.
      dtype: float32 (the default) or float64. Statistics are never kept in
        less than float32.

    Returns:
      A :class:`BatchNormState`.

    Raises:
      TypeError: if ``num_features`` is not an int or tuple of ints, or
        ``dtype`` is not float32 or float64.
      ValueError: if a feature size is not positive.

    Example:
      >>> import jaxbn
      >>> jaxbn.init_state(3)
      BatchNormState(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32), count=Array(0, dtype=int32))
    """
    shape = feature_shape_of(num_features)
    dtype = check_state_dtype("dtype", dtype)
    count = jnp.zeros((), jnp.int32)
    return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), count)


def check_state(state, feature_shape: tuple[int, ...]):
    """Checks ``state`` and returns it with array fields (lists and Python ints converted)."""
    if not isinstance(state, BatchNormState):
        raise TypeError(
            f"state must be a jaxbn.BatchNormState (from jaxbn.init_state), got "
            f"{type(state).__name__}."
        )
    fields = []
    for field, v in zip(state._fields, state):
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError("not a number")
            fields.append(jnp.asarray(v))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"state.{field} must be an array, got {type(v).__name__} ({err})."
            ) from None
    if any(f is not v for f, v in zip(fields, state)):
        state = BatchNormState(*fields)  # else the very same object, as evaluation returns it
    for field, v in (("mean", state.mean), ("var", state.var)):
        if v.shape != feature_shape:
            raise ValueError(
                f"state.{field} has shape {v.shape}, but x has feature shape "
                f"{feature_shape} along axis; create the state with "
                f"jaxbn.init_state({feature_shape if len(feature_shape) != 1 else feature_shape[0]})."
            )
    mean_dt = state.mean.dtype
    if jnp.issubdtype(mean_dt, jnp.complexfloating):  # the running mean of complex input
        mean_dt = jnp.finfo(mean_dt).dtype
    check_state_dtype("state.mean dtype", mean_dt)
    if state.var.dtype != mean_dt:
        raise TypeError(
            f"state.var has dtype {state.var.dtype} but state.mean has dtype "
            f"{state.mean.dtype}; expected one precision for both (var is real)."
        )
    if state.count.shape != () or not jnp.issubdtype(state.count.dtype, jnp.integer):
        raise TypeError(
            f"state.count must be an integer scalar, got shape {state.count.shape} "
            f"and dtype {state.count.dtype}."
        )
    return state


def update(state: BatchNormState, mean, var, seen, momentum) -> BatchNormState:
    """running = momentum * running + (1 - momentum) * batch, in the state's dtype.

    ``seen`` (masked): a feature that saw no value keeps its statistics, and a step
    that saw none is no update. ``momentum=None``: the cumulative average.
    """
    dt = state.var.dtype
    # complex input: the running mean becomes complex, as Flax's does (var stays real)
    mean_dt = jnp.promote_types(
        state.mean.dtype, jnp.result_type(mean.dtype, dt) if jnp.iscomplexobj(mean) else dt
    )
    if momentum is None:  # cumulative average, PyTorch's momentum=None
        w = 1 / (state.count.astype(dt) + 1)
        keep = 1 - w
    else:
        keep, w = jnp.asarray(momentum, dt), jnp.asarray(1 - momentum, dt)
    new_mean = keep * state.mean.astype(mean_dt) + w * mean.astype(mean_dt)
    new_var = keep * state.var + w * var.astype(dt)
    step = jnp.ones((), state.count.dtype)
    if seen is not None:  # the selects' operands typed alike (see jaxbn._core.forward)
        like = jnp.zeros_like(new_var)
        seen = seen | (like != 0)
        new_mean = jnp.where(seen, new_mean, state.mean + like.astype(new_mean.dtype))
        new_var = jnp.where(seen, new_var, state.var + like)
        step = jnp.any(seen).astype(state.count.dtype)
    return BatchNormState(new_mean, new_var, state.count + step)


def unbiased(var, count):
    """``var * n / (n - 1)`` where ``n = count > 1`` (PyTorch's running variance)."""
    return jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), var)
