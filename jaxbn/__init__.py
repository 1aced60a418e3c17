"""jaxbn: batch normalization for JAX as pure functions with a hand-derived backward."""

from jaxbn._batch_norm import batch_norm, batch_norm_bwd, batch_norm_fwd, frozen_batch_norm
from jaxbn._core import BatchNormResiduals
from jaxbn._state import BatchNormState, init_state

__version__ = "0.1.0"

__all__ = [
    "BatchNormResiduals",
    "BatchNormState",
    "batch_norm",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "frozen_batch_norm",
    "init_state",
]
