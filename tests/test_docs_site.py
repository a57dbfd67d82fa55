"""The documentation site builds and works in a real browser.

The site is built exactly as README.md says (``python -m sphinx -W --keep-going -b html
docs OUT``: every warning an error, every cross-reference resolved), into a temporary
folder; this is also CI's build of the docs. Then:

* the built HTML has no link to a missing page or a missing ``#fragment``;
* every public function and class of ``jaxmetric.losses``, ``jaxmetric.distances``,
  ``jaxmetric.mining``, ``jaxmetric.evaluate`` and ``jaxmetric.search`` (and of their
  modules) is documented on a page, and the command-line page has every
  :class:`~jaxmetric.train.config.TrainConfig` flag;
* headless Chromium, driven over the DevTools protocol on a pipe, opens the site from a
  local HTTP server: the front page, a loss page and an API page load without a script
  error, their math is typeset by MathJax (``mjx-container`` elements, no raw TeX left),
  the pictures are loaded (``naturalWidth > 0``), MathJax came from the site itself (no
  request leaves it), and the search page finds ``triplet_loss``.

The build needs Sphinx and the ``docs`` extra, the browser checks Chromium; each part
skips, saying which is missing, only when it is not installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import html.parser
import http.server
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import pkgutil
import posixpath
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
DOCS_PACKAGES = ("sphinx", "myst_parser", "sphinx_book_theme", "sphinx-mathjax-offline")
API_PACKAGES = ("jaxmetric.losses", "jaxmetric.distances", "jaxmetric.mining",
                "jaxmetric.evaluate", "jaxmetric.search")


def _missing_docs_packages() -> list[str]:
    return [name for name in DOCS_PACKAGES if importlib.util.find_spec(name) is None]


def chromium() -> str | None:
    """Debian's Chromium (``apt-get install chromium``), or another build on the PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# ------------------------------------------------------------------------- the build


def build_site(out: pathlib.Path) -> None:
    """Build the site into ``out`` as README.md says (and in parallel)."""
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
               "-d", str(out.parent / "doctrees"), "-j", "auto", "-q", "docs", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (
        "the documentation does not build without warnings:\n"
        + done.stdout[-4000:] + done.stderr[-8000:])


def check_pages(site: pathlib.Path) -> None:
    """Every Markdown page under docs/ became a page, beside the search page, the index
    and the API reference; MathJax is served by the site itself."""
    for source in sorted(DOCS.rglob("*.md")):
        page = source.relative_to(DOCS)
        if not page.parts[0].startswith("_"):
            assert (site / page.with_suffix(".html")).is_file(), page
    for page in ("search.html", "genindex.html", "_autosummary/jaxmetric.html",
                 "_autosummary/jaxmetric.losses.html"):
        assert (site / page).is_file(), page
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax not served"


# -------------------------------------------------------------------------- the HTML


