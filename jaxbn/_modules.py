"""What ``jaxbn.linen`` and ``jaxbn.nnx`` share: how a module calls the core.

Flax's modules accept a batch with one value per feature (``x`` of shape ``(1, C)``,
or one unbatched example, as ``nnx.tabulate``, per-example ``vmap`` and ``bind``
give them): the batch's variance is 0, so the output is ``bias`` and the running
statistics move toward ``x`` and 0. :func:`jaxbn.batch_norm` raises there instead
(PyTorch's rule), so the modules route that case through
:func:`one_value_batch_norm`. Nothing here imports flax.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxbn._batch_norm import batch_norm
from jaxbn._checks import normalize_axes
from jaxbn._state import BatchNormState


def core_options(module, *, training: bool, initializing: bool = False) -> dict:
    """The keyword arguments a module's fields give :func:`jaxbn.batch_norm`.

    Evaluation takes no ghost batches (it uses the running statistics, so any
    batch size works). linen's ``init`` normalizes with the statistics of the
    whole batch it is given, as Flax's does: no named axis (it need not exist
    yet) and no ghost batches (``init`` is often given one example).
    """
    axis_name = None if initializing else module.axis_name
    return dict(
        axis=module.axis,
        momentum=module.momentum,
        eps=module.epsilon,
        axis_name=axis_name,
        # as in Flax, groups without a named axis have nothing to group
        axis_index_groups=None if axis_name is None else module.axis_index_groups,
        unbiased_running_var=module.unbiased_running_var,
        renorm=module.renorm,
        virtual_batch_size=module.virtual_batch_size if training and not initializing else None,
        custom_vjp=module.custom_vjp,
    )


def module_batch_norm(x, scale, bias, state, *, training: bool, mask, options: dict):
    """:func:`jaxbn.batch_norm` as Flax's modules behave: one value per feature is allowed."""
    axes = normalize_axes(options["axis"], x.ndim)
    reduced = math.prod(x.shape[i] for i in range(x.ndim) if i not in axes)
    one_value = (
        training
        and options["axis_name"] is None
        and options["virtual_batch_size"] is None
        and reduced == 1  # False, not an error, for a symbolic dimension
    )
    if one_value:
        return one_value_batch_norm(x, scale, bias, state, mask=mask, options=options)
    return batch_norm(x, scale, bias, state, training=training, mask=mask, **options)


def one_value_batch_norm(x, scale, bias, state, *, mask, options: dict):
    """Training on a batch with one value per feature, as Flax computes it.

    The batch mean is ``x`` and its variance 0, so ``y = bias`` (0 without one),
    ``dx = 0`` and ``dscale = 0``, and the running statistics move toward ``x``
    and 0. No arithmetic is done here, and the core keeps its error for one value:

    - the new running statistics are the core's training step on the batch
      written twice along a new leading axis (two equal values have exactly that
      mean and variance);
    - ``y`` is the core's evaluation with the batch's own statistics, ``x`` and
      0, whose gradient for ``x`` is exactly Flax's 0. With a mask (a feature
      whose value is masked out follows the core's rule) or ``renorm`` (whose
      ``d`` shifts the output), ``y`` is the two copies' first.
    """
    axes = normalize_axes(options["axis"], x.ndim)
    fshape = tuple(x.shape[a] for a in axes)
    xf = x.reshape(fshape)  # the other axes all have size 1: this only drops them
    twice = jnp.broadcast_to(xf, (2, *fshape))
    twice_options = dict(options, axis=tuple(range(1, len(fshape) + 1)))
    if mask is not None or options["renorm"] is not None:
        if mask is not None:
            mask = jnp.broadcast_to(jnp.broadcast_to(mask, x.shape).reshape(fshape), twice.shape)
        y2, new_state = batch_norm(
            twice, scale, bias, state, training=True, mask=mask, **twice_options
        )
        return y2[0].reshape(x.shape), new_state
    _, new_state = batch_norm(twice, None, None, state, training=True, **twice_options)
    dt = jnp.promote_types(state.mean.dtype, x.dtype)
    own = BatchNormState(xf.astype(dt), jnp.zeros(fshape, jnp.finfo(dt).dtype), state.count)
    y, _ = batch_norm(x, scale, bias, own, training=False, axis=options["axis"], eps=options["eps"])
    return y, new_state
