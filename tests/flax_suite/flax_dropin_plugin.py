"""pytest plugin: Flax's BatchNorm tests, with jaxbn's modules in place of Flax's.

Loaded by ``run_flax_tests.py`` with ``-p flax_dropin_plugin``; importing it does
nothing. At configure time, before any test module is imported, it replaces
``BatchNorm`` wherever Flax exports it (``JAXBN_FLAX_SUITE=flax`` keeps Flax's own,
the baseline), then keeps only the tests whose code names ``BatchNorm``, directly or
through a module-level class or function that does (of a test parameterized over
layers, only its ``BatchNorm`` cases).
"""

from __future__ import annotations

import inspect
import os
import re
import sys

_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def _swap_in_jaxbn() -> None:
    import flax.linen
    import flax.linen.normalization
    import flax.nnx
    import flax.nnx.nn.normalization

    import jaxbn.linen
    import jaxbn.nnx

    for mod in (flax.linen, flax.linen.normalization):
        mod.BatchNorm = jaxbn.linen.BatchNorm  # type: ignore[attr-defined,misc]
    for mod in (flax.nnx, flax.nnx.nn.normalization):
        mod.BatchNorm = jaxbn.nnx.BatchNorm  # type: ignore[attr-defined,misc]


def pytest_configure(config) -> None:
    module = os.environ.get("JAXBN_FLAX_SUITE", "jaxbn")
    if module not in ("jaxbn", "flax"):
        raise ValueError(f"JAXBN_FLAX_SUITE must be 'jaxbn' or 'flax', got {module!r}.")
    if module == "jaxbn":
        _swap_in_jaxbn()


def _source(obj) -> str:
    try:
        return inspect.getsource(inspect.unwrap(obj))
    except (OSError, TypeError):
        return ""


def _batchnorm_names(module) -> set[str]:
    """Module-level names whose code mentions BatchNorm, closed under use."""
    sources = {
        name: _source(obj)
        for name, obj in vars(module).items()
        if (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    }
    names = {n for n, s in sources.items() if "BatchNorm" in s}
    grew = True
    while grew:
        grew = False
        for n, s in sources.items():
            if n not in names and names & set(_WORD.findall(s)):
                names.add(n)
                grew = True
    return names


def _uses_batchnorm(item, cache: dict) -> bool:
    fn = getattr(item, "obj", None)
    decorators, _, src = _source(fn).partition("def ")
    if "BatchNorm" in src:
        return True
    if "BatchNorm" in decorators:  # a parameterized test: only its BatchNorm cases
        return "BatchNorm" in (getattr(fn, "__doc__", None) or "")
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    if module is None:
        return False
    if module.__name__ not in cache:
        cache[module.__name__] = _batchnorm_names(module)
    test_class = getattr(item, "cls", None)
    own = {getattr(test_class, "__name__", None)}
    return bool((cache[module.__name__] - own) & set(_WORD.findall(src)))


def pytest_collection_modifyitems(config, items) -> None:
    cache: dict = {}
    keep = [i for i in items if _uses_batchnorm(i, cache)]
    drop = [i for i in items if not _uses_batchnorm(i, cache)]
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
