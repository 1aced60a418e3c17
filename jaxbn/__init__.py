"""jaxbn: batch normalization for JAX as pure functions with a hand-derived backward."""

from jaxbn._batch_norm import batch_norm, batch_norm_bwd, batch_norm_fwd, frozen_batch_norm
from jaxbn._core import BatchNormResiduals
from jaxbn._fold import fold_batch_norm, fold_linen, fold_nnx
from jaxbn._population import population_stats
from jaxbn._state import BatchNormState, init_state
from jaxbn._torch import (
    flax_variables_from_torch,
    flax_variables_to_torch,
    from_torch,
    momentum_from_torch,
    momentum_to_torch,
    to_torch,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNormResiduals",
    "BatchNormState",
    "batch_norm",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "flax_variables_from_torch",
    "flax_variables_to_torch",
    "fold_batch_norm",
    "fold_linen",
    "fold_nnx",
    "from_torch",
    "frozen_batch_norm",
    "init_state",
    "momentum_from_torch",
    "momentum_to_torch",
    "population_stats",
    "to_torch",
]
