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
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # "import x as x": an explicit re-export
    from jaxbn._batch_norm import batch_norm as batch_norm
    from jaxbn._batch_norm import batch_norm_act as batch_norm_act
    from jaxbn._batch_norm import batch_norm_bwd as batch_norm_bwd
    from jaxbn._batch_norm import batch_norm_fwd as batch_norm_fwd
    from jaxbn._batch_norm import frozen_batch_norm as frozen_batch_norm
    from jaxbn._core import BatchNormResiduals as BatchNormResiduals
    from jaxbn._fold import fold_batch_norm as fold_batch_norm
    from jaxbn._fold import fold_linen as fold_linen
    from jaxbn._fold import fold_nnx as fold_nnx
    from jaxbn._population import population_stats as population_stats
    from jaxbn._state import BatchNormState as BatchNormState
    from jaxbn._state import init_state as init_state
    from jaxbn._torch import flax_variables_from_torch as flax_variables_from_torch
    from jaxbn._torch import flax_variables_to_torch as flax_variables_to_torch
    from jaxbn._torch import from_torch as from_torch
    from jaxbn._torch import momentum_from_torch as momentum_from_torch
    from jaxbn._torch import momentum_to_torch as momentum_to_torch
    from jaxbn._torch import to_torch as to_torch
    from jaxbn._warmup_renorm import batch_renorm as batch_renorm
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
