r"""Batch renormalization with a warm-up, as off-policy RL (CrossQ, stable-baselines-jax) runs it.

This is the function of sbx-rl 0.28.0's ``BatchRenorm`` (``sbx/common/jax_layers.py``),
the layer CrossQ (Bhatt et al., ICLR 2024) made batch norm work with, computed with
jaxbn's statistics. Per feature, with the batch's ``mean_b``, biased ``var_b`` and the
running ``mean_r``, ``var_r`` (before this step's update)::

    r = clip(sqrt(var_b + eps) / sqrt(var_r + eps), 1 / r_max, r_max)     # constants:
    d = clip((mean_b - mean_r) / sqrt(var_r + eps), -d_max, d_max)         # stop_gradient
    m = mean_b - d * sqrt(var_b) / r,   v = var_b / r**2      after the warm-up;
    m = mean_b,                         v = var_b             during it (steps < warmup_steps)
    y = gamma * (x - m) / sqrt(v + eps) + beta

differentiated through ``mean_b`` and ``var_b`` by JAX's autodiff (jaxbn's statistics
carry an exact tangent). After the warm-up this is ``(r (x - mean_b) + d sqrt(var_b)) /
sqrt(var_b + r**2 eps)``: the paper's ``r (x - mean_b) / sqrt(var_b + eps) + d`` (Ioffe,
2017, and ``batch_norm(..., renorm=...)``) but for where ``eps`` enters, which is why a
critic trained with sbx's layer needs this form to give the same values. The running
statistics move by ``momentum`` toward the batch's in every training call, and
``state.count`` counts those calls (sbx's ``steps``).

Where it differs from sbx's layer: the variance is jaxbn's stable one (sbx takes
Flax's ``E[x^2] - E[x]^2``, wrong when ``|mean| >> std``), and ``sqrt(var_b)`` has a
finite derivative at ``var_b = 0`` (a constant feature makes sbx's gradients NaN, also
during the warm-up, where its ``0 * inf`` is NaN). ``x - m`` uses the rounded mean, as
sbx's does, not ``batch_norm``'s exact split.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks
from jaxbn._batch_norm import batch_norm
from jaxbn._compat import standard_promotion
from jaxbn._core import moments
from jaxbn._state import BatchNormState, check_state, update


@standard_promotion
def batch_renorm(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    state: BatchNormState,
    *,
    training: bool,
    r_max: ArrayLike = 3.0,
    d_max: ArrayLike = 5.0,
    warmup_steps: ArrayLike = 100_000,
    axis: int | Sequence[int] = -1,
    momentum: float = 0.99,
    eps: float = 1e-3,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[jax.Array, BatchNormState]:
    """Batch renormalization with a warm-up, sbx's / CrossQ's function (see the module).

    Plain batch norm for the first ``warmup_steps`` training calls (counted by
    ``state.count``), then batch renormalization with limits ``r_max``, ``d_max``;
    evaluation uses the running statistics, as :func:`batch_norm`. ``r_max``,
    ``d_max`` and ``warmup_steps`` may be traced (sbx keeps the limits in its state).

    Args:
      x, gamma, beta, state, axis, eps, axis_name, axis_index_groups: as for
        :func:`batch_norm` (``eps`` defaults to sbx's 1e-3).
      training: batch statistics and an update (True) or the running ones (False).
      r_max: ``r`` is clipped to ``[1 / r_max, r_max]`` (sbx: 3).
      d_max: ``d`` is clipped to ``[-d_max, d_max]`` (sbx: 5).
      warmup_steps: training calls of plain batch norm before renormalizing.
      momentum: weight on the old running value, in ``[0, 1]`` (sbx: 0.99).

    Returns:
      ``(y, new_state)``: ``y`` in ``x``'s dtype; ``new_state`` with the running
      statistics moved toward the batch's and ``count + 1`` (``state`` itself in
      evaluation).

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> y, state = jaxbn.batch_renorm(x, None, None, jaxbn.init_state(2), training=True)
      >>> y.round(3), int(state.count)
      (Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32), 1)
    """
    training = _checks.check_training(training)
    r_max, d_max = _checks.check_limits(r_max, d_max)
    if _checks.check_momentum(momentum) is None:  # refused in evaluation too, as batch_norm's
        raise ValueError(
            "momentum=None (a cumulative average) is not batch_renorm's; pass a number."
        )
    common: dict[str, Any] = dict(axis=axis, eps=eps)
    if not training:
        return batch_norm(x, gamma, beta, state, training=False, **common)
    x = _checks.check_x(x)
    if jnp.iscomplexobj(x):
        raise TypeError(f"batch_renorm needs real x (r and d are clipped), got dtype {x.dtype}.")
    axes = _checks.normalize_axes(axis, x.ndim)
    state = check_state(state, tuple(x.shape[a] for a in axes))
    axis_name = _checks.check_axis_name(axis_name)
    groups = _checks.check_groups(axis_index_groups, axis_name)
    reduced = [a for a in range(x.ndim) if a not in axes]
    _checks.check_batch_size(x.shape, reduced, axis_name, groups)
    mo = moments(x, None, axes, axis_name, groups)  # differentiable (exact tangents)
    mean_b, var_b = mo.mean.astype(state.mean.dtype), mo.var.astype(state.var.dtype)
    dt = var_b.dtype
    mean_r, var_r = state.mean.astype(mean_b.dtype), state.var.astype(dt)
    std_r = jnp.sqrt(var_r + eps)
    r_max, d_max = jnp.asarray(r_max, dt), jnp.asarray(d_max, dt)
    r = lax.stop_gradient(jnp.clip(jnp.sqrt(var_b + eps) / std_r, 1 / r_max, r_max))
    d = lax.stop_gradient(jnp.clip((mean_b - mean_r) / std_r, -d_max, d_max))
    tiny = np.finfo(np.dtype(dt)).tiny  # sqrt's derivative stays finite at var_b = 0
    warm = state.count >= jnp.asarray(warmup_steps, state.count.dtype)
    mean = jnp.where(warm, mean_b - d * jnp.sqrt(jnp.maximum(var_b, tiny)) / r, mean_b)
    var = jnp.where(warm, var_b / (r * r), var_b)
    y, _ = batch_norm(
        x, gamma, beta, BatchNormState(mean, var, state.count), training=False, **common
    )
    return y, update(state, mean_b, var_b, None, momentum)
