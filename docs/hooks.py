"""mkdocs hooks: the README's sections as pages, the stored notebooks, an optional page.

The README stays the one source of its text: ``README.md`` is split at its ``## ``
headings when the site is built. The part before the first one is the home page
(``index.md``); each section becomes a page named after its heading's anchor
(``## Quickstart`` -> ``quickstart.md``), its headings raised one level, listed in the
nav after the home page in the README's order. Links between
README sections (``[...](#anchor)``) are pointed at the page that now holds the anchor,
and ``mkdocs build --strict`` fails on any that does not resolve.

The notebooks in ``notebooks/`` are added as ``notebooks/NAME.ipynb`` pages, which
mkdocs-jupyter renders as stored (the docs build never executes them). Their table of
contents and title are then rebuilt from the rendered headings: mkdocs-jupyter's drop
the code in a heading (``Timing under `jit` `` became "Timing under", linked to an
anchor that does not exist). A notebook stored without outputs says so at its top.

``api/equinox.md`` documents ``jaxbn.equinox``; while that module does not exist in
the tree, the page is left out of the site and the nav.
"""

from __future__ import annotations

import html as html_lib
import json
import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.toc import get_toc

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOTEBOOKS = ROOT / "notebooks"

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6}) +(.+?)\s*#*\s*$")
_ANCHOR_LINK = re.compile(r"\]\(#([^)\s]+)\)")
_HTML_HEADING = re.compile(r'<h([1-6])\b[^>]*\bid="([^"]+)"[^>]*>(.*?)</h\1>', re.S)
_PERMALINK = re.compile(r'<a class="(?:anchor-link|headerlink)".*?</a>', re.S)

# Pages that exist only when a module is in the tree: page -> (module file, package dir).
OPTIONAL_PAGES = {"api/equinox.md": ("jaxbn/equinox.py", "jaxbn/equinox")}


def _heading_slug(text: str) -> str:
    """The anchor Python-Markdown's ``toc`` gives a heading (code marks removed)."""
    return slugify(text.replace("`", ""), "-")


def _outside_fences(lines):
    """Yields ``(index, line, in_fence)`` for each line, tracking fenced code blocks."""
    fence = None
    for i, line in enumerate(lines):
        m = _FENCE.match(line)
        if m and fence is None:
            fence = m.group(1)
            yield i, line, True
        elif m and line.strip().startswith(fence):
            fence = None
            yield i, line, True
        else:
            yield i, line, fence is not None


def split_readme(text: str) -> list[tuple[str, str, str]]:
    """README text -> ``[(page path, title, markdown), ...]``, the home page first.

    Sections split at ``## `` headings outside code blocks; each section's headings
    move up one level (``##`` -> ``#``) and its ``(#anchor)`` links to anchors of other
    sections become links to the page that holds them.
    """
    lines = text.splitlines()
    starts = [0]  # line index where each page starts
    for i, line, fenced in _outside_fences(lines):
        if not fenced and line.startswith("## "):
            starts.append(i)
    starts.append(len(lines))

    pages = []  # (path, title, lines)
    anchors = {}  # heading anchor -> (page path, is the page's title)
    for k in range(len(starts) - 1):
        chunk = lines[starts[k] : starts[k + 1]]
        if k == 0:
            path, title = "index.md", None
        else:
            title = chunk[0][3:].strip()
            path = _heading_slug(title) + ".md"
        out = []
        for _, line, fenced in _outside_fences(chunk):
            m = None if fenced else _HEADING.match(line)
            if m:
                level, heading = len(m.group(1)), m.group(2)
                if k == 0 and level == 1:
                    title = heading
                if level >= 2 and k > 0:
                    line = "#" * (level - 1) + " " + heading
                anchors.setdefault(_heading_slug(heading), (path, line.startswith("# ")))
            out.append(line)
        pages.append((path, title, out))

    def relink(path):
        def sub(m):
            target = anchors.get(m.group(1))
            if target is None:  # left as it is: strict mode reports it
                return m.group(0)
            page, is_title = target
            if page == path:
                return m.group(0)
            return f"]({page})" if is_title else f"]({page}#{m.group(1)})"

        return sub

    result = []
    for path, title, out in pages:
        body = []
        for _, line, fenced in _outside_fences(out):
            body.append(line if fenced else _ANCHOR_LINK.sub(relink(path), line))
        result.append((path, title or path, "\n".join(body).rstrip() + "\n"))
    return result


def readme_pages() -> list[tuple[str, str]]:
    """``[(page path, title), ...]`` of the README's pages, for the nav and the tests."""
    return [(path, title) for path, title, _ in split_readme(README.read_text("utf-8"))]


def _module_present(paths) -> bool:
    return any((ROOT / p).exists() for p in paths)


def _drop_from_nav(nav, page):
    """The nav without the entries that point at ``page``."""
    out = []
    for item in nav:
        if isinstance(item, dict):
            ((key, value),) = item.items()
            if isinstance(value, list):
                out.append({key: _drop_from_nav(value, page)})
            elif value != page:
                out.append(item)
        elif item != page:
            out.append(item)
    return out


def nav_with_readme_pages(nav, pages):
    """``nav`` with the README's pages after its home page, those it does not list yet.

    A README section added later becomes a page in the nav without editing mkdocs.yml.
    """
    listed = set()

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            walk(value) if isinstance(value, list) else listed.add(value)

    walk(nav)
    extra = [path for path, _ in pages if path != "index.md" and path not in listed]
    out = []
    for item in nav:
        out.append(item)
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if value == "index.md":
            out.extend(extra)
            extra = []
    return out + extra


def on_config(config):
    if config.nav is not None:
        config.nav = nav_with_readme_pages(config.nav, readme_pages())
        for page, paths in OPTIONAL_PAGES.items():
            if not _module_present(paths):
                config.nav = _drop_from_nav(config.nav, page)
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, so that it renders the notebooks
def on_files(files: Files, config) -> Files:
    for page, paths in OPTIONAL_PAGES.items():
        if not _module_present(paths) and files.get_file_from_path(page) is not None:
            files.remove(files.get_file_from_path(page))
    for path, _, markdown in split_readme(README.read_text("utf-8")):
        files.append(File.generated(config, path, content=markdown))
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        # a File rooted at the repository (not File.generated): mkdocs-jupyter's wrapper
        # of it reads src_dir to find the notebook
        files.append(
            File(
                f"notebooks/{nb.name}",
                src_dir=str(ROOT),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files


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
    '<div class="admonition note"><p class="admonition-title">Stored without outputs</p>'
    "<p>This page shows the notebook as committed: code and text, no results or figures. "
    '<a href="{name}">Download it</a> and run it with Jupyter (it needs the '
    "<code>examples</code> extra) to see them.</p></div>\n"
)


def _has_outputs(path: Path) -> bool:
    cells = json.loads(path.read_text("utf-8")).get("cells", [])
    return any(cell.get("outputs") for cell in cells)


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri.startswith("notebooks/") and page.file.src_uri.endswith(".ipynb"):
        tokens = _toc_tokens(html)
        page.toc = get_toc(tokens)
        if tokens and tokens[0]["level"] == 1:
            page.title = tokens[0]["name"]
        path = ROOT / page.file.src_uri
        if not _has_outputs(path):  # say so before the first cell, after the title
            note = _NO_OUTPUTS.format(name=path.name)
            m = re.search(r"</h1>", html)
            html = html[: m.end()] + note + html[m.end() :] if m else note + html
    return html