class _Page(html.parser.HTMLParser):
    """The ids, the links and the text of one HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for key in ("href", "src"):
            if attrs.get(key) and not (tag == "link" and "preload" in (attrs.get("rel") or "")):
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def read_site(root: pathlib.Path) -> dict[str, _Page]:
    """``{path relative to root: parsed page}`` of every HTML page of a built site."""
    pages = {}
    for path in sorted(root.rglob("*.html")):
        if path.relative_to(root).parts[0] in ("_static", "_sources", "_downloads"):
            continue  # the theme's templates and the copied files, not pages
        parser = _Page()
        parser.feed(path.read_text(encoding="utf-8"))
        pages[path.relative_to(root).as_posix()] = parser
    return pages


def broken_links(root: pathlib.Path, pages: dict[str, _Page] | None = None) -> list[str]:
    """``"page -> target"`` for each link or source of a page of ``root`` to a file that
    does not exist, or to a ``#fragment`` that the linked page does not have."""
    pages = read_site(root) if pages is None else pages
    bad = []
    for name, page in pages.items():
        for link in page.links:
            parts = urllib.parse.urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:")):
                continue
            target = name if not parts.path else posixpath.normpath(
                posixpath.join(posixpath.dirname(name), urllib.parse.unquote(parts.path)))
            if target.endswith("/"):
                target += "index.html"
            if target.startswith("../") or not (root / target).exists():
                bad.append(f"{name} -> {link}")
            elif parts.fragment and target in pages and \
                    urllib.parse.unquote(parts.fragment) not in pages[target].ids:
                bad.append(f"{name} -> {link}")
    return bad


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="sub/page.html#here">ok</a> <a href="https://example.org/">web</a>'
        '<a href="#top">self</a><h1 id="top">x</h1><img src="sub/missing.png">'
        '<a href="sub/page.html#nowhere">bad anchor</a> <a href="gone.html">gone</a>')
    (tmp_path / "sub" / "page.html").write_text(
        '<p id="here"></p><a href="../index.html#top">up</a><a href="../../out.html">out</a>')
    assert broken_links(tmp_path) == [
        "index.html -> sub/missing.png", "index.html -> sub/page.html#nowhere",
        "index.html -> gone.html", "sub/page.html -> ../../out.html"]




