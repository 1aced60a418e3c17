"""The one place where jaxbn's program depends on the platform.

jaxbn computes the same mathematics everywhere. Only two computations have a second,
XLA:CPU-specific form (``jaxbn._cpu``): the batch statistics and the backward's two
sums. Every other platform (GPU, TPU, ...) gets the clean program of ``jaxbn._stats``.

The choice is made at *lowering* time, when the platform is known, by a primitive
with one lowering rule per platform. Lowered for one platform, the program holds only
that platform's form: no ``stablehlo.case``, nothing left to fold. (``lax.platform_dependent``
also picks at lowering time but leaves a one-branch ``case`` behind.) Lowered for several
platforms at once (``jax.export`` with ``platforms=("cpu", "cuda")``), JAX emits one case
on the platform index, which XLA resolves before it compiles anything.

The primitive supports ``jit``, ``vmap`` (also with named axes), ``shard_map``,
``pmap`` and export. It is not differentiable on its own: each use sits inside a
``custom_jvp`` whose tangent rule is plain jnp (``jaxbn._stats``), so autodiff never
sees it. The tangent rules are exact for both forms, since both compute the same
function.

``use_clean_program()`` (a context manager, for tests and comparisons) makes code
run inside it take the clean form on every platform, so the clean program's numerics
run on CPU. It is part of ``jit``'s cache key (``jax.make_user_context``): a jitted
function called inside and outside it is traced once for each.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax._src import core, dispatch
from jax._src.interpreters import batching, mlir

_clean_everywhere = jax.make_user_context(default_value=False)


def use_clean_program():
    """A context manager: within it, jaxbn uses the non-CPU program on CPU too."""
    return _clean_everywhere(True)


def per_platform(cpu: Callable, clean: Callable, *args):
    """``cpu(*args)`` when lowered for CPU, ``clean(*args)`` for any other platform.

    Both must return the same pytree of arrays with equal shapes and dtypes. Called
    eagerly (no tracer among ``args``), it runs the form for the platform the arrays
    live on, op by op, as JAX runs eager code.
    """
    flat, tree = jax.tree.flatten(args)
    if not any(isinstance(v, jax.core.Tracer) for v in flat):  # eager: where the data is
        on_cpu = all(d.platform == "cpu" for v in flat for d in getattr(v, "devices", set)())
        if on_cpu and not _clean_everywhere.value:
            return cpu(*args)
        return clean(*args)
    forms = []
    for fn in (cpu, clean):
        flat_fn = lambda *xs, fn=fn: fn(*jax.tree.unflatten(tree, xs))  # noqa: E731
        jaxpr, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
        forms.append((jaxpr, jax.tree.structure(shapes)))
    (cpu_jaxpr, cpu_tree), (clean_jaxpr, clean_tree) = forms
    types = lambda j: [(a.shape, a.dtype) for a in j.out_avals]  # noqa: E731
    if str(cpu_tree) != str(clean_tree) or types(cpu_jaxpr) != types(clean_jaxpr):
        raise AssertionError("per_platform: the two forms return different types")
    out = per_platform_p.bind(
        *flat, cpu=cpu_jaxpr, clean=clean_jaxpr, force_clean=bool(_clean_everywhere.value)
    )
    return jax.tree.unflatten(clean_tree, out)


per_platform_p = core.Primitive("jaxbn_per_platform")
per_platform_p.multiple_results = True
per_platform_p.def_impl(functools.partial(dispatch.apply_primitive, per_platform_p))


@per_platform_p.def_effectful_abstract_eval
def _abstract_eval(*avals, cpu, clean, force_clean):
    return clean.out_avals, core.join_effects(cpu.effects, clean.effects)


def _lowering(ctx, *args, cpu, clean, force_clean, use_cpu: bool):
    jaxpr = cpu if use_cpu and not force_clean else clean
    return mlir.lower_fun(core.jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, *args)


mlir.register_lowering(per_platform_p, functools.partial(_lowering, use_cpu=False))
mlir.register_lowering(per_platform_p, functools.partial(_lowering, use_cpu=True), platform="cpu")


def _batching_rule(axis_data, args, dims, *, cpu, clean, force_clean):
    batched = [d is not None for d in dims]
    args = [batching.moveaxis(x, d, 0) if b else x for x, d, b in zip(args, dims, batched)]
    out_batched = [
        any(b)
        for b in zip(*(batching.batch_jaxpr(j, axis_data, batched, False)[1] for j in (cpu, clean)))
    ]
    cpu_b, _ = batching.batch_jaxpr(cpu, axis_data, batched, out_batched)
    clean_b, _ = batching.batch_jaxpr(clean, axis_data, batched, out_batched)
    out = per_platform_p.bind(*args, cpu=cpu_b, clean=clean_b, force_clean=force_clean)
    return out, [0 if b else None for b in out_batched]


batching.fancy_primitive_batchers[per_platform_p] = _batching_rule
