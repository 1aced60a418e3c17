"""The running statistics of a batch norm layer, as an explicit pytree value."""

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
    return BatchNormState(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, dtype),
        count=jnp.zeros((), jnp.int32),
    )
