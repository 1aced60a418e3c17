"""jaxbn: batch normalization for JAX as pure functions with a hand-derived backward.

The public names load on first use (PEP 562), so that ``jaxbn --help`` and
``jaxbn --version`` answer without importing jax; type checkers see the imports below.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the private module that defines it
    "BatchNormResiduals": "jaxbn._core",
    "BatchNormState": "jaxbn._state",
    "batch_norm": "jaxbn._batch_norm",
    "batch_norm_act": "jaxbn._batch_norm",
    "batch_norm_bwd": "jaxbn._batch_norm",
    "batch_norm_fwd": "jaxbn._batch_norm",
    "batch_renorm": "jaxbn._warmup_renorm",
    "flax_variables_from_torch": "jaxbn._torch",
    "flax_variables_to_torch": "jaxbn._torch",
    "fold_batch_norm": "jaxbn._fold",
    "fold_linen": "jaxbn._fold",
    "fold_nnx": "jaxbn._fold",
    "from_torch": "jaxbn._torch",
    "frozen_batch_norm": "jaxbn._batch_norm",
    "init_state": "jaxbn._state",
    "momentum_from_torch": "jaxbn._torch",
    "momentum_to_torch": "jaxbn._torch",
    "population_stats": "jaxbn._population",
    "to_torch": "jaxbn._torch",
}

__all__ = [  # the keys of _EXPORTS, literal for type checkers
    "BatchNormResiduals",
    "BatchNormState",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_renorm",
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

if TYPE_CHECKING:
    from jaxbn._batch_norm import (
        batch_norm,
        batch_norm_act,
        batch_norm_bwd,
        batch_norm_fwd,
        frozen_batch_norm,
    )
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
    from jaxbn._warmup_renorm import batch_renorm
else:
    import sys

    if "jax" in sys.modules:
        # jaxbn._platform makes a jit cache-key context (jax.make_user_context). Made
        # during a user's first trace (jaxbn.batch_norm first looked up inside a jitted
        # function), it would change that function's cache key and compile it twice.
        # With jax loaded already this costs nothing; without it (jaxbn --help) jaxbn
        # stays lazy, and the module is made on first use.
        importlib.import_module("jaxbn._platform")

    # Hidden from type checkers, which would otherwise accept any misspelt name.
    def __getattr__(name):
        if name not in _EXPORTS:
            raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value


def __dir__():
    return [*__all__, "__version__"]
