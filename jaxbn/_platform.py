"""The one place where jaxbn's program depends on the platform.

jaxbn computes the same mathematics everywhere. Only two computations have a second,
XLA:CPU-specific form (``jaxbn._cpu``): the batch statistics and the backward's two
sums. Every other platform gets the clean program of ``jaxbn._stats``; on GPUs (CUDA,
ROCm) its column sums are split in two steps, which XLA:GPU needs to fuse them and a
TPU would pay a relayout for (``jaxbn._stats.variadic_sum``).

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
run inside it take the GPU's form on every platform, so the clean program's numerics
(with the GPU's summation order; a TPU's differs only by summing in one step) run on
CPU. It is part of ``jit``'s cache key (``jax.make_user_context``): a jitted
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
    """A context manager: within it, jaxbn uses the GPU program on CPU too."""
    return _clean_everywhere(True)


def per_platform(cpu: Callable, clean: Callable, *args, gpu: Callable | None = None):
    """``cpu(*args)`` lowered for CPU, ``gpu(*args)`` for GPUs, ``clean(*args)`` elsewhere.

    ``gpu`` defaults to ``clean``. All must return the same pytree of arrays with equal
    shapes and dtypes. Called eagerly (no tracer among ``args``), it runs the form for
    the platform the arrays live on, op by op, as JAX runs eager code.
    """
    flat, tree = jax.tree.flatten(args)
    if not any(isinstance(v, jax.core.Tracer) for v in flat):  # eager: where the data is
        platforms = {d.platform for v in flat for d in getattr(v, "devices", set)()}
        if _clean_everywhere.value or platforms & {"cuda", "rocm", "gpu"}:
            return (clean if gpu is None else gpu)(*args)
        return cpu(*args) if platforms <= {"cpu"} else clean(*args)
    forms: dict[str, tuple] = {}
    for name, fn in (("cpu", cpu), ("clean", clean), ("gpu", gpu)):
        if fn is None:  # no GPU form of its own: the clean one, traced once
            forms[name] = forms["clean"]
            continue
        flat_fn = lambda *xs, fn=fn: fn(*jax.tree.unflatten(tree, xs))  # noqa: E731
        jaxpr, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
        forms[name] = (jaxpr, jax.tree.structure(shapes))
    (cpu_jaxpr, cpu_tree), (gpu_jaxpr, gpu_tree), (clean_jaxpr, clean_tree) = (
        forms[n] for n in ("cpu", "gpu", "clean")
    )
    types = lambda j: [(a.shape, a.dtype) for a in j.out_avals]  # noqa: E731
    for jaxpr, tree_ in ((cpu_jaxpr, cpu_tree), (gpu_jaxpr, gpu_tree)):
        if str(tree_) != str(clean_tree) or types(jaxpr) != types(clean_jaxpr):
            raise AssertionError("per_platform: the forms return different types")
    out = per_platform_p.bind(
        *flat,
        cpu=cpu_jaxpr,
        gpu=gpu_jaxpr,
        clean=clean_jaxpr,
        force_clean=bool(_clean_everywhere.value),
    )
    return jax.tree.unflatten(clean_tree, out)


per_platform_p = core.Primitive("jaxbn_per_platform")
per_platform_p.multiple_results = True
per_platform_p.def_impl(functools.partial(dispatch.apply_primitive, per_platform_p))


@per_platform_p.def_effectful_abstract_eval
def _abstract_eval(*avals, cpu, gpu, clean, force_clean):
    return clean.out_avals, core.join_effects(cpu.effects, gpu.effects, clean.effects)


def _lowering(ctx, *args, cpu, gpu, clean, force_clean, form: str):
    # use_clean_program: the GPU's form on every platform
    jaxpr = gpu if force_clean else {"cpu": cpu, "gpu": gpu, "clean": clean}[form]
    return mlir.lower_fun(core.jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, *args)


mlir.register_lowering(per_platform_p, functools.partial(_lowering, form="clean"))
mlir.register_lowering(per_platform_p, functools.partial(_lowering, form="cpu"), platform="cpu")
for _gpu in ("cuda", "rocm"):
    mlir.register_lowering(per_platform_p, functools.partial(_lowering, form="gpu"), platform=_gpu)


def _batching_rule(axis_data, args, dims, *, cpu, gpu, clean, force_clean):
    batched = [d is not None for d in dims]
    args = [batching.moveaxis(x, d, 0) if b else x for x, d, b in zip(args, dims, batched)]
    forms = (cpu, gpu, clean)
    out_batched = [
        any(b) for b in zip(*(batching.batch_jaxpr(j, axis_data, batched, False)[1] for j in forms))
    ]
    cpu_b, gpu_b, clean_b = (
        batching.batch_jaxpr(j, axis_data, batched, out_batched)[0] for j in forms
    )
    out = per_platform_p.bind(*args, cpu=cpu_b, gpu=gpu_b, clean=clean_b, force_clean=force_clean)
    return out, [0 if b else None for b in out_batched]


batching.fancy_primitive_batchers[per_platform_p] = _batching_rule
