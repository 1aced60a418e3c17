"""Argument checks, run on static shapes and dtypes before anything reaches XLA.

Every check raises one sentence: the argument, what was received, what was expected.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._compat import InconclusiveDimensionOperation
from jaxbn._stats import real_dtype


def feature_shape_of(num_features, name="num_features", tuples=True) -> tuple[int, ...]:
    """Validates ``num_features`` (an int, or a tuple of ints) and returns it as a shape."""
    dims = num_features if tuples and isinstance(num_features, tuple) else (num_features,)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            what = "an int or a tuple of ints" if tuples else "an int (the number of channels)"
            raise TypeError(f"{name} must be {what}, got {num_features!r}.")
        if int(d) <= 0:
            raise ValueError(f"{name} must be positive, got {num_features!r}.")
    return tuple(int(d) for d in dims)


def check_state_dtype(name: str, dtype) -> np.dtype:
    """Statistics live in float32 or float64, never lower."""
    dt = np.dtype(dtype) if dtype is not None else None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(
            f"{name} must be float32 or float64 (statistics are kept in at least "
            f"float32), got {dtype}."
        )
    return dt


def normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    """Returns the feature axes as a sorted tuple of non-negative ints."""
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for x with {ndim} dimensions; expected "
                f"a value in [{-ndim}, {ndim})."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat a dimension, got {axis!r}.")
    return tuple(sorted(out))


def check_x(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"x must be a floating-point or complex array, got dtype {x.dtype}; cast it "
            f"first, e.g. x.astype(jnp.float32)."
        )
    return x


def check_per_feature(name: str, v, feature_shape: tuple[int, ...], x=None):
    """gamma, beta: None or a floating array of exactly the feature shape (real for real x)."""
    if v is None:
        return None
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.inexact):
        raise TypeError(f"{name} must be a floating-point array or None, got dtype {v.dtype}.")
    if x is not None and jnp.iscomplexobj(v) and not jnp.iscomplexobj(x):
        raise TypeError(
            f"{name} is complex ({v.dtype}) but x is real ({x.dtype}); expected a real {name}."
        )
    if v.shape != feature_shape:
        raise ValueError(
            f"{name} has shape {v.shape}, but x has feature shape {feature_shape} "
            f"along axis; expected {name}.shape == {feature_shape}."
        )
    return v


def check_mask(mask, x_shape: tuple[int, ...]):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}.")
    try:
        ok = mask.ndim <= len(x_shape) and np.broadcast_shapes(mask.shape, x_shape) == x_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask has shape {mask.shape}, which does not broadcast to x's shape "
            f"{x_shape}; expected a boolean array broadcastable to x."
        )
    return jnp.reshape(mask, (1,) * (len(x_shape) - mask.ndim) + mask.shape)


def check_flag(name: str, value, meaning: str) -> bool:
    """A Python bool: it picks the program, so a traced one cannot."""
    if not isinstance(value, (bool, np.bool_)):
        fix = (
            "; under jax.jit, mark it static (static_argnames) or call each mode's function"
            if isinstance(value, jax.Array)
            else ""
        )
        raise TypeError(
            f"{name} must be a Python bool ({meaning}), got {value!r} of type "
            f"{type(value).__name__}{fix}."
        )
    return bool(value)


def check_training(training) -> bool:
    return check_flag("training", training, "True: batch statistics, False: running statistics")


def check_use_running_average(value) -> bool:
    return check_flag(
        "use_running_average", value, "True: running statistics, False: batch statistics"
    )


def _static_number(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(
            f"{name} must be a Python number (it is static configuration), got {type(v).__name__}."
        )


def check_eps(eps, dtype=None, name="eps") -> float:
    _static_number(name, eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {eps!r}.")
    if dtype is not None:
        dt = real_dtype(dtype)
        tiny = float(jnp.finfo(dt).tiny)
        if eps < tiny:
            raise ValueError(
                f"eps must be at least {tiny:.3g}, the smallest normal {np.dtype(dt).name} "
                f"(smaller ones round to 0 in the statistics' arithmetic), got {eps!r}."
            )
    return float(eps)


def check_momentum(momentum, allow_none: bool = True):
    if momentum is None and allow_none:
        return None
    _static_number("momentum", momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be a number in [0, 1] (the weight on the old running "
            f"value) or None (cumulative average), got {momentum!r}."
        )
    return float(momentum)


def check_batch_size(
    x_shape, reduce_axes, axis_name, groups=None, name="x", allow_one=False
) -> None:
    """Training needs values along the reduced axes, and two or more per feature.

    PyTorch raises for one value too. Across devices the rule applies to the global
    count (this device's count times the devices sharing the statistics), which is
    static under ``shard_map``, ``pmap`` and ``vmap``.
    """
    n = math.prod(x_shape[a] for a in reduce_axes)
    devices = 1 if axis_name is None else axis_size(axis_name, groups)
    try:
        empty, too_few = n == 0, n * devices <= 1
    except InconclusiveDimensionOperation:  # symbolic (jax.export): known at run time
        empty = too_few = False
    if empty:
        raise ValueError(
            f"{name} of shape {tuple(x_shape)} has no values along the reduced axes "
            f"{tuple(reduce_axes)}; training needs at least two values per feature."
        )
    if too_few and not allow_one:
        where = "" if axis_name is None else f" over all devices of axis_name {axis_name!r}"
        raise ValueError(
            f"training=True needs more than one value per feature to compute a "
            f"variance, but {name} of shape {tuple(x_shape)} has {n * devices} along the "
            f"reduced axes {tuple(reduce_axes)}{where}; use a larger batch or training=False."
        )


class UnboundAxisNameError(NameError, ValueError):
    """Training with an ``axis_name`` that no ``vmap``/``pmap``/``shard_map`` binds here.

    A ``NameError``, as Equinox's layer raises there, and a ``ValueError``, as
    jaxbn's checks raise.
    """


def axis_size(axis_name, groups) -> int:
    """How many devices share the statistics (the smallest group's); a clear error for an
    unbound name or groups that do not partition the axis."""
    try:
        size = jax.lax.axis_size(axis_name)
    except NameError:
        raise UnboundAxisNameError(
            f"axis_name {axis_name!r} is not bound here; call batch_norm inside "
            f"jax.shard_map, jax.pmap or jax.vmap with that axis name, or pass "
            f"axis_name=None for per-device statistics."
        ) from None
    if groups is None:
        return size
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(size)) or any(len(g) == 0 for g in groups):
        raise ValueError(
            f"axis_index_groups must split the {size} devices of axis_name {axis_name!r} "
            f"into groups, each device in exactly one, got {list(groups)}."
        )
    return min(len(g) for g in groups)  # groups may differ in size, as JAX's psum allows


def check_axis_name(axis_name):
    """None, a name or a tuple of names: static configuration, so hashable."""
    try:
        hash(axis_name)
    except TypeError:
        raise TypeError(
            f"axis_name must be None, a name or a tuple of names (it is static "
            f"configuration, so hashable), got {axis_name!r} of type "
            f"{type(axis_name).__name__}."
        ) from None
    return axis_name


def check_groups(axis_index_groups, axis_name):
    """The groups as a tuple of tuples (static configuration), or None."""
    if axis_index_groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            "axis_index_groups was given without axis_name; pass the named axis "
            "that the groups index."
        )
    return tuple(tuple(int(i) for i in g) for g in axis_index_groups)


ACTIVATIONS = ("relu", "leaky_relu", "identity")


def check_activation(activation, negative_slope, inplace) -> dict:
    """The rule's activation fields: ``activation``, ``slope`` and ``keep``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    slope = 0.0
    if activation == "leaky_relu":
        ok = isinstance(negative_slope, (int, float)) and not isinstance(negative_slope, bool)
        if not (ok and np.isfinite(negative_slope) and negative_slope > 0):  # invertible
            raise ValueError(f"negative_slope must be a finite number > 0, got {negative_slope!r}.")
        slope = float(negative_slope)
    if inplace and activation == "relu":
        raise ValueError(
            "inplace=True recovers the input from the output, which needs an invertible "
            "activation ('leaky_relu' or 'identity'); got activation='relu'."
        )
    return dict(activation=activation, slope=slope, keep="z" if inplace else "x")


def check_residual(residual, x):
    """None, or an array of x's shape and dtype."""
    if residual is None:
        return None
    residual = jnp.asarray(residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual has shape {residual.shape} and dtype {residual.dtype}, but x has "
            f"{x.shape} and {x.dtype}; expected an array of x's shape and dtype."
        )
    return residual


GROUPS_UNSUPPORTED = (
    "axis_index_groups works under jax.pmap only: JAX's collectives take no groups "
    "under jax.shard_map or jax.vmap; there, give each group its own mesh axis and "
    "pass that axis as axis_name."
)


def check_cotangents(residuals, axes, dy, dmean, dvar):
    """batch_norm_bwd: residuals from the same axis, cotangents of the right shapes."""
    x = residuals.x
    fshape = tuple(x.shape[a] for a in axes)
    if residuals.rstd.shape != fshape:
        raise ValueError(
            f"residuals hold statistics of shape {residuals.rstd.shape}, but axis "
            f"{axes} of x {x.shape} gives {fshape}; pass batch_norm_bwd the axis given "
            f"to batch_norm_fwd."
        )
    dy = jnp.asarray(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected x's shape {x.shape}.")
    for name, v in (("dmean", dmean), ("dvar", dvar)):
        if v is not None and jnp.shape(v) != fshape:
            raise ValueError(f"{name} has shape {jnp.shape(v)}, expected {fshape}.")
    return dy


def check_renorm(renorm):
    """None, or (rmax, dmax) as Python numbers (checked) or scalar arrays (traced)."""
    if renorm is None:
        return None
    if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
        raise TypeError(f"renorm must be None or a pair (rmax, dmax), got {renorm!r}.")
    return check_limits(*renorm, prefix="renorm ", names=("rmax", "dmax"))


def check_limits(rmax, dmax, prefix="", names=("r_max", "d_max")):
    """Batch renorm's limits, Python numbers (checked) or scalar arrays (traced), as arrays."""
    for name, v, low in ((names[0], rmax, 1.0), (names[1], dmax, 0.0)):
        if isinstance(v, (bool, str, bytes)) or not (
            isinstance(v, numbers.Real) or hasattr(v, "dtype")
        ):
            raise TypeError(f"{prefix}{name} must be a number or a scalar array, got {v!r}.")
        if hasattr(v, "dtype") and (jnp.iscomplexobj(v) or not jnp.issubdtype(v.dtype, jnp.number)):
            raise TypeError(
                f"{prefix}{name} must be a real number or scalar array, got dtype {v.dtype}."
            )
        if isinstance(v, numbers.Real):
            if not (math.isfinite(v) and v >= low):
                raise ValueError(
                    f"{prefix}{name} must be a finite number >= {low:g}, got {v!r}"
                    + (f" (r is clipped to [1/{name}, {name}])." if low else ".")
                )
        elif jnp.ndim(v) != 0:
            raise TypeError(f"{prefix}{name} must be a scalar, got shape {jnp.shape(v)}.")
    return jnp.asarray(rmax), jnp.asarray(dmax)  # Python numbers stay weakly typed


def check_virtual_batch_size(size, x_shape, feature_axes, axis_name):
    """Ghost batches split axis 0, the batch, into groups of ``size``."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
        raise ValueError(f"virtual_batch_size must be a positive int or None, got {size!r}.")
    if 0 in feature_axes:
        raise ValueError(
            "virtual_batch_size splits axis 0 of x into ghost batches, but axis 0 is a "
            "feature axis; put the batch first."
        )
    if axis_name is not None:
        raise ValueError(
            "virtual_batch_size cannot be combined with axis_name: ghost batches are "
            "per device; drop one of them."
        )
    if x_shape is not None and x_shape[0] % size:
        raise ValueError(
            f"virtual_batch_size {size} does not divide the batch size {x_shape[0]} "
            f"(x.shape[0]); expected a divisor of it."
        )
    return int(size)
