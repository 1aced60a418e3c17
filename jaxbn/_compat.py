"""How jaxbn lives with jax: its dtype-promotion setting, manual-axis types, and the APIs
whose spelling changed between jaxbn's oldest supported jax and the newest.

jaxbn supports jax 0.8.1 and newer (pyproject.toml; flax 0.12.1, the floor of the flax
extra, needs it, and jaxbn alone runs on 0.8.0 too). ``.ci/run`` tests the floors and
the newest releases. Everything that differs between them is here, each shim with the
version that lets it go. Older jax lacks more: the top-level ``jax.enable_x64`` before
0.8.0, ``jax.make_user_context`` (``jaxbn._platform``) before 0.7.2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import jax
from jax import lax

__all__ = ["InconclusiveDimensionOperation", "standard_promotion", "vary_like", "varying_axes"]

try:  # raised by a comparison of symbolic dimensions (jax.export)
    from jax.errors import InconclusiveDimensionOperation  # jax >= 0.10.2
except ImportError:
    try:
        from jax.extend.core import InconclusiveDimensionOperation  # jax 0.10.0, 0.10.1
    except ImportError:
        from jax.core import InconclusiveDimensionOperation  # jax < 0.10 (deprecated there)


def varying_axes(x) -> frozenset:
    """The manual axes (``shard_map``) along which ``x`` varies: its type's vma.

    jax >= 0.10 keeps them in ``typeof(x).mat.varying``, older jax in ``typeof(x).vma``;
    an array outside ``shard_map`` (or without a ``ShapedArray`` type) has none.
    """
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))  # jax < 0.10


def pvary(x, axes: tuple):
    """``x`` marked as varying along the manual ``axes``.

    ``lax.pcast(x, axes, to="varying")`` from jax 0.8.2 on (where ``lax.pvary``, its
    old name, is deprecated), ``lax.pvary(x, axes)`` before.
    """
    if hasattr(lax, "pcast"):
        return lax.pcast(x, axes, to="varying")
    return lax.pvary(x, axes)  # type: ignore[attr-defined]  # jax < 0.8.2


def vary_like(v, *refs):
    """``v`` marked as varying along every manual axis along which a ``ref`` varies.

    Used where JAX needs two values of one varying type: a replicated ``gamma`` under
    ``shard_map``, whose cotangent the rule returns as this device's share (as
    autodiff of ``gamma * xhat`` does), and the operands of a ``lax.cond`` on a
    predicate that varies (under ``vmap`` of a ``shard_map`` JAX runs the cond as a
    select of both branches, which makes every operand vary like the predicate). A
    type change: no data moves. None stays None.
    """
    if v is None:
        return v
    missing = frozenset().union(*map(varying_axes, refs)) - varying_axes(v)
    return pvary(v, tuple(sorted(missing, key=str))) if missing else v


_P = ParamSpec("_P")
_R = TypeVar("_R")


def standard_promotion(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Runs ``fn`` under JAX's standard dtype promotion, whatever the user's setting.

    jaxbn mixes dtypes on purpose (a bfloat16 ``x`` with float32 statistics, an int32
    count), which ``jax_numpy_dtype_promotion="strict"`` (Equinox's tests use it)
    refuses. Every entry point, and every rule JAX traces later (the backward, the
    tangents), wears this decorator.
    """

    @functools.wraps(fn)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with jax.numpy_dtype_promotion("standard"):
            return fn(*args, **kwargs)

    return wrapped
