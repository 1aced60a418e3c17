"""Folding eval-mode batch norm into the Dense or Conv layer before it.

A layer ``z = conv(x, kernel) + bias`` (output features on the kernel's last axis,
Flax's layout, any ``feature_group_count``) followed by eval-mode batch norm is::

    y = (z - mean) * scale + beta,      scale = gamma / sqrt(var + eps)
      = conv(x, kernel * scale) + ((bias - mean) * scale + beta)

since the convolution is linear in each output channel's kernel slice. Both new
arrays come from the core's eval-mode affine map, applied to the kernel (with mean
zero and no offset) and to the bias, so the formula lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from jax import lax

from jaxbn import _checks
from jaxbn._compat import standard_promotion
from jaxbn._core import affine
from jaxbn._state import BatchNormState, check_state, init_state


@standard_promotion
def fold_batch_norm(
    kernel, bias, gamma, beta, state: BatchNormState | Mapping, *, eps: float = 1e-5
):
    """Returns ``(kernel, bias)`` of one layer equal to the layer then eval-mode batch norm.

    Args:
      kernel: ``(..., C)``: a Dense ``(in, C)`` or Conv ``(*window, in // groups, C)``
        kernel, output features last.
      bias: ``(C,)`` or None (a layer without bias).
      gamma, beta: ``(C,)`` or None, as for :func:`jaxbn.batch_norm`.
      state: the running statistics, feature shape ``(C,)``: a
        :class:`jaxbn.BatchNormState`, or a dict with ``"mean"`` and ``"var"``
        such as one Flax BatchNorm's ``batch_stats``.
      eps: the batch norm's epsilon.

    Returns:
      ``(kernel, bias)``: the kernel's shape and dtype, and a ``(C,)`` bias in the
      kernel's dtype (the folded layer always has one).

    Raises:
      TypeError: if ``state`` is neither a ``BatchNormState`` nor a dict with
        ``"mean"`` and ``"var"``.
      ValueError: if the kernel's last axis does not match the statistics.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> state = jaxbn.BatchNormState(jnp.array([1.0, 2.0]), jnp.array([4.0, 1.0]), jnp.array(3))
      >>> k, b = jaxbn.fold_batch_norm(jnp.ones((3, 2)), None, None, None, state, eps=1e-12)
      >>> k[0], b
      (Array([0.5, 1. ], dtype=float32), Array([-0.5, -2. ], dtype=float32))
    """
    state = _as_state(state)
    kernel = _checks.check_x(kernel)
    if kernel.ndim < 1:
        raise ValueError("kernel must have at least one axis, with output features last.")
    c = kernel.shape[-1]
    if state.mean.shape != (c,):
        raise ValueError(
            f"kernel has {c} output features (its last axis, shape {kernel.shape}), but "
            f"the batch norm statistics have shape {state.mean.shape}; expected a "
            f"kernel whose last axis is the normalized feature axis."
        )
    bias = _checks.check_per_feature("bias", bias, (c,))
    gamma = _checks.check_per_feature("gamma", gamma, (c,))
    beta = _checks.check_per_feature("beta", beta, (c,))
    check_state(state, (c,))
    rstd = lax.rsqrt(state.var + _checks.check_eps(eps))
    new_kernel = affine(kernel, jnp.zeros(()), None, rstd, gamma, None, (kernel.ndim - 1,))
    z = jnp.zeros((c,), kernel.dtype) if bias is None else bias.astype(kernel.dtype)
    return new_kernel, affine(z, state.mean, None, rstd, gamma, beta, (0,))


def _as_state(state) -> BatchNormState:
    """A ``BatchNormState`` as is; a ``{"mean", "var"}`` dict (Flax's batch_stats) as one."""
    if isinstance(state, BatchNormState):
        return state
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a jaxbn.BatchNormState or a dict with 'mean' and 'var' "
            f"(one Flax BatchNorm's batch_stats), got {type(state).__name__}."
        )
    if "mean" not in state or "var" not in state:
        raise TypeError(
            f"state is a dict with keys {sorted(state)}; expected 'mean' and 'var', "
            f"as in one Flax BatchNorm's batch_stats."
        )
    # Folding ignores the count; init_state's keeps it the library's count dtype.
    mean = jnp.asarray(state["mean"])
    return BatchNormState(mean, jnp.asarray(state["var"]), init_state(1).count)


def fold_linen(variables, pairs, *, eps: float = 1e-5):
    """Folds Conv/Dense -> BatchNorm pairs in a Flax linen variables tree.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of the model with batch norm,
        and any other collections.
      pairs: ``[(layer_path, bn_path), ...]``: names in the tree, a name or a tuple
        of names for nested modules, e.g. ``("Conv_0", "BatchNorm_0")``.
      eps: the batch norms' epsilon.

    Returns:
      The variables of the same model without the folded batch norms: each layer gets
      the folded kernel and a bias (the folded model must have ``use_bias=True`` on
      those layers), each folded batch norm's entries are dropped, and everything else
      is kept, including the ``batch_stats`` of batch norms not in ``pairs`` (a
      collection left empty is dropped). The input is not modified.

    Raises:
      ValueError: if a path in ``pairs`` is not in the tree.
    """
    params = _to_dict(variables["params"])
    stats = _to_dict(variables.get("batch_stats", {}))
    for layer_path, bn_path in pairs:
        layer = _get(params, layer_path, "params", "a Dense or Conv layer")
        bn_s = _get(stats, bn_path, "batch_stats", "a BatchNorm with running statistics")
        # A BatchNorm with use_scale=False and use_bias=False has no params entry.
        bn_p = _get(params, bn_path, "params", "a BatchNorm", required=False)
        layer["kernel"], layer["bias"] = fold_batch_norm(
            layer["kernel"], layer.get("bias"), bn_p.get("scale"), bn_p.get("bias"), bn_s, eps=eps
        )
        _pop(params, bn_path)
        _pop(stats, bn_path)
    out = dict(variables, params=params, batch_stats=stats)
    if not stats:
        del out["batch_stats"]
    return out


def _to_dict(tree):
    return {k: _to_dict(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _path(p):
    return (p,) if isinstance(p, str) else tuple(p)


def _get(tree, path, collection, what, required=True):
    node = tree
    for k in _path(path):
        if not hasattr(node, "items") or k not in node:
            if not required:
                return {}
            raise ValueError(
                f"pairs names {'/'.join(_path(path))} as {what}, but it is not in the "
                f"variables' {collection!r} collection; expected a path in that collection."
            )
        node = node[k]
    return node


def _pop(tree, path):
    """Removes the entry at ``path`` and any parent it leaves empty."""
    first, *rest = _path(path)
    if not rest:
        tree.pop(first, None)
    elif hasattr(tree.get(first), "items"):
        _pop(tree[first], rest)
        if not tree[first]:
            tree.pop(first)


def fold_nnx(layer, bn):
    """The NNX equivalent: a copy of ``layer`` (``nnx.Linear``/``nnx.Conv``) with ``bn`` folded in.

    Args:
      layer: an ``nnx.Linear`` or ``nnx.Conv`` (``kernel``, optional ``bias``).
      bn: the ``nnx.BatchNorm`` (Flax's or jaxbn's) that follows it.

    Returns:
      A new layer of the same type with the folded kernel and a bias; ``layer``
      and ``bn`` are unchanged. Use it in place of both in evaluation.
    """
    from flax import nnx

    scale = None if bn.scale is None else bn.scale[...]
    offset = None if bn.bias is None else bn.bias[...]
    state = BatchNormState(bn.mean[...], bn.var[...], jnp.zeros((), jnp.int32))
    bias = None if layer.bias is None else layer.bias[...]
    kernel, bias = fold_batch_norm(layer.kernel[...], bias, scale, offset, state, eps=bn.epsilon)
    folded = nnx.clone(layer)
    folded.kernel, folded.bias, folded.use_bias = nnx.Param(kernel), nnx.Param(bias), True
    return folded
