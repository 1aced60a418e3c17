"""The docs site covers the public API: every public name has a docstring and a page.

The public names are ``jaxbn.__all__``, the public classes and functions of
``jaxbn.linen``, ``jaxbn.nnx`` and ``jaxbn.equinox`` (each ``__all__`` and whatever
else they define without a leading underscore), and the public methods of those
classes. Each must have a docstring, and the API reference pages (``docs/api/*.md``)
must render it: a ``::: identifier`` line names it, or names its module without
``members: false``. ``mkdocs build --strict`` (in ``.ci/run``) then checks that each
identifier resolves and each docstring parses. The docstrings' examples run as
doctests with the rest of the suite (``--doctest-modules`` over ``jaxbn``).

The site's own build code is tested here too, where mkdocs is installed (the ``docs``
extra); from an sdist, which has no ``docs/``, the page checks skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import jaxbn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SUBMODULES = ("jaxbn.linen", "jaxbn.nnx", "jaxbn.equinox")
_DIRECTIVE = re.compile(r"^::: +(\S+)\s*$")

needs_docs = pytest.mark.skipif(not DOCS.is_dir(), reason="no docs/ in this tree (an sdist)")


def _module(name):
    try:
        return importlib.import_module(name)
    except ImportError:  # an extra that is not installed, or a module not written yet
        return None


def _module_public_names(module) -> list[str]:
    """``__all__`` plus the public classes and functions the module defines itself."""
    names = set(getattr(module, "__all__", ()))
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) == module.__name__:
            names.add(name)
    return sorted(names)


def _public_methods(cls) -> list[str]:
    """The methods ``cls`` defines in its body: public ones and ``__call__``."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        func = inspect.unwrap(getattr(value, "__func__", value))
        if not inspect.isfunction(func):
            continue
        if func.__qualname__.startswith(cls.__qualname__ + "."):  # not a field's default
            out.append(name)
    return sorted(out)


def public_symbols() -> list:
    """``pytest.param(identifier, object)`` for every public name, methods included."""
    params = []

    def add(identifier, obj):
        params.append(pytest.param(identifier, obj, id=identifier))
        if inspect.isclass(obj):
            for method in _public_methods(obj):
                params.append(
                    pytest.param(
                        f"{identifier}.{method}", getattr(obj, method), id=f"{identifier}.{method}"
                    )
                )

    for name in sorted(jaxbn.__all__):
        add(f"jaxbn.{name}", getattr(jaxbn, name))
    for modname in SUBMODULES:
        module = _module(modname)
        if module is None:
            params.append(
                pytest.param(
                    modname,
                    None,
                    id=modname,
                    marks=pytest.mark.skip(reason=f"{modname} does not import"),
                )
            )
            continue
        add(modname, module)
        for name in _module_public_names(module):
            add(f"{modname}.{name}", getattr(module, name))
    return params


def documented_identifiers() -> set[str]:
    """The identifiers the API reference renders, from the ``:::`` lines of docs/**/*.md.

    A module's line also covers the public names of that module, unless its options
    say ``members: false`` or list the members.
    """
    found = set()
    for page in sorted(DOCS.rglob("*.md")):
        lines = page.read_text("utf-8").splitlines()
        for i, line in enumerate(lines):
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            identifier = m.group(1)
            found.add(identifier)
            options = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and not nxt.startswith(" "):
                    break
                options.append(nxt.strip())
            if any(o.startswith("members:") for o in options):
                continue  # members: false, or an explicit list (covered by its own lines)
            module = _module(identifier)
            if module is not None and inspect.ismodule(module):
                found.update(f"{identifier}.{n}" for n in _module_public_names(module))
    return found


SYMBOLS = public_symbols()


@pytest.mark.parametrize("identifier, obj", SYMBOLS)
def test_public_symbol_has_a_docstring(identifier, obj):
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"{identifier} has no docstring"


@needs_docs
@pytest.mark.parametrize("identifier, obj", [p for p in SYMBOLS if "." in p.values[0]])
def test_public_symbol_is_in_the_api_reference(identifier, obj):
    owner = identifier.rsplit(".", 1)[0]
    documented = documented_identifiers()
    if inspect.ismodule(obj):
        assert identifier in documented, f"no docs/api page has '::: {identifier}'"
        return
    if identifier not in documented and owner in documented and inspect.isclass(_resolve(owner)):
        return  # a method: rendered with its class
    assert identifier in documented, (
        f"{identifier} is public but missing from the API reference: add '::: {identifier}' "
        "to the docs/api page where it belongs"
    )


