"""PyTorch interop: BatchNorm state dicts to jaxbn/Flax variables and back, no torch import.

PyTorch's ``momentum`` weighs the new batch, jaxbn's (and Flax's, Keras') the old
value: ``jaxbn = 1 - torch``, and ``None`` (cumulative average) means the same in
both. PyTorch stores the unbiased batch variance in ``running_var``: train with
``unbiased_running_var=True`` for parity. ``num_batches_tracked`` maps to
``BatchNormState.count``.

Arrays cross as NumPy, so that ``import jaxbn`` needs no torch: ``to_torch`` returns
NumPy arrays, and PyTorch's ``load_state_dict`` takes only tensors, hence one line
``bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._state import BatchNormState, check_state

_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def momentum_from_torch(momentum):
    """PyTorch's momentum (weight on the batch, e.g. 0.1) to jaxbn's (0.9); None stays None."""
    return None if momentum is None else 1.0 - _checks.check_momentum(momentum, allow_none=False)


def momentum_to_torch(momentum):
    """jaxbn's momentum (weight on the old value, e.g. 0.9) to PyTorch's (0.1); None stays None."""
    return None if momentum is None else 1.0 - _checks.check_momentum(momentum, allow_none=False)


def from_torch(state_dict: Mapping, prefix: str = ""):
    """Converts a PyTorch BatchNorm state dict (NumPy arrays) to ``(gamma, beta, state)``.

    Args:
      state_dict: ``weight``, ``bias`` (absent when ``affine=False``),
        ``running_mean``, ``running_var`` and optionally ``num_batches_tracked``,
        as NumPy arrays (``{k: v.numpy() for k, v in module.state_dict().items()}``).
      prefix: prepended to each key, e.g. ``"layer1.bn1."``.

    Returns:
      ``(gamma, beta, state)`` for :func:`jaxbn.batch_norm`: gamma and beta are None
      when absent; the state is float32 with ``count = num_batches_tracked``.
    """
    get = lambda k: state_dict.get(prefix + k)  # noqa: E731
    for k in ("running_mean", "running_var"):
        if get(k) is None:
            raise ValueError(
                f"state_dict has no {prefix + k!r}; expected a BatchNorm state dict with "
                f"track_running_stats=True (keys {', '.join(prefix + k for k in _KEYS)})."
            )
    # jnp.array copies: jnp.asarray adopts an aligned host buffer on CPU (torch's
    # .numpy() always is one), which the caller's module goes on writing.
    f32 = lambda k: None if get(k) is None else jnp.array(np.asarray(get(k)), jnp.float32)  # noqa: E731
    count = get("num_batches_tracked")
    count = jnp.asarray(0 if count is None else int(np.asarray(count)), jnp.int32)
    mean, var = (
        jnp.array(np.asarray(get(k)), jnp.float32) for k in ("running_mean", "running_var")
    )
    state = BatchNormState(mean, var, count)
    check_state(state, state.mean.shape)
    return f32("weight"), f32("bias"), state


def to_torch(gamma, beta, state: BatchNormState, prefix: str = "") -> dict:
    """The inverse of :func:`from_torch`: a PyTorch BatchNorm state dict of NumPy arrays.

    PyTorch's ``load_state_dict`` takes tensors, not NumPy arrays; convert with
    ``torch.from_numpy``, which shares the memory of these writable copies::

        bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

    (for one layer of a larger model, give its ``prefix`` and pass ``strict=False``).

    Args:
      gamma, beta: ``(C,)`` or None (PyTorch's ``affine=False``: no weight or bias).
      state: the running statistics, feature shape ``(C,)``.
      prefix: prepended to each key, e.g. ``"layer1.bn1."``.

    Returns:
      ``{prefix + k: array}`` with PyTorch's keys and dtypes: float32 ``weight``,
      ``bias``, ``running_mean``, ``running_var`` and an int64 scalar
      ``num_batches_tracked``, each a new writable array independent of ``state``.

    Example:
      >>> import jaxbn
      >>> sd = jaxbn.to_torch(None, None, jaxbn.init_state(2))
      >>> sorted(sd), sd["running_var"]
      (['num_batches_tracked', 'running_mean', 'running_var'], array([1., 1.], dtype=float32))
    """
    check_state(state, state.mean.shape)
    # np.array copies: np.asarray of a jax array is a read-only view, on which
    # torch.from_numpy warns (and a write through the tensor would be undefined).
    out = {
        "running_mean": np.array(state.mean, np.float32),
        "running_var": np.array(state.var, np.float32),
        "num_batches_tracked": np.array(state.count, np.int64),
    }
    if gamma is not None:
        out["weight"] = np.array(gamma, np.float32)
    if beta is not None:
        out["bias"] = np.array(beta, np.float32)
    return {prefix + k: v for k, v in out.items()}


def flax_variables_from_torch(state_dict: Mapping, prefix: str = "") -> dict:
    """A PyTorch BatchNorm state dict as one Flax BatchNorm's variables.

    Returns:
      ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` (params
      present only when the state dict has them), Flax's names and float32.
    """
    gamma, beta, state = from_torch(state_dict, prefix)
    params = {k: v for k, v in (("scale", gamma), ("bias", beta)) if v is not None}
    return {"params": params, "batch_stats": {"mean": state.mean, "var": state.var}}


def flax_variables_to_torch(variables: Mapping, num_batches_tracked: int = 0, prefix: str = ""):
    """The inverse of :func:`flax_variables_from_torch`; Flax keeps no batch count."""
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    count = jnp.asarray(num_batches_tracked, jnp.int32)
    state = BatchNormState(jnp.asarray(stats["mean"]), jnp.asarray(stats["var"]), count)
    return to_torch(params.get("scale"), params.get("bias"), state, prefix)
