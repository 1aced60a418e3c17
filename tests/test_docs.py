"""The docs site: its pages' code runs, and it covers the public API.

Every public name has a docstring and a page.

The public names are ``jaxbn.__all__``, the public classes and functions of
``jaxbn.linen``, ``jaxbn.nnx`` and ``jaxbn.equinox`` (each ``__all__`` and whatever
else they define without a leading underscore), and the public methods of those
classes. Each must have a docstring, and the API reference pages (``docs/api/*.md``)
must render it: a ``::: identifier`` line names it, or names its module without
``members: false``. ``mkdocs build --strict`` (in ``.ci/run``) then checks that each
identifier resolves and each docstring parses. The docstrings' examples run as
doctests with the rest of the suite (``--doctest-modules`` over ``jaxbn``).

The site's pages are tested too: every Python block of ``docs/**/*.md`` runs as
written, each on its own; every page is in the nav; the quickstart is the README's; the
contributing page is ``CONTRIBUTING.md``; each performance page says when, with which
versions and on what it was measured; the benchmark command is spelled once. The
site's own build code (``docs/hooks.py``, ``docs/griffe_rst.py``) is tested where mkdocs
is installed (the ``docs`` extra). From an sdist, which has no ``docs/``, these skip.
The built site is checked in a browser by ``test_docs_site.py``.
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


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return out


def _mkdocs_config() -> dict:
    yaml = pytest.importorskip("yaml")
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda loader, tag, node: None)  # mkdocs' !relative
    return yaml.load((ROOT / "mkdocs.yml").read_text("utf-8"), Loader=loader)


@needs_docs
def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = _nav_pages(_mkdocs_config()["nav"])
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert sorted(nav) == sorted(pages | notebooks)
    assert len(nav) == len(set(nav)), "a page listed twice"


@needs_docs
def test_the_site_covers_what_the_issue_lists():
    """The sections a reader looks for, each a page (README.md points at them)."""
    nav = set(_nav_pages(_mkdocs_config()["nav"]))
    for page in (
        "getting-started.md",
        *(f"guide/{p}.md" for p in ("many-devices", "gradients", "masks", "renorm")),
        *(f"guide/{p}.md" for p in ("ghost-batches", "frozen", "folding", "population-stats")),
        "guide/pytorch.md",
        "integrations/flax.md",
        "integrations/equinox.md",
        "integrations/reinforcement-learning.md",
        "numerics.md",
        *(f"performance/{p}.md" for p in ("index", "cpu", "memory", "gpu-program", "first-step")),
        "contributing.md",
    ):
        assert page in nav, page


# --- the pages' code: every Python block runs, each on its own ---

_FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```$", re.M | re.S)


def page_blocks() -> list:
    """``pytest.param(code, id="page-N")`` for each ```python block of docs/**/*.md.

    Blocks inside a content tab (``=== "linen"``) are indented; they are dedented.
    """
    params = []
    if not DOCS.is_dir():
        return params
    for page in sorted(DOCS.rglob("*.md")):
        n = 0
        for indent, lang, code in _FENCE.findall(page.read_text("utf-8")):
            if lang != "python":
                continue
            n += 1
            code = "\n".join(line[len(indent) :] for line in code.splitlines())
            name = str(page.relative_to(DOCS)).removesuffix(".md").replace("/", "-")
            params.append(pytest.param(code, str(page), id=f"{name}-{n}"))
    return params


PAGE_BLOCKS = page_blocks()


def test_the_pages_have_python_blocks():
    if not DOCS.is_dir():
        pytest.skip("no docs/ in this tree (an sdist)")
    ids = [p.id for p in PAGE_BLOCKS]
    assert len(ids) >= 20 and "guide-many-devices-1" in ids and "guide-gradients-2" in ids, ids


@pytest.mark.parametrize("code, page", PAGE_BLOCKS)
def test_page_block_runs_as_written(code, page):
    for module in re.findall(r"^\s*(?:import|from) (flax|equinox|optax)\b", code, re.M):
        pytest.importorskip(module)
    exec(compile(code, page, "exec"), {"__name__": "docs"})


def _bash_blocks(text: str) -> list[list[str]]:
    return [code.splitlines() for _, lang, code in _FENCE.findall(text) if lang == "bash"]


@needs_docs
def test_quickstart_is_the_readmes_everywhere():
    readme = (ROOT / "README.md").read_text("utf-8")
    quickstart = _bash_blocks(readme[readme.index("<!-- quickstart") :])[0]
    assert len(quickstart) == 2
    for path in (DOCS / "getting-started.md", ROOT / "CONTRIBUTING.md"):
        assert quickstart in _bash_blocks(path.read_text("utf-8")), (
            f"{path.name}: a stale quickstart"
        )


# --- the contributing page is CONTRIBUTING.md ---


@needs_docs
def test_contributing_page_is_contributing_md():
    page = (DOCS / "contributing.md").read_text("utf-8")
    assert page.strip() == '--8<-- "CONTRIBUTING.md"'  # pymdownx.snippets, from the root
    text = (ROOT / "CONTRIBUTING.md").read_text("utf-8")
    assert "\n## The path `x` takes\n" in text
    # links from CONTRIBUTING.md resolve on GitHub and on the site alike: anchors only
    assert not re.findall(r"\]\((?!#|https?://)[^)]+\)", text)


# --- performance: each measurement says when, with what and where ---


@needs_docs
@pytest.mark.parametrize("name", ["cpu", "memory", "gpu-program", "first-step"])
def test_performance_pages_say_when_and_on_what(name):
    text = (DOCS / "performance" / f"{name}.md").read_text("utf-8")
    box = re.search(r'^!!! info "(Measured|Compiled) on"\n((?: {4}.*\n)+)', text, re.M)
    assert box, f"performance/{name}.md: no 'Measured on' box"
    said = box.group(2)
    assert re.search(r"\d{4}-\d{2}-\d{2}", said) and "jax 0." in said, said
    assert re.search(r"machine|cores|H100|TPU", said), said


@needs_docs
def test_the_benchmark_command_is_spelled_once():
    bench = str(_mkdocs_config()["extra"]["bench"])
    for page in DOCS.rglob("*.md"):
        text = page.read_text("utf-8")
        assert bench not in text and "jaxbn bench" not in text, f"{page}: write {{{{ bench }}}}"
    assert "{{ bench }}" in (DOCS / "performance" / "cpu.md").read_text("utf-8")


@needs_docs
def test_placeholders_are_substituted_and_unknown_ones_fail():
    pytest.importorskip("mkdocs")
    hooks = _load(DOCS / "hooks.py")
    assert (
        hooks.substitute("run `{{ bench }} --quick`", {"bench": "b.py"}, "p")
        == "run `b.py --quick`"
    )
    with pytest.raises(Exception, match="benhc"):
        hooks.substitute("{{ benhc }}", {"bench": "b.py"}, "p.md")


# --- the notebooks: executed at build time, cached by their inputs ---


@needs_docs
def test_notebook_cache_key_follows_the_notebook(tmp_path):
    pytest.importorskip("mkdocs")
    hooks = _load(DOCS / "hooks.py")
    nb = tmp_path / "nb.ipynb"
    nb.write_text('{"cells": []}')
    first = hooks.cache_key(nb)
    assert hooks.cache_key(nb) == first and len(first) == 16
    nb.write_text('{"cells": [1]}')
    assert hooks.cache_key(nb) != first
    assert hooks.executed_dir(nb).parent == hooks.CACHE


@needs_docs
def test_notebook_env_is_a_users(monkeypatch):
    pytest.importorskip("mkdocs")
    hooks = _load(DOCS / "hooks.py")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=false")
    monkeypatch.setenv("JAXBN_SOMETHING", "kept")
    env = hooks.user_env()
    assert "XLA_FLAGS" not in env and env["JAXBN_SOMETHING"] == "kept"


@needs_docs
def test_notebook_toc_is_rebuilt_from_the_rendered_headings():
    pytest.importorskip("mkdocs")
    hooks = _load(DOCS / "hooks.py")
    html = (
        '<h1 id="t">Title<a class="anchor-link" href="#t">¶</a></h1>'
        '<h2 id="timing-under-jit">Timing under <code>jit</code></h2><h3 id="c">C</h3>'
        '<h2 id="d">D &amp; E</h2>'
    )
    (title,) = hooks._toc_tokens(html)
    assert title["name"] == "Title" and [c["name"] for c in title["children"]] == [
        "Timing under jit",
        "D & E",
    ]
    assert title["children"][0]["children"][0]["id"] == "c"


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
