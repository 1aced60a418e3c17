"""mkdocs hooks: the notebooks, executed; one name for the benchmark command.

**The notebooks** in ``notebooks/`` become the pages ``notebooks/NAME.ipynb``, which
mkdocs-jupyter renders. They are committed without outputs (``tests/test_notebooks.py``
keeps them so), so the build executes each one, in a fresh Jupyter kernel in
``notebooks/`` with a user's environment, as ``tests/test_notebooks.py`` does, and the
pages show every figure and printed table. An error in a cell fails the build.

Executed copies are kept in ``build/notebooks/`` (git-ignored), named by a hash of what
their outputs depend on: the notebook, jaxbn's sources and the versions of the packages
it imports. A build whose inputs did not change (``mkdocs serve`` after editing a page)
reuses them; a changed notebook or jaxbn runs again. The notebooks run two at a time,
slowest first. ``JAXBN_DOCS_EXECUTE=0`` renders them as stored, without outputs, and
says so on each page (a quick build to read the prose).

The notebooks' tables of contents and titles are rebuilt from the rendered headings:
mkdocs-jupyter's drop the code in a heading (``Timing under `jit` `` became "Timing
under", linked to an anchor that does not exist).

**The benchmark command** is written ``{{ bench }}`` in the pages and replaced with
``extra.bench`` of ``mkdocs.yml``, its one spelling: renaming the command changes one
line. A page that still holds ``{{ ... }}`` after that fails the build.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import html as html_lib
import importlib.metadata
import json
import os
import re
import sys
import time
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority, get_plugin_logger
from mkdocs.structure.files import File, Files
from mkdocs.structure.toc import get_toc

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CACHE = ROOT / "build" / "notebooks"
# what a notebook's outputs depend on besides its own cells and jaxbn's sources
PACKAGES = ("jax", "jaxlib", "numpy", "flax", "optax", "scikit-learn", "matplotlib")
SLOWEST_FIRST = ("02_", "03_", "01_", "04_", "05_")  # as tests/conftest.py orders them
HANG_GUARD_S = 1800  # per cell, as tests/test_notebooks.py
# the test suite's settings, which a user's kernel does not have (tests/conftest.py)
_NOT_A_USERS = ("XLA_FLAGS", "MPLBACKEND", "JAX_COMPILATION_CACHE_DIR")

_HTML_HEADING = re.compile(r'<h([1-6])\b[^>]*\bid="([^"]+)"[^>]*>(.*?)</h\1>', re.S)
_PERMALINK = re.compile(r'<a class="(?:anchor-link|headerlink)".*?</a>', re.S)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")

log = get_plugin_logger("jaxbn")


# --- the notebooks, executed ---


def _versions() -> str:
    out = [sys.version.split()[0]]
    for name in PACKAGES:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} absent")
    return " ".join(out)


def cache_key(notebook: Path) -> str:
    """A hash of the notebook, jaxbn's sources and the package versions: 16 hex digits."""
    h = hashlib.sha256(notebook.read_bytes())
    for path in sorted((ROOT / "jaxbn").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    h.update(_versions().encode())
    return h.hexdigest()[:16]


def executed_dir(notebook: Path) -> Path:
    """Where the executed copy of ``notebook`` is: ``DIR / "notebooks" / notebook.name``."""
    return CACHE / f"{notebook.stem}-{cache_key(notebook)}"


def user_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in _NOT_A_USERS and "PERSISTENT_CACHE" not in k
    }


def execute(notebook: Path, out_dir: Path) -> float:
    """Runs ``notebook`` in a fresh kernel and writes it, with its outputs, to ``out_dir``."""
    import nbclient
    import nbformat

    start = time.perf_counter()
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=HANG_GUARD_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook.parent)}},
    )
    client.execute(env=user_env())  # raises CellExecutionError, with the cell, on an error
    target = out_dir / "notebooks" / notebook.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(target)  # whole or not at all: a build stopped midway leaves no half copy
    return time.perf_counter() - start