def _resolve(identifier):
    module, _, name = identifier.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_name_in_jaxbn_all_is_checked():
    """The parametrized tests above see all of ``jaxbn.__all__`` (not a stale copy)."""
    ids = {p.values[0] for p in SYMBOLS}
    assert {f"jaxbn.{n}" for n in jaxbn.__all__} <= ids


# --- the site's build code: docs/hooks.py and docs/griffe_rst.py ---


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_jaxbn_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_docs
def test_readme_sections_are_the_pages_in_the_nav():
    pytest.importorskip("mkdocs")
    yaml = pytest.importorskip("yaml")
    hooks = _load(DOCS / "hooks.py")
    pages = hooks.readme_pages()
    readme = (ROOT / "README.md").read_text("utf-8")
    assert [p for p, _ in pages][0] == "index.md"
    assert len(pages) - 1 == len(re.findall(r"^## ", readme, re.M))
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text("utf-8"))["nav"]
    nav = hooks.nav_with_readme_pages(nav, pages)
    head = [next(iter(i.values())) if isinstance(i, dict) else i for i in nav[: len(pages)]]
    assert head == [p for p, _ in pages], "the README's pages come first, in its order"
    assert hooks.nav_with_readme_pages(nav, pages) == nav  # listed once


@needs_docs
def test_readme_split_moves_headings_and_links():
    pytest.importorskip("mkdocs")
    hooks = _load(DOCS / "hooks.py")
    text = (
        "# lib\n\nIntro, see [b](#sub-b) and [A](#part-a).\n\n"
        "## Part A\n\ntext\n\n```bash\n## not a heading\n```\n\n### Sub B\n\n"
        "back to [A](#part-a)\n\n## Part C\n\n[sub](#sub-b) [nowhere](#nowhere)\n"
    )
    pages = {path: (title, md) for path, title, md in hooks.split_readme(text)}
    assert list(pages) == ["index.md", "part-a.md", "part-c.md"]
    assert pages["index.md"][0] == "lib"
    assert "[b](part-a.md#sub-b)" in pages["index.md"][1]
    assert "[A](part-a.md)" in pages["index.md"][1]
    title, md = pages["part-a.md"]
    assert title == "Part A" and md.startswith("# Part A\n")
    assert "\n## Sub B\n" in md and "\n## not a heading\n" in md  # the code block is kept
    assert "back to [A](#part-a)" in md  # same page: left alone
    assert "[sub](part-a.md#sub-b) [nowhere](#nowhere)" in pages["part-c.md"][1]


@needs_docs
def test_rst_markup_becomes_markdown():
    pytest.importorskip("griffe")
    rst = _load(DOCS / "griffe_rst.py")
    exports = {"batch_norm", "BatchNormState"}
    doc = "\n".join(
        [
            "Uses :func:`batch_norm`, :class:`jaxbn.BatchNormState`, :func:`~jaxbn.linen.BatchNorm`,",
            ":func:`jaxbn._stats.moments`, :class:`flax.nnx.Rngs` and :func:`helper`.",
            "",
            "eps must be finite and",
            "> 0, and # is a hash.",
            "The rule::",
            "",
            "    y = x ::",
            "",
            "Args:",
            "  x, gamma,",
            "    beta: as for ``batch_norm``",
            "      and more.",
            "  mask: a mask.",
            "",
            "Example:",
            "  >>> d = {}",
            '  >>> d["a"]["b"]',
            "  1",
        ]
    )
    out = rst.rewrite(rst.split_multi_name_args(doc), "jaxbn", exports)
    lines = out.splitlines()
    assert lines[0] == (
        "Uses [`batch_norm`][jaxbn.batch_norm], [`jaxbn.BatchNormState`][jaxbn.BatchNormState], "
        "[`BatchNorm`][jaxbn.linen.BatchNorm],"
    )
    assert lines[1] == "`jaxbn._stats.moments`, `flax.nnx.Rngs` and `helper`."
    assert "\\> 0, and # is a hash." in lines
    assert "The rule:" in lines and "    y = x ::" in lines  # code is left as it is
    i = lines.index("  x: as for ``batch_norm``")  # a description over two lines
    assert lines[i + 1 : i + 4] == [
        "      and more.",
        "  gamma: as for ``x``.",
        "  beta: as for ``x``.",
    ]
    assert "  mask: a mask." in lines
    one_line = rst.split_multi_name_args("Args:\n  a, b: the same.\n  c: other.")
    assert one_line == "Args:\n  a: the same.\n  b: the same.\n  c: other."
    i = lines.index("  ```pycon")
    assert lines[i + 1 : i + 5] == ["  >>> d = {}", '  >>> d["a"]["b"]', "  1", "  ```"]
