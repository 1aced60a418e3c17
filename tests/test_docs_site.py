"""The built docs site, checked in a real browser: headless Chromium on 127.0.0.1.

The site is built with ``mkdocs build --strict`` (the notebooks executed, as every build
does: ``docs/hooks.py``), or taken from ``JAXBN_DOCS_SITE`` (a built site's folder,
which ``.ci/run`` passes), and served on 127.0.0.1 by Python's ``http.server``. Three
pages are loaded in Debian's ``chromium``, driven by playwright: the home page, a
notebook page with figures and an API page. Each fails the test if the page raises a
JavaScript error, logs a console error, a request fails or answers 4xx/5xx, an image
does not load (``naturalWidth == 0``), or a link of the page to the site does not
resolve (the page is missing, or the ``#anchor`` is not an ``id`` in it). A full-page
screenshot of each is saved to ``build/docs-screenshots/`` (or ``JAXBN_DOCS_SCREENSHOTS``)
for a person to open, and one of the notebook's first figure in its page.

Skips, saying why, where chromium, playwright or mkdocs is missing, unless
``JAXBN_DOCS_SITE`` is set: then a missing browser fails the test (CI must run it).
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(os.environ.get("JAXBN_DOCS_SCREENSHOTS", ROOT / "build" / "docs-screenshots"))
BUILD_TIMEOUT_S = 1200  # the notebooks run in the build: 2-3 minutes on 2 cores, uncached
PAGES = {  # name -> (path in the site, a text the page must show)
    "home": ("index.html", "Batch normalization for JAX"),
    "notebook": ("notebooks/01_from_notes_to_custom_vjp.html", "custom_vjp"),
    "api": ("api/index.html", "jaxbn.batch_norm"),
}

GIVEN = os.environ.get("JAXBN_DOCS_SITE")  # a site to check: then nothing may be missing

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None and not GIVEN,
        reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)",
    ),
    pytest.mark.skipif(not (ROOT / "docs").is_dir(), reason="no docs/ in this tree (an sdist)"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if GIVEN:
        path = Path(GIVEN).resolve()
        assert (path / "index.html").is_file(), f"JAXBN_DOCS_SITE={GIVEN} holds no built site"
        return path
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    env.pop("JAXBN_DOCS_EXECUTE", None)  # the figures are what is checked
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def base_url(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reports failures itself
        pass


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "JAXBN_DOCS_SITE is set, but there is no chromium on PATH"
    try:
        from playwright import sync_api
    except ImportError:
        if GIVEN:
            pytest.fail("JAXBN_DOCS_SITE is set, but playwright (the docs extra) is missing")
        pytest.skip("no playwright (the docs extra)")
    with sync_api.sync_playwright() as p:
        # the system's chromium, not a downloaded one; as root it needs --no-sandbox
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class _Ids(html.parser.HTMLParser):
    """The ``id`` (and ``name``) attributes of a page, where a ``#fragment`` may land."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


@functools.cache
def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read()
            kind = r.headers.get("Content-Type", "")
            return r.status, body.decode("utf-8", "replace") if "html" in kind else ""
    except urllib.error.HTTPError as err:
        return err.code, ""


def broken_links(base: str, hrefs: list[str]) -> list[str]:
    """The links among ``hrefs`` (absolute URLs) into the site at ``base`` that do not resolve."""
    bad = []
    for href in sorted(set(hrefs)):
        if not href.startswith(base):
            continue  # another site, or mailto:: not this site's to keep
        url, _, fragment = href.partition("#")
        status, body = _fetch(url)
        if status != 200:
            bad.append(f"{href}: HTTP {status}")
            continue
        if fragment and body:
            parser = _Ids()
            parser.feed(body)
            if urllib.parse.unquote(fragment) not in parser.ids:
                bad.append(f"{href}: no id {fragment!r} in the page")
    return bad


@pytest.mark.parametrize("name", list(PAGES))
def test_page_loads_in_chromium(name, base_url, browser):
    path, text = PAGES[name]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"page error: {err}"))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
        ),
    )
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url} {req.failure}"))
    page.on(
        "response",
        lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None,
    )
    response = page.goto(base_url + path, wait_until="load")
    assert response is not None and response.status == 200, (
        f"{path}: {response and response.status}"
    )
    page.wait_for_load_state("networkidle")
    problems = list(errors)  # everything wrong with the page, reported together
    if text not in page.inner_text("body"):
        problems.append(f"the page does not show {text!r}")

    # every image loaded: the notebook's figures are data: URIs, the rest files
    page.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=30_000)
    images = page.evaluate(
        "[...document.images].map(i => ({src: i.src.slice(0, 60), w: i.naturalWidth}))"
    )
    problems += [f"image did not load: {i['src']}" for i in images if i["w"] == 0]
    figures = [i for i in images if i["src"].startswith("data:image/png") and i["w"] > 0]
    if name == "notebook" and not figures:
        problems.append("no figure (were the notebooks executed?)")
    if name == "api" and page.locator("[id='jaxbn.batch_norm']").count() != 1:
        problems.append("no jaxbn.batch_norm entry")

    hrefs = page.evaluate("[...document.querySelectorAll('a[href]')].map(a => a.href)")
    problems += [f"broken internal link: {b}" for b in broken_links(base_url, hrefs)]

    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if figures:
        figure = page.locator("img[src^='data:image/png']").first
        figure.scroll_into_view_if_needed()  # the first figure, in the page around it
        page.screenshot(path=str(SHOTS / f"{name}-figure.png"))
    page.close()
    assert not problems, f"{path} (screenshot: {SHOTS / name}.png):\n" + "\n".join(problems)


def test_every_notebook_page_shows_figures(site):
    """The browser loads one notebook page; the others are checked for figures here."""
    pages = sorted((site / "notebooks").glob("[0-9]*.html"))
    assert len(pages) == len(list((ROOT / "notebooks").glob("*.ipynb")))
    for page in pages:
        count = len(re.findall(r'<img[^>]+src="data:image/png', page.read_text("utf-8")))
        assert count, f"{page.name} shows no figure"
