"""The jax APIs whose spelling changed between jaxbn's oldest supported jax and the newest.

jaxbn supports jax 0.8.0 and newer (pyproject.toml); CI tests the floor and the newest
release. Everything that differs between them is here, each with the version that lets
it go. (Below 0.8.0 more is missing: ``jax.make_user_context`` before 0.7.2, the
top-level ``jax.enable_x64`` before 0.8.0.)
"""

from __future__ import annotations

import jax
from jax import lax


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
    return lax.pvary(x, axes)  # jax < 0.8.2
