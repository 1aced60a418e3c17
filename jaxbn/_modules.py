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

from jaxbn._act import activate, batch_norm_act
from jaxbn._batch_norm import batch_norm, frozen_batch_norm
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


def act_options(module) -> dict | None:
    """The module's activation fields for :func:`jaxbn.batch_norm_act`, or None without one."""
    if module.activation is None:
        return None
    return dict(
        activation=module.activation,
        negative_slope=module.negative_slope,
        inplace=module.inplace,
    )


_NOT_FUSED = ("renorm", "virtual_batch_size")  # options batch_norm_act does not take


def module_batch_norm(
    x, scale, bias, state, *, training: bool, mask, options: dict, act=None, residual=None
):
    """:func:`jaxbn.batch_norm` as Flax's modules behave: one value per feature is allowed.

    With an activation or a residual, :func:`jaxbn.batch_norm_act` instead (the
    identity activation for a residual alone).
    """
    fused = act is not None or residual is not None
    if fused:
        act = act or dict(activation="identity", negative_slope=0.01, inplace=False)
        for name in _NOT_FUSED:
            if options[name] is not None:
                raise ValueError(
                    f"{name}={options[name]!r} cannot be combined with activation="
                    f"{act['activation']!r} or a residual (jaxbn.batch_norm_act does not "
                    f"take {name}); expected {name}=None, or activation=None with the "
                    f"activation applied after the module."
                )
        options = {k: v for k, v in options.items() if k not in _NOT_FUSED}
    axes = normalize_axes(options["axis"], x.ndim)
    reduced = math.prod(x.shape[i] for i in range(x.ndim) if i not in axes)
    one_value = (
        training
        and options["axis_name"] is None
        and options.get("virtual_batch_size") is None
        and reduced == 1  # False, not an error, for a symbolic dimension
    )
    if one_value:
        y, new_state = one_value_batch_norm(x, scale, bias, state, mask=mask, options=options)
        return (activate(y, **_no_inplace(act), residual=residual) if fused else y), new_state
    if fused:
        return batch_norm_act(
            x, scale, bias, state, training=training, mask=mask, residual=residual, **act, **options
        )
    return batch_norm(x, scale, bias, state, training=training, mask=mask, **options)


def module_frozen(x, scale, bias, state, *, options: dict, act=None, residual=None):
    """:func:`jaxbn.frozen_batch_norm`, then the activation if the module has one."""
    y = frozen_batch_norm(x, scale, bias, state, axis=options["axis"], eps=options["eps"])
    if act is None and residual is None:
        return y
    return activate(y, **_no_inplace(act or dict(activation="identity")), residual=residual)


def _no_inplace(act: dict) -> dict:
    return {k: v for k, v in act.items() if k != "inplace"}


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
    if mask is not None or options.get("renorm") is not None:
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
