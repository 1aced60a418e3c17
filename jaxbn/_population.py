"""Population statistics after training (PreciseBN, ``torch.optim.swa_utils.update_bn``).

The running averages that training leaves behind lag the final weights. Recomputing
the statistics over many batches with the weights fixed gives the population's
exact mean and biased variance: each batch's count, mean and biased variance are
merged in float64 with Chan, Golub and LeVeque's pairwise formula::

    n     = n_a + n_b
    mean  = mean_a + (mean_b - mean_a) * n_b / n
    m2    = m2_a + m2_b + (mean_b - mean_a)**2 * n_a * n_b / n      # m2 = var * n

so batches of unequal size weigh by their counts, unlike an average of per-batch
statistics or an EMA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._compat import standard_promotion
from jaxbn._core import moments
from jaxbn._state import BatchNormState


@standard_promotion
def population_stats(
    fn: Callable,
    batches: Iterable,
    *,
    axis=-1,
    dtype=jnp.float32,
    progress: bool = False,
):
    """Exact mean and biased variance over all ``batches`` of what ``fn`` returns.

    Args:
      fn: ``fn(batch)`` returns an array, or a pytree of arrays, of the values each
        batch norm layer normalizes (with the parameters fixed; jit it if it is
        costly). Each leaf's features are on ``axis``.
      batches: any iterable (a list, a generator, a data loader).
      axis: the feature axis or axes of every leaf, as for :func:`jaxbn.batch_norm`.
      dtype: float32 or float64, for the returned statistics.
      progress: show a tqdm progress bar (needs ``tqdm``).

    Returns:
      The pytree structure of ``fn``'s output with a :class:`jaxbn.BatchNormState`
      per leaf: the population mean and biased variance, and ``count`` the number
      of batches. Use them as the running statistics for evaluation.

    Raises:
      ValueError: if ``batches`` is empty or a leaf's feature shape changes.

    Example:
      >>> import numpy as np, jaxbn
      >>> batches = [np.array([[0.0], [2.0]]), np.array([[4.0]])]
      >>> s = jaxbn.population_stats(lambda b: b, batches)
      >>> s.mean, s.var
      (Array([2.], dtype=float32), Array([2.6666667], dtype=float32))
    """
    dtype = _checks.check_state_dtype("dtype", dtype)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            raise ImportError("progress=True needs tqdm: pip install tqdm.") from err
        batches = tqdm(batches, desc="population statistics", unit="batch")

    static_axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
    acc, treedef, num = None, None, 0
    f64 = lambda v: np.asarray(v, np.float64)
    for batch in batches:
        xs, td = jax.tree.flatten(fn(batch))
        xs = [_checks.check_x(x) for x in xs]
        for x in xs:
            axes = _checks.normalize_axes(axis, x.ndim)
            if any(x.shape[a] == 0 for a in range(x.ndim) if a not in axes):
                raise ValueError(
                    f"fn returned an array of shape {x.shape} with no values to count for "
                    f"batch {num}; expected at least one value per feature."
                )
        # (n, mean, m2) per leaf, the mean as shift + delta in float64: a float32 mean alone
        # loses ulp(mean) / 2
        leaves = [
            (f64(n), f64(sh) + f64(de), f64(v) * f64(n))
            for n, sh, de, v in _batch_moments(static_axis, xs)
        ]
        if acc is None:
            acc, treedef = leaves, td
        else:
            if td != treedef or any(m.shape != a[1].shape for (_, m, _), a in zip(leaves, acc)):
                raise ValueError(
                    f"fn returned a different structure or feature shape for batch {num}; "
                    f"expected the same as for batch 0."
                )
            acc = [_merge(a, b) for a, b in zip(acc, leaves)]
        num += 1
    if acc is None:
        raise ValueError("batches is empty; expected at least one batch.")
    stats = [(jnp.asarray(m, dtype), jnp.asarray(m2 / n, dtype)) for n, m, m2 in acc]
    states = [BatchNormState(mean, var, jnp.asarray(num, jnp.int32)) for mean, var in stats]
    return jax.tree.unflatten(treedef, states)


@functools.partial(jax.jit, static_argnums=0)
def _batch_moments(axis, xs):
    """Per leaf: count, shift, delta and variance of one batch. At module level, so
    that calls of population_stats with the same shapes reuse one compiled program."""
    out = []
    for x in xs:
        axes = _checks.normalize_axes(axis, x.ndim)
        mo = moments(x, None, axes)
        out.append((mo.count, mo.shift, mo.delta, mo.var))
    return out


def _merge(a, b):
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    d = mb - ma
    return n, ma + d * (nb / n), m2a + m2b + d * d * (na * nb / n)
