"""What ``jaxbn.linen``, ``jaxbn.nnx`` and ``jaxbn.equinox`` share: how a module calls the core.

The modules accept a batch with one value per feature (``x`` of shape ``(1, C)``, or
one unbatched example, as ``nnx.tabulate``, per-example ``vmap`` and ``bind`` give
them), as Flax's and Equinox's do: the batch's variance is 0, so the output is
``bias`` and the running statistics move toward ``x`` and 0 (the core's
``one_value=True``). Nothing here imports flax.
"""

from __future__ import annotations

from jaxbn._batch_norm import frozen_batch_norm, normalize
from jaxbn._checks import check_activation
from jaxbn._core import activate


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


def module_batch_norm(
    x, scale, bias, state, *, training: bool, mask, options: dict, act=None, residual=None
):
    """:func:`jaxbn.batch_norm_act` (the identity without ``act``), one value per feature
    allowed."""
    act = act or dict(activation="identity")
    return normalize(
        x, scale, bias, state, training=training, mask=mask, residual=residual, one_value=True,
        **act, **options,
    )  # fmt: skip


def module_frozen(x, scale, bias, state, *, options: dict, act=None, residual=None):
    """:func:`jaxbn.frozen_batch_norm`, then the activation if the module has one."""
    y = frozen_batch_norm(x, scale, bias, state, axis=options["axis"], eps=options["eps"])
    if act is None and residual is None:
        return y
    act = act or dict(activation="identity", negative_slope=0.01)
    spec = check_activation(act["activation"], act["negative_slope"], False)
    return activate(spec["activation"], spec["slope"], y if residual is None else y + residual)
