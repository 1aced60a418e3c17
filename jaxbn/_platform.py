"""The one place where jaxbn's program depends on the platform.

jaxbn computes the same mathematics everywhere. Two computations have an
XLA:CPU-specific form (``jaxbn._cpu``): the batch statistics and the backward's passes.
Every other platform gets the clean program (``jaxbn._stats``, ``jaxbn._core``); on GPUs
(CUDA, ROCm) its column sums are split in two steps, which XLA:GPU needs to fuse them
and a TPU would pay a relayout for (``jaxbn._stats.variadic_sum``).

The choice is ``lax.platform_dependent``: every form is traced, and the one for the
platform is chosen when the program is lowered. Lowered for one platform, the
StableHLO holds that form inside a one-branch ``case``, which XLA inlines before it
compiles anything (checked on the compiled CPU and H100 programs:
``benchmarks/gpu_program.py``, ``tests/test_programs.py``). Lowered for several
(``jax.export`` with ``platforms=("cpu", "cuda")``), the case switches on the platform
index, resolved just before compiling.

Each use sits inside a ``custom_jvp`` whose tangent is the clean form in plain jnp,
so autodiff never differentiates the CPU form; the tangent is exact for every form,
since all compute the same function.

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
from jax import lax

from jaxbn._compat import standard_promotion

_clean_everywhere = jax.make_user_context(default_value=False)


def use_clean_program():
    """A context manager: within it, jaxbn uses the GPU program on CPU too."""
    return _clean_everywhere(True)


def per_platform(cpu: Callable, clean: Callable, *args, gpu: Callable | None = None):
    """``cpu(*args)`` lowered for CPU, ``gpu(*args)`` for GPUs, ``clean(*args)`` elsewhere.

    ``gpu`` defaults to ``clean``. All return the same pytree of arrays, of equal
    shapes and dtypes.
    """
    gpu = gpu or clean
    if _clean_everywhere.value:
        return gpu(*args)
    forms = (
        dict(cpu=cpu, default=clean)
        if gpu is clean
        else dict(cpu=cpu, cuda=gpu, rocm=gpu, default=clean)
    )
    return lax.platform_dependent(*args, **forms)


def differentiable_per_platform(cpu, clean, *, gpu=None, tangent=None):
    """``form(spec, *args)`` for the form of the platform (:func:`per_platform`), differentiable.

    ``spec`` is static. The tangent is JAX's jvp of ``tangent(spec, *args)`` (default
    ``clean``), e.g. the clean form with separate sums: autodiff cannot transpose a
    variadic reduce.
    """

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def wrapped(spec, *args):
        gpu_form = None if gpu is None else functools.partial(gpu, spec)
        forms = functools.partial(cpu, spec), functools.partial(clean, spec)
        return per_platform(*forms, *args, gpu=gpu_form)

    @wrapped.defjvp
    @standard_promotion
    def wrapped_jvp(spec, primals, tangents):
        reference = functools.partial(tangent or clean, spec)
        return wrapped(spec, *primals), jax.jvp(reference, primals, tangents)[1]

    return wrapped
