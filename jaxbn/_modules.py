"""How ``jaxbn.linen``'s and ``jaxbn.nnx``'s modules call the core with their fields.

These modules, and ``jaxbn.equinox``'s (which calls the same ``normalize``), accept a
batch with one value per feature (``x`` of shape ``(1, C)``, or one unbatched example,
as ``nnx.tabulate``, per-example ``vmap`` and ``bind`` give them), as Flax's and
Equinox's do: the batch's variance is 0, so the output is ``bias`` and the running
statistics move toward ``x`` and 0 (the core's ``one_value=True``). Nothing here imports
flax.
"""

from __future__ import annotations

from jaxbn._batch_norm import frozen_batch_norm, normalize
from jaxbn._checks import check_activation
from jaxbn._core import activate
from jaxbn._warmup_renorm import batch_renorm


def call_core(module, x, scale, bias, state, training, mask, residual, initializing=False):
    """``(y, new_state)`` from the module's fields; ``new_state`` is None for a frozen module.

    A frozen module is :func:`jaxbn.frozen_batch_norm`, then the residual and the
    activation, if any; any other is :func:`jaxbn.batch_norm_act` (the identity
    without an activation). Evaluation takes no ghost batches (it uses the running
    statistics, so any batch size works). linen's ``init`` normalizes with the
    statistics of the whole batch it is given, as Flax's does: no named axis (it need
    not exist yet) and no ghost batches (``init`` is often given one example).
    """
    activation = "identity" if module.activation is None else module.activation
    if module.frozen:
        y = frozen_batch_norm(x, scale, bias, state, axis=module.axis, eps=module.epsilon)
        y = y if residual is None else y + residual
        act = check_activation(activation, module.negative_slope, False)
        return activate(act["activation"], act["slope"], y), None
    axis_name = None if initializing else module.axis_name
    return normalize(
        x, scale, bias, state, training=training, mask=mask, residual=residual, one_value=True,
        axis=module.axis, momentum=module.momentum, eps=module.epsilon, axis_name=axis_name,
        # as in Flax, groups without a named axis have nothing to group
        axis_index_groups=None if axis_name is None else module.axis_index_groups,
        unbiased_running_var=module.unbiased_running_var, renorm=module.renorm,
        virtual_batch_size=module.virtual_batch_size if training and not initializing else None,
        custom_vjp=module.custom_vjp, activation=activation, negative_slope=module.negative_slope,
        inplace=module.inplace and module.activation is not None,  # no activation: nothing in place
    )  # fmt: skip


def call_renorm(module, x, scale, bias, state, training, r_max, d_max, warmup_steps):
    """``(y, new_state)`` of :func:`jaxbn.batch_renorm` with a BatchRenorm module's fields."""
    return batch_renorm(
        x, scale, bias, state, training=training, r_max=r_max, d_max=d_max,
        warmup_steps=warmup_steps, axis=module.axis, momentum=module.momentum,
        eps=module.epsilon, axis_name=module.axis_name, axis_index_groups=module.axis_index_groups,
    )  # fmt: skip