def public_names(module) -> list[str]:
    """A module's ``__all__``, else the public names it defines."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]


def check_api_pages(site: pathlib.Path) -> None:
    """Every public function and class of the core packages and of each of their
    modules has its entry on a page: an element whose id is the full name of where it
    is defined (a package's re-export is documented in its defining module)."""
    ids = set().union(*(page.ids for page in read_site(site / "_autosummary").values()))
    missing, checked = [], 0
    for package in API_PACKAGES:
        modules = [package] + [
            info.name for info in pkgutil.walk_packages(
                getattr(importlib.import_module(package), "__path__", []), package + ".")
            if not any(part.startswith("_") for part in info.name.split("."))]
        for module_name in modules:
            module = importlib.import_module(module_name)
            for name in public_names(module):
                obj = getattr(module, name, None)
                if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                checked += 1
                if f"{obj.__module__}.{obj.__qualname__}" not in ids:
                    missing.append(f"{module_name}.{name}")
    assert missing == [], "public functions or classes without an API entry"
    assert checked >= 60, checked
    for name in ("jaxmetric.losses.triplet.triplet_loss", "jaxmetric.distances.l2_normalize",
                 "jaxmetric.mining.mine", "jaxmetric.evaluate.protocols.retrieval_metrics",
                 "jaxmetric.search.index.Index"):
        assert name in ids, name


def check_flags_table(site: pathlib.Path) -> None:
    import dataclasses

    from jaxmetric.train import flags
    from jaxmetric.train.config import TrainConfig

    text = " ".join(read_site(site)["command-line.html"].text)
    for field in dataclasses.fields(TrainConfig):
        flag = field.metadata.get("flag", flags.flag_name(field.name))
        assert flag in text, flag
        assert field.metadata["help"].split(";")[0][:40] in text, field.name


# ------------------------------------------------- the site's Sphinx extension, alone


@pytest.fixture(scope="module")
def docs_ext():
    """docs/_ext/jaxmetric_docs.py, the extension the site's conf.py loads."""
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        return importlib.import_module("jaxmetric_docs")
    except ImportError as error:  # it needs Sphinx (docutils)
        pytest.skip(f"the docs extra is not installed ({error.name})")
    finally:
        sys.path.remove(str(DOCS / "_ext"))


def test_references_become_a_list_only_when_they_hang(docs_ext):
    hanging = ["Text.", "", "References:", "  Wah et al. 2011.", "  Song et al. Deep",
               "    Embedding. CVPR 2016.", "", "Raises:", "  ValueError: never."]
    docs_ext.references_as_list(hanging)
    assert hanging[2:6] == ["References:", "  - Wah et al. 2011.", "  - Song et al. Deep",
                            "    Embedding. CVPR 2016."]
    assert hanging[-2:] == ["Raises:", "  ValueError: never."]
    one = ["References:", "  A. Kak, C. Bouman, lecture slides; each", "  module names more."]
    docs_ext.references_as_list(one)
    assert one == ["References:", "  A. Kak, C. Bouman, lecture slides; each",
                   "  module names more."]


def test_imported_names_lead_to_where_they_are_defined(docs_ext):
    aliases = docs_ext.name_aliases("jaxmetric")
    resolve = docs_ext.resolve_alias
    assert resolve("jaxmetric.losses.triplet_loss", aliases) == \
        "jaxmetric.losses.triplet.triplet_loss"
    assert resolve("jaxmetric.triplet_loss", aliases) == "jaxmetric.losses.triplet.triplet_loss"
    assert resolve("jaxmetric.train.flags.TrainConfig.peak_lr", aliases) == \
        "jaxmetric.train.config.TrainConfig.peak_lr"
    assert resolve("jaxmetric.losses.no_such_loss", aliases) == "jaxmetric.losses.no_such_loss"
    exported = docs_ext.reexported("jaxmetric")["jaxmetric.losses"]
    assert "jaxmetric.losses.triplet.triplet_loss" in exported
    assert "jaxmetric.losses.triplet.MINING_MODES" in exported


def test_the_flags_rows_are_the_parsers(docs_ext):
    import dataclasses

    from experiments import cifar10
    from jaxmetric.train.config import TrainConfig

    groups = dict(docs_ext.flag_rows(cifar10.build_parser()))
    training = next(rows for title, rows in groups.items() if title.startswith("training"))
    flags = {row[0] for row in training}
    for field in dataclasses.fields(TrainConfig):
        assert any(f"--{field.name.replace('_', '-')}" in f for f in flags), field.name
    loss = next(row for row in training if row[0] == "--loss")
    assert "triplet" in loss[1] and "required" in loss[2]
    assert not any("--help" in row[0] for rows in groups.values() for row in rows)


# ----------------------------------------------------------------------- the browser


def _above_4(fd: int) -> int:
    """``fd`` moved to a number above 4 (so that 3 and 4 are free for Chromium's)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (its file
    descriptors 3 and 4): the standard library is all it needs."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-extensions",
             "--disable-dev-shm-usage", "--remote-debugging-pipe")

    def __init__(self, executable: str, profile: pathlib.Path):
        to_chrome_r, self._to_chrome = map(_above_4, os.pipe())
        self._from_chrome, from_chrome_w = map(_above_4, os.pipe())
        self._log = open(profile / "chromium.log", "wb")  # closed in close()
        # bash (dash takes no descriptor above 9) puts the pipe's ends on the descriptors
        # 3 and 4 that Chromium reads and writes.
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} '
             f"{to_chrome_r}<&- {from_chrome_w}>&-",
             executable, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            pass_fds=(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._profile = profile
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Network.enable"):
            self.call(domain, session=True)

    def _send(self, message: dict) -> None:
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                log = (self._profile / "chromium.log").read_bytes().decode(errors="replace")
                raise RuntimeError("Chromium closed the pipe: " + log[-2000:])
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, *, session: bool = False, timeout: float = 60, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def evaluate(self, expression: str, timeout: float = 60):
        result = self.call("Runtime.evaluate", session=True, timeout=timeout,
                           expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, timeout: float = 60) -> None:
        """Load ``url`` and wait for its load event."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive(deadline))

    def wait_for(self, condition: str, timeout: float = 60):
        """Poll the page until the JavaScript expression ``condition`` is truthy."""
        return self.evaluate(
            "new Promise((done, fail) => { const t0 = Date.now(); (function poll() {"
            f" let v; try {{ v = ({condition}); }} catch (e) {{ v = null; }}"
            f" if (v) done(v); else if (Date.now() - t0 > {int(timeout * 1000)})"
            " fail(new Error('timed out')); else setTimeout(poll, 100); })(); })",
            timeout=timeout + 10)

    def exceptions(self) -> list[str]:
        return [e["params"]["exceptionDetails"].get("text", "") + " "
                + str(e["params"]["exceptionDetails"].get("exception", {}).get("description"))
                for e in self.events if e.get("method") == "Runtime.exceptionThrown"]

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def served(site: pathlib.Path):
    """The built site on a local HTTP server (127.0.0.1, a free port)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def browser(executable: str):
    with tempfile.TemporaryDirectory(prefix="jaxmetric-chromium-") as profile:
        b = Browser(executable, pathlib.Path(profile))
        try:
            yield b
        finally:
            b.close()


MATH_DONE = ("window.MathJax && MathJax.startup && MathJax.startup.promise"
             " && MathJax.startup.promise.then(() => true)")


def _math_page(browser, url: str) -> dict:
    browser.open(url)
    assert browser.wait_for(MATH_DONE) is True, f"MathJax did not typeset {url}"
    return browser.evaluate(
        "({math: document.querySelectorAll('mjx-container').length,"
        " raw: ['\\\\frac', '\\\\sum', '\\\\log', '\\\\begin', '\\\\[', '\\\\(']"
        ".filter(t => document.body.innerText.includes(t)),"
        " errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,"
        " title: document.title})")


def check_math(browser: Browser, url: str) -> None:
    browser.open(f"{url}/index.html")
    assert "jaxmetric" in browser.evaluate("document.title")
    assert browser.exceptions() == []
    for page in ("losses.html", "_autosummary/jaxmetric.losses.triplet.html"):
        shown = _math_page(browser, f"{url}/{page}")
        assert shown["math"] >= 3, (page, shown)
        assert shown["raw"] == [] and shown["errors"] == 0, (page, shown)
        assert browser.exceptions() == [], page
        outside = [u for u in browser.requested() if not u.startswith((url, "data:", "blob:"))]
        assert outside == [], f"{page} fetched from outside the site: {outside}"
        assert any("/_static/mathjax/" in u for u in browser.requested()), page


def check_pictures(browser: Browser, url: str) -> None:
    for page in ("getting-started.html", "search-and-verification.html", "training.html"):
        browser.open(f"{url}/{page}")
        images = browser.wait_for(
            "Array.from(document.querySelectorAll('article img, main img'))"
            ".every(i => i.complete) && Array.from(document.querySelectorAll("
            "'article img, main img')).map(i => [i.getAttribute('src'), i.naturalWidth])")
        assert images, f"{page} shows no picture"
        assert all(width > 0 for _, width in images), (page, images)


def check_search(browser: Browser, url: str) -> None:
    browser.open(f"{url}/search.html?q=triplet_loss")
    hits = browser.wait_for(
        "document.querySelectorAll('#search-results li').length &&"
        " Array.from(document.querySelectorAll('#search-results li a'))"
        ".map(a => a.textContent + ' ' + a.getAttribute('href'))", timeout=60)
    assert any("triplet_loss" in hit for hit in hits), hits


# --------------------------------------------------------------------- the one test


def test_the_documentation_site(tmp_path):
    """Build once (one test, so that parallel workers never build twice into the same
    docs/_autosummary), check the HTML, then the pages in Chromium."""
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)}): "
                    'pip install -e ".[docs]"')
    site = tmp_path / "html"
    build_site(site)
    check_pages(site)
    bad = broken_links(site)
    assert bad == [], f"{len(bad)} links to missing pages or anchors: {bad[:20]}"
    check_api_pages(site)
    check_flags_table(site)
    executable = chromium()
    if executable is None:
        pytest.skip("built and checked; the browser checks need Chromium "
                    "(Debian: apt-get install chromium)")
    with served(site) as url, browser(executable) as chrome:
        check_math(chrome, url)
        check_pictures(chrome, url)
        check_search(chrome, url)
