"""The course website, built from the notebooks and checked in a real browser.

Builds the site with docs/site/build.py (from scratch; set IPA_LAB_SITE_REUSE=1 outside CI to reuse
build/site), serves it on 127.0.0.1, and drives headless Chromium (Debian's /usr/bin/chromium, via
Playwright for Python; no browser is downloaded) through every page it can reach from the landing
page(s). Needs the `site` extra. Without Chromium or Playwright it skips, except under CI=true,
where it fails. IPA_LAB_ZH_NOTEBOOKS=<folder> builds the Chinese book from another folder than
notebooks/zh-CN/ (to try it before the translation lands).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urldefrag, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "build" / "site"
SHOTS = ROOT / "build" / "site-screenshots"
CI = os.environ.get("CI", "").lower() == "true"
PAGE_TIMEOUT_MS = 30_000
MAX_PAGES = 400  # a bound on the crawl: the site has about 50 pages per language


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _need(ok: bool, why: str) -> None:
    if not ok:
        if CI:
            pytest.fail(f"{why} (CI must run the browser test; .ci/run installs it)")
        pytest.skip(why)


def _zh_dir() -> Path | None:
    env = os.environ.get("IPA_LAB_ZH_NOTEBOOKS")
    if env:
        return Path(env)
    default = ROOT / "notebooks" / "zh-CN"
    return default if any(default.glob("[0-9][0-9]_*.ipynb")) else None


def _lessons(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log in pytest's output
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the browser may drop a connection mid-file
        if not isinstance(sys.exc_info()[1], (ConnectionError, BrokenPipeError)):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def site():
    """Build the site (once per session), serve it, and yield the server's base URL."""
    _need(_chromium() is not None, "no Chromium at /usr/bin/chromium (apt-get install -y chromium fonts-noto-cjk)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need(False, "Playwright is not installed (pip install -e '.[site]')")
    reuse = os.environ.get("IPA_LAB_SITE_REUSE") == "1" and not CI and (SITE / "index.html").exists()
    if not reuse:
        cmd = [sys.executable, str(ROOT / "docs" / "site" / "build.py")]
        if os.environ.get("IPA_LAB_ZH_NOTEBOOKS"):
            cmd += ["--zh-notebooks", os.environ["IPA_LAB_ZH_NOTEBOOKS"]]
        t0 = time.time()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"site build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        print(f"site built in {time.time() - t0:.0f} s")
    server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(SITE)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# What the browser reports about a page, gathered in one evaluation after MathJax has finished.
_INSPECT = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const main = document.querySelector("main") || document.body;
  const prose = main.cloneNode(true);
  prose.querySelectorAll("pre, code, script, style, mjx-container, .MathJax").forEach(e => e.remove());
  return {
    title: document.title,
    lang: document.documentElement.lang,
    ids: Array.from(document.querySelectorAll("[id], a[name]")).map(e => e.id || e.getAttribute("name")),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
    math: document.querySelectorAll("mjx-container").length,
    prose: prose.innerText,
    exercises: main.querySelectorAll(".admonition.ipa-exercise").length,
    folded: Array.from(main.querySelectorAll(".tag_hide-input details summary")).map(s => s.innerText.trim()),
    run_box: (main.querySelector(".admonition.ipa-run") || {innerText: ""}).innerText,
    widget_notes: main.querySelectorAll(".ipa-widget-note").length,
    widget_boxes: document.querySelectorAll("script[type*='jupyter.widget'], .jupyter-widgets").length,
    tables: main.querySelectorAll("table").length,
    switch: Array.from(document.querySelectorAll("a.ipa-lang-switch")).map(a => a.href),
  };
}"""

_CJK_PROBE = """() => {
  const font = "32px " + getComputedStyle(document.body).fontFamily;
  const draw = (text) => {
    const c = document.createElement("canvas"); c.width = 80; c.height = 48;
    const g = c.getContext("2d"); g.font = font; g.fillStyle = "#000"; g.fillText(text, 4, 38);
    return {pixels: c.toDataURL(), width: g.measureText(text).width,
            ink: g.getImageData(0, 0, 80, 48).data.filter((v, i) => i % 4 === 3 && v > 0).length};
  };
  // U+10FFFD is a private-use code point that no font has a glyph for: it draws as the missing-glyph box.
  return {zhong: draw("中"), wen: draw("文"), none: draw(String.fromCodePoint(0x10FFFD))};
}"""


# Sphinx's search has finished: a result list, or its summary line ("found 0 page(s)").
SEARCH_DONE = "() => document.querySelectorAll('#search-results ul.search li a').length > 0 || !!document.querySelector('#search-results .search-summary')"


def _crawl(page, base: str, starts: list[str]) -> tuple[dict, dict, list[str]]:
    """Visit every page reachable from `starts`; return (report per page, status per file, problems)."""
    reports, files, problems = {}, {}, []
    console: list[str] = []
    page.on("console", lambda m: console.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: console.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: console.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    queue, seen = deque(starts), set(starts)
    while queue:
        url = queue.popleft()
        assert len(reports) < MAX_PAGES, "the crawl found more pages than the site should have"
        console.clear()
        response = page.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_MS)
        if response is None or response.status != 200:
            problems.append(f"{url}: HTTP {response.status if response else 'no response'}")
            continue
        report = page.evaluate(_INSPECT)
        page.wait_for_timeout(50)  # let late console messages arrive
        report["console"] = list(console)
        reports[url] = report
        for link in report["links"]:
            target, _ = urldefrag(link)
            if not target.startswith(base):
                continue  # outbound (the paper, nbgrader's docs): a plain link, not followed
            path = urlsplit(target).path
            if path.endswith((".html", "/")):
                clean = target.split("?")[0]
                if clean not in seen:
                    seen.add(clean)
                    queue.append(clean)
            elif target not in files:
                try:
                    with urllib.request.urlopen(target, timeout=10) as r:
                        files[target] = r.status
                except urllib.error.HTTPError as e:
                    files[target] = e.code
    return reports, files, problems


@pytest.fixture(scope="module")
def crawl(site):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    zh = _zh_dir()
    books = [""] + (["zh-CN/"] if zh else [])
    starts = [site + b + p for b in books for p in ("index.html", "search.html")]  # the search page has no link to it
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            reports, files, problems = _crawl(page, site, starts)
            SHOTS.mkdir(parents=True, exist_ok=True)
            shots = {"landing": site + "index.html", "lesson": site + "05_inference.html"}
            if zh:
                shots |= {"zh-landing": site + "zh-CN/index.html", "zh-lesson": site + "zh-CN/02_decoupled_cross_attention.html"}
            for name, url in shots.items():
                page.goto(url, wait_until="load")
                page.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }")
                page.screenshot(path=str(SHOTS / f"{name}.png"))
            search = {}
            queries = [("", "to_k_ip")] + ([("zh-CN/", "to_k_ip"), ("zh-CN/", "交叉注意力")] if zh else [])
            for book, query in queries:
                page.goto(site + book + "search.html?q=" + quote(query), wait_until="load")
                try:  # Sphinx's search runs in the page once its index has loaded
                    page.wait_for_function(SEARCH_DONE, timeout=PAGE_TIMEOUT_MS)
                except PlaywrightTimeout:
                    pass  # the test reports what the page shows
                search[(book, query)] = page.evaluate(
                    "() => ({hits: Array.from(document.querySelectorAll('#search-results ul.search li a')).map(a => a.href),"
                    " text: (document.querySelector('#search-results') || document.body).innerText.slice(0, 500)})"
                )
            cjk = None
            if zh:
                page.goto(site + "zh-CN/index.html", wait_until="load")
                cjk = page.evaluate(_CJK_PROBE)
        finally:
            browser.close()
    print(f"browser: {len(reports)} pages in {time.time() - t0:.0f} s")
    return {"base": site, "reports": reports, "files": files, "problems": problems, "search": search, "cjk": cjk, "zh": zh}


def _page(crawl, name: str) -> dict:
    return crawl["reports"][crawl["base"] + name]


def test_every_page_loads_without_console_errors(crawl):
    assert crawl["problems"] == []
    bad = {url: r["console"] for url, r in crawl["reports"].items() if r["console"]}
    assert bad == {}
    names = {u[len(crawl["base"]):] for u in crawl["reports"]}
    lessons = [nb.stem for nb in _lessons(ROOT / "notebooks")]
    expected = {"index.html", "teaching.html", "search.html", "source/index.html"} | {f"{n}.html" for n in lessons}
    if crawl["zh"]:
        expected |= {f"zh-CN/{n}" for n in expected}
    assert expected <= names, f"not reachable from the landing page: {sorted(expected - names)}"


def test_every_image_is_decoded(crawl):
    broken = [(url, i["src"]) for url, r in crawl["reports"].items() for i in r["images"] if not i["ok"]]
    assert broken == []


def test_every_figure_of_every_notebook_is_on_its_page(crawl):
    books = [("", ROOT / "notebooks")] + ([("zh-CN/", crawl["zh"])] if crawl["zh"] else [])
    for prefix, folder in books:
        for nb in _lessons(folder):
            cells = json.loads(nb.read_text())["cells"]
            pngs = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
            tables = sum(bool(re.search(r"^\|.*\|\s*\n\|[-:| ]+\|", "".join(c["source"]), re.M)) for c in cells if c["cell_type"] == "markdown")
            report = _page(crawl, f"{prefix}{nb.stem}.html")
            assert len(report["images"]) >= pngs > 0 or pngs == 0, nb.name
            assert report["tables"] >= tables, f"{nb.name}: {report['tables']} tables shown, {tables} in the notebook"


def test_math_is_rendered(crawl):
    raw = re.compile(r"\$\$|\\(?:frac|sqrt|mathrm|bar|prod|alpha)\b")
    leftovers = {url: raw.findall(r["prose"]) for url, r in crawl["reports"].items() if raw.search(r["prose"])}
    assert leftovers == {}
    prefixes = [""] + (["zh-CN/"] if crawl["zh"] else [])
    for prefix in prefixes:
        for name in ("02_decoupled_cross_attention.html", "04_training_loop.html"):
            assert _page(crawl, prefix + name)["math"] > 0, f"{prefix}{name}: no MathJax output"


def test_every_internal_link_and_anchor_resolves(crawl):
    base, reports = crawl["base"], crawl["reports"]
    missing = []
    for url, report in reports.items():
        for link in report["links"]:
            target, frag = urldefrag(link)
            if not target.startswith(base):
                continue
            target = target.split("?")[0]
            if target in reports:
                if frag and frag not in reports[target]["ids"]:
                    missing.append(f"{url} -> #{frag} (no such anchor in {target})")
            elif crawl["files"].get(target) != 200:
                missing.append(f"{url} -> {target} ({crawl['files'].get(target, 'not a page')})")
    assert missing == []


def test_search_finds_a_term_and_links_to_the_notebook_that_explains_it(crawl):
    """to_k_ip in each book, and a Chinese word (交叉注意力) in the Chinese one: Sphinx indexes no
    Chinese words without jieba; docs/site/_ext/ipa_search_zh.py does."""
    assert len(crawl["search"]) == (3 if crawl["zh"] else 1)
    for (book, query), found in crawl["search"].items():
        assert any(h.split("#")[0].split("?")[0] == crawl["base"] + f"{book}02_decoupled_cross_attention.html"
                   for h in found["hits"]), (book, query, found)


def test_lessons_show_how_to_run_them_and_mark_exercises(crawl):
    books = [("", ROOT / "notebooks")] + ([("zh-CN/", crawl["zh"])] if crawl["zh"] else [])
    for prefix, folder in books:
        for nb in _lessons(folder):
            report = _page(crawl, f"{prefix}{nb.stem}.html")
            assert f"notebooks/student/{nb.name}" in report["run_box"] or f"zh-CN/student/{nb.name}" in report["run_box"]
            assert "pip install" in report["run_box"] and "jupyter lab" in report["run_box"]
            solutions = sum("### BEGIN SOLUTION" in "".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
            assert report["exercises"] == solutions > 0, f"{nb.name}: {report['exercises']} marked, {solutions} exercises"
            assert len(report["folded"]) == solutions, f"{nb.name}: solutions not folded"
            assert report["widget_boxes"] == 0, f"{nb.name}: a widget that needs a kernel"
    assert _page(crawl, "05_inference.html")["widget_notes"] >= 1


def test_landing_and_teacher_pages(crawl):
    landing = _page(crawl, "index.html")
    readme = (ROOT / "README.md").read_text()
    assert "image only" in landing["prose"] and landing["tables"] >= 1
    for number in re.findall(r"\*\*(\d\.\d{3})\*\*", readme)[:2]:  # the README's image-only results
        assert number in landing["prose"]
    assert "nbgrader" in _page(crawl, "teaching.html")["prose"]
    if crawl["zh"]:  # the Chinese landing page quotes README.zh-CN.md's results, in Chinese
        zh = _page(crawl, "zh-CN/index.html")
        assert "仅图像" in zh["prose"] and "image only" not in zh["prose"] and zh["tables"] >= 1
        for number in re.findall(r"\*\*(\d\.\d{3})\*\*", readme)[:2]:
            assert number in zh["prose"]


def test_language_switch_on_every_page(crawl):
    if not crawl["zh"]:
        assert all(r["switch"] == [] for r in crawl["reports"].values())
        pytest.skip("no Chinese notebooks (notebooks/zh-CN/): one book, no language switch")
    base = crawl["base"]
    for url, report in crawl["reports"].items():
        if not url.endswith(".html") or url.endswith(("genindex.html",)):
            continue
        assert len(report["switch"]) == 1, f"{url}: no language switch"
        page = url[len(base):]
        other = page[len("zh-CN/"):] if page.startswith("zh-CN/") else "zh-CN/" + page
        if base + other not in crawl["reports"]:  # a page the other book lacks (a lesson not translated yet)
            other = "index.html" if page.startswith("zh-CN/") else "zh-CN/index.html"
        assert report["switch"][0].split("?")[0] == base + other
        assert report["lang"] == ("zh-CN" if page.startswith("zh-CN/") else "en")


def test_chinese_text_renders_with_a_cjk_font(crawl):
    if not crawl["zh"]:
        pytest.skip("no Chinese notebooks (notebooks/zh-CN/)")
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout
    assert fonts.strip(), "no CJK font installed (apt-get install fonts-noto-cjk)"
    probe = crawl["cjk"]
    assert probe["zhong"]["ink"] > 0 and probe["zhong"]["pixels"] != probe["none"]["pixels"]
    assert probe["zhong"]["pixels"] != probe["wen"]["pixels"], "two CJK characters draw alike: missing-glyph boxes"


def test_screenshots_are_not_blank(crawl):
    from PIL import Image, ImageStat

    names = ["landing", "lesson"] + (["zh-landing", "zh-lesson"] if crawl["zh"] else [])
    for name in names:
        with Image.open(SHOTS / f"{name}.png") as shot:
            grey = shot.convert("L")
            assert shot.size == (1280, 900)
            assert ImageStat.Stat(grey).stddev[0] > 10, f"{name}.png is nearly uniform"
            assert len(grey.getcolors(256 * 256) or range(257)) > 16, f"{name}.png has almost no detail"
