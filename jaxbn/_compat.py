"""The jax APIs whose spelling changed between jaxbn's oldest supported jax and the newest.

jaxbn supports jax 0.8.1 and newer (pyproject.toml; flax 0.12.1, the floor of the flax
extra, needs it, and jaxbn alone runs on 0.8.0 too). ``.ci/run`` tests the floors and
the newest releases. Everything that differs between them is here, each shim with the
version that lets it go. Older jax lacks more: the top-level ``jax.enable_x64`` before
0.8.0, ``jax.make_user_context`` (``jaxbn._platform``) before 0.7.2.
"""

from __future__ import annotations

import jax
from jax import lax

__all__ = ["InconclusiveDimensionOperation", "pvary", "vary_like_predicate", "varying_axes"]

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


def vary_like_predicate(pred, *operands):
    """The operands of a ``lax.cond`` on ``pred``, marked varying where ``pred`` varies.

    Under ``vmap`` of a ``shard_map``, JAX turns a cond with a batched predicate into a
    select of both branches, which makes every operand vary like the predicate; a
    branch that combined an invariant operand with a varying value then holds a
    ``pvary`` of an already varying value, and tracing fails. Marking the operands
    first (a type change, no data moves) leaves the branches nothing to mark. None
    stays None.
    """
    axes = varying_axes(pred)
    out = []
    for v in operands:
        missing = () if v is None else tuple(sorted(axes - varying_axes(v), key=str))
        out.append(pvary(v, missing) if missing else v)
    return out