def executed_notebooks(notebooks: list[Path], workers: int = 2) -> dict[Path, Path]:
    """``{notebook: directory of its executed copy}``, running those not in the cache."""
    dirs = {nb: executed_dir(nb) for nb in notebooks}
    todo = [nb for nb in notebooks if not (dirs[nb] / "notebooks" / nb.name).is_file()]
    todo.sort(
        key=lambda nb: next((i for i, p in enumerate(SLOWEST_FIRST) if nb.name.startswith(p)), 99)
    )
    if todo:
        log.info("executing %d notebook(s), %d at a time", len(todo), workers)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        futures = {pool.submit(execute, nb, dirs[nb]): nb for nb in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                nb = futures[future]
                try:
                    seconds = future.result()
                except Exception as err:
                    raise PluginError(f"notebooks/{nb.name} failed to run:\n{err}") from err
                log.info("executed notebooks/%s in %.0f s", nb.name, seconds)
        finally:  # a failure: the notebooks not started yet are not run
            pool.shutdown(wait=True, cancel_futures=True)
    for stale in CACHE.glob("*-*") if CACHE.is_dir() else ():  # other keys of these notebooks
        if stale.is_dir() and stale not in dirs.values():
            if any(stale.name.startswith(nb.stem + "-") for nb in notebooks):
                for f in sorted(stale.rglob("*"), reverse=True):
                    f.unlink() if f.is_file() else f.rmdir()
                stale.rmdir()
    return dirs


def _execute_enabled() -> bool:
    return os.environ.get("JAXBN_DOCS_EXECUTE", "1").lower() not in ("0", "false", "no")


@event_priority(100)  # before mkdocs-jupyter's on_files, so that it renders the notebooks
def on_files(files: Files, config) -> Files:
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    dirs = executed_notebooks(notebooks) if _execute_enabled() else {}
    for nb in notebooks:
        # a File rooted at a directory (not File.generated): mkdocs-jupyter's wrapper of
        # it reads src_dir to find the notebook
        files.append(
            File(
                f"notebooks/{nb.name}",
                src_dir=str(dirs.get(nb, ROOT)),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files


def on_serve(server, config, builder):
    for path in ("notebooks", "jaxbn", "CONTRIBUTING.md"):  # rebuild when these change
        server.watch(str(ROOT / path))
    return server


# --- the benchmark command's one spelling ---


def substitute(markdown: str, extra: dict, where: str) -> str:
    """``{{ name }}`` replaced with ``extra[name]``; an unknown name is an error."""

    def sub(m):
        if m.group(1) not in extra:
            raise PluginError(f"{where}: {m.group(0)} is not in mkdocs.yml's extra")
        return str(extra[m.group(1)])

    return _PLACEHOLDER.sub(sub, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return substitute(markdown, dict(config.extra), page.file.src_uri)


# --- the notebook pages' titles and tables of contents ---


def _toc_tokens(html: str) -> list[dict]:
    """The nested TOC tokens of a page's rendered ``<hN id=...>`` headings."""
    roots: list[dict] = []
    stack: list[dict] = []
    for m in _HTML_HEADING.finditer(html):
        text = re.sub(r"<[^>]+>", "", _PERMALINK.sub("", m.group(3)))
        token = {
            "level": int(m.group(1)),
            "id": m.group(2),
            "name": html_lib.unescape(text).strip(),
        }
        token["children"] = []
        while stack and stack[-1]["level"] >= token["level"]:
            stack.pop()
        (stack[-1]["children"] if stack else roots).append(token)
        stack.append(token)
    return roots


_NO_OUTPUTS = (
    '<div class="admonition note"><p class="admonition-title">Shown without outputs</p>'
    "<p>This build did not run the notebooks (<code>JAXBN_DOCS_EXECUTE=0</code>): the page "
    "shows code and text, no results or figures. The published site runs them.</p></div>\n"
)


def has_outputs(path: Path) -> bool:
    cells = json.loads(path.read_text("utf-8")).get("cells", [])
    return any(cell.get("outputs") for cell in cells)


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri.startswith("notebooks/") and page.file.src_uri.endswith(".ipynb"):
        tokens = _toc_tokens(html)
        page.toc = get_toc(tokens)
        if tokens and tokens[0]["level"] == 1:
            page.title = tokens[0]["name"]
        if not has_outputs(Path(page.file.abs_src_path)):  # say so after the title
            m = re.search(r"</h1>", html)
            html = html[: m.end()] + _NO_OUTPUTS + html[m.end() :] if m else _NO_OUTPUTS + html
    return html
