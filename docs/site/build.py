"""Build the course website from the notebooks and their stored outputs (nothing is re-executed).

    .venv/bin/python docs/site/build.py            # -> build/site/index.html (and build/site/zh-CN/)

Needs the `site` extra (`pip install -e ".[site]"`): Jupyter Book 1.x (Sphinx, myst-nb,
sphinx-book-theme) and sphinx-mathjax-offline, which serves MathJax from the site itself, so the
build and the site work without a network.

How it works. Each language is its own book. For each one this script writes a staging copy,
build/site-src/<lang>/, and builds it with Sphinx into build/site/ (English) or build/site/zh-CN/
(Chinese, built only when notebooks/zh-CN/ exists). Only the copies are changed, never the
committed notebooks:

- each lesson gets a "run it yourself" box after its title (the README's start and test commands,
  the student copy's path);
- each exercise cell (one with `### BEGIN SOLUTION`) gets an "Exercise" box, and its code is folded
  behind "Show the solution"; nbgrader's grading cells are left out;
- outputs that need a kernel (ipywidgets) become a note;
- relative links to repository files are rewritten: notebooks, docs and the package's sources have
  pages on the site (every ipa_lab/**.py is a page under source/); links to the other language's
  book become plain links into it; a link to a file that has no page keeps its text, as code.

The configuration is docs/site/_config.yml and _toc.yml (shared by both books; the Chinese one gets
`language: zh_CN` and translated captions), the landing pages index.md / index.zh-CN.md, and
docs/site/_static/ (style, favicon, the language switch). tests/test_site.py drives the result in
headless Chromium.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LANGS = ("en", "zh-CN")
OTHER = {"en": "zh-CN", "zh-CN": "en"}
# Where each book's root lies, relative to build/site/.
BOOK_DIR = {"en": "", "zh-CN": "zh-CN/"}

TEXT = {
    "en": {
        "run_title": "Run this lesson yourself",
        "run_body": (
            "This page is `{nb}` with its stored outputs. To run it on your machine (Python 3.11 and pip;"
            " no GPU, no downloads), install the course and open the notebooks:"
        ),
        "run_student": (
            "To do the exercises yourself, open the student copy **`{student}`**: there each solution is"
            " `raise NotImplementedError`, and the cell after each exercise checks your answer."
            " Every test (the unit tests, then every notebook re-run and compared with its stored outputs):"
        ),
        "ex_title": "Exercise: `{gid}`",
        "ex_body": (
            "Try it first in the student copy `{student}`, where this cell's solution is"
            " `raise NotImplementedError(\"your code here\")`. The solution is folded below; its output is"
            " the checker's verdict."
        ),
        "show": "Show the solution",
        "hide": "Hide the solution",
        "widget": (
            "<div class=\"admonition note ipa-widget-note\"><p class=\"admonition-title\">Interactive widget</p>"
            "<p>This cell shows an interactive control (an ipywidgets slider), which needs a running Python"
            " kernel and so cannot work on this website. Run the notebook to use it; the static figure before"
            " it shows the same thing for fixed values.</p></div>"
        ),
        "source_title": "Source: `{path}`",
        "source_body": "The file `{path}` of the `ipa_lab` package, as the course ships it.",
    },
    "zh-CN": {
        "run_title": "自己运行这一课",
        "run_body": (
            "本页是 `{nb}` 及其保存的输出。在自己的电脑上运行（需要 Python 3.11 和 pip；不需要 GPU，"
            "不需要下载任何东西），先安装课程，再打开笔记本："
        ),
        "run_student": (
            "自己做练习：打开学生版 **`{student}`**{student_note}，其中每个答案都是 `raise NotImplementedError`，"
            "每个练习后面的单元格会检查你的答案。运行全部测试（单元测试，然后重新运行每个笔记本并与保存的输出比较）："
        ),
        "ex_title": "练习：`{gid}`",
        "ex_body": (
            "请先在学生版 `{student}`{student_note}中自己完成：那里这个单元格的答案是"
            " `raise NotImplementedError(\"your code here\")`。参考答案折叠在下面；它的输出是检查器的结论。"
        ),
        "show": "显示参考答案",
        "hide": "隐藏参考答案",
        "widget": (
            "<div class=\"admonition note ipa-widget-note\"><p class=\"admonition-title\">交互控件</p>"
            "<p>这个单元格显示一个交互控件（ipywidgets 滑块），它需要正在运行的 Python 内核，所以在网站上无法使用。"
            "运行笔记本即可操作它；它前面的静态图展示了固定取值下的同样内容。</p></div>"
        ),
        "source_title": "源代码：`{path}`",
        "source_body": "课程附带的 `ipa_lab` 包中的文件 `{path}`。",
    },
}
# The Chinese book's captions in the navigation (the English ones are _toc.yml's).
CAPTIONS_ZH = {"Lessons": "课程", "For teachers": "给教师", "The package's source": "源代码"}


# --- what lives where -------------------------------------------------------------------------

def readme_commands() -> tuple[str, str]:
    """The README's start and test commands, verbatim (tests/test_repo.py reads them the same way)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    cmds = [b.strip() for b in blocks if "python3.11 -m venv .venv" in b]
    return next(c for c in cmds if "jupyter lab" in c), next(c for c in cmds if "pytest" in c)


RESULTS = {"en": ("README.md", "## What you will see it do"), "zh-CN": ("README.zh-CN.md", "## 你会看到它做到什么")}


def readme_results(lang: str = "en") -> str:
    """The README's measured results (its first table and the paragraph after it), not retyped;
    for the Chinese book, README.zh-CN.md's."""
    name, heading = RESULTS[lang]
    text = (ROOT / name).read_text(encoding="utf-8")
    section = re.search(rf"^{re.escape(heading)}.*?$(.*?)^## ", text, re.S | re.M)
    if not section:
        raise SystemExit(f"build.py: {name} has no '{heading}' section to quote")
    table = re.search(r"(^\|.*?\n)(?!\|)(.*?)\n\n", section.group(1), re.S | re.M)
    if not table:
        raise SystemExit(f"build.py: {name}'s results section has no table")
    return table.group(1) + "\n" + table.group(2).strip() + "\n"


def notebook_dir(lang: str, zh_dir: Path | None) -> Path:
    return ROOT / "notebooks" if lang == "en" else (zh_dir or ROOT / "notebooks" / "zh-CN")


def lessons(lang: str, zh_dir: Path | None) -> list[Path]:
    return sorted(notebook_dir(lang, zh_dir).glob("[0-9][0-9]_*.ipynb"))


def doc_pages(lang: str) -> dict[str, Path]:
    """Site page name -> the markdown file it is made from (a translation where there is one)."""
    pages = {}
    for name in ("teaching", "benchmarks", "glossary"):
        src = ROOT / "docs" / f"{name}.md"
        if lang != "en" and (ROOT / "docs" / lang / f"{name}.md").exists():
            src = ROOT / "docs" / lang / f"{name}.md"
        if src.exists():
            pages[name] = src
    return pages


def source_files() -> list[Path]:
    return sorted(p for p in (ROOT / "ipa_lab").rglob("*.py") if "__pycache__" not in p.parts) + [
        p for p in [ROOT / "docs" / "contention.sh"] if p.exists()
    ]


def source_page(path: Path) -> str:
    """ipa_lab/checks/core.py -> source/ipa_lab.checks.core (one flat folder, named like modules)."""
    rel = path.relative_to(ROOT)
    if rel.suffix == ".py":
        return "source/" + ".".join(rel.with_suffix("").parts)
    return "source/" + rel.name


# --- links --------------------------------------------------------------------------------------

class Links:
    """Rewrites a markdown text's relative links (written for the repository) for one book."""

    LINK = re.compile(r"(?<!!)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^()\s]+)\)")

    def __init__(self, lang: str, langs: list[str], zh_dir: Path | None):
        self.lang, self.langs = lang, langs
        self.pages: dict[str, tuple[str, str]] = {}  # repository path -> (book, page name)
        for book in langs:
            for nb in lessons(book, zh_dir):
                repo = "notebooks/" + ("" if book == "en" else "zh-CN/") + nb.name
                self.pages[repo] = (book, nb.stem)
        for page, src in doc_pages(lang).items():
            self.pages[src.relative_to(ROOT).as_posix()] = (lang, page)
            self.pages[f"docs/{page}.md"] = (lang, page)
        for src in source_files():
            self.pages[src.relative_to(ROOT).as_posix()] = (lang, source_page(src))
        self.pages["README.md"] = ("en", "index")
        if "zh-CN" in langs:
            self.pages["README.zh-CN.md"] = ("zh-CN", "index")
        else:  # no Chinese book: its links land on the English pages
            for repo, (book, page) in list(self.pages.items()):
                if repo.startswith("notebooks/") and book == "en":
                    self.pages[repo.replace("notebooks/", "notebooks/zh-CN/")] = ("en", page)

    def rewrite(self, text: str, repo_file: str, page: str) -> str:
        """`repo_file`: where the text lives in the repository; `page`: its page name on the site."""
        base = Path(repo_file).parent

        def one(m: re.Match) -> str:
            label, url = m.group(1), m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I) or url.startswith("#"):
                return m.group(0)  # outbound (paper, original repository) or on this page: as written
            path, _, anchor = url.partition("#")
            target = os.path.normpath(base / path).replace(os.sep, "/")
            if target not in self.pages:
                # no page on the site (e.g. CONTRIBUTING.md, a data folder): keep the words, drop the link
                if label.strip("`") in (path, Path(path).name, target):
                    return f"`{label.strip('`')}`"
                return f"{label} (`{target}`)"
            book, dest = self.pages[target]
            frag = "#" + anchor if anchor else ""
            up = "../" * page.count("/")
            if book == self.lang:  # a document of this book: Sphinx resolves it
                suffix = ".ipynb" if target.endswith(".ipynb") else ".md"
                return f"[{label}]({up}{dest}{suffix}{frag})"
            # the other book: a plain link between the two built sites
            to_root = up + ("../" if self.lang != "en" else "")
            href = f"{to_root}{BOOK_DIR[book]}{dest}.html{frag}"
            return f'<a href="{href}">{_inline_html(label)}</a>'

        return self.LINK.sub(one, text)


def _inline_html(label: str) -> str:
    """Enough markdown for a link label inside raw HTML: `code` and **bold**."""
    label = label.replace("&", "&amp;").replace("<", "&lt;")
    label = re.sub(r"`([^`]+)`", r"<code>\1</code>", label)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", label)


# --- staging ------------------------------------------------------------------------------------

def _md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def run_box(lang: str, nb: Path, start: str, test: str) -> str:
    t = TEXT[lang]
    rel = nb.relative_to(ROOT).as_posix() if nb.is_relative_to(ROOT) else f"notebooks/{lang}/{nb.name}"
    student = student_copy(lang, nb)
    return (
        f":::{{admonition}} {t['run_title']}\n:class: tip ipa-run\n\n"
        f"{t['run_body'].format(nb=rel)}\n\n```bash\n{start}\n```\n\n"
        f"{t['run_student'].format(student=student, student_note=student_note(lang, student))}\n\n```bash\n{test}\n```\n:::\n"
    )


def student_note(lang: str, student: str) -> str:
    """The Chinese book points to the English student copy while there is no Chinese one: say so."""
    return "（英文版）" if lang != "en" and not student.startswith(f"notebooks/{lang}/") else ""


def student_copy(lang: str, nb: Path) -> str:
    own = ROOT / "notebooks" / lang / "student" / nb.name
    return own.relative_to(ROOT).as_posix() if lang != "en" and own.exists() else f"notebooks/student/{nb.name}"


def stage_notebook(src: Path, dst: Path, lang: str, links: Links, start: str, test: str) -> None:
    t = TEXT[lang]
    nb = json.loads(src.read_text())
    repo_file = src.relative_to(ROOT).as_posix() if src.is_relative_to(ROOT) else f"notebooks/{lang}/{src.name}"
    cells = []
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        meta = cell.setdefault("metadata", {})
        if meta.get("nbgrader", {}).get("grade") and meta["nbgrader"].get("locked"):
            continue  # nbgrader's grading cell: for the teacher's autograder, not for reading
        if cell["cell_type"] == "markdown":
            cell["source"] = links.rewrite(source, repo_file, src.stem)
        elif "### BEGIN SOLUTION" in source:
            gid = meta.get("nbgrader", {}).get("grade_id", "exercise")
            cells.append(_md(
                f":::{{admonition}} {t['ex_title'].format(gid=gid)}\n:class: important ipa-exercise\n\n"
                f"{t['ex_body'].format(student=student_copy(lang, src), student_note=student_note(lang, student_copy(lang, src)))}\n:::\n"
            ))
            meta["tags"] = sorted(set(meta.get("tags", [])) | {"hide-input"})
            meta["mystnb"] = {"code_prompt_show": t["show"], "code_prompt_hide": t["hide"]}
        for out in cell.get("outputs", []):
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                out["data"] = {"text/html": t["widget"]}
        cells.append(cell)
        if i == 0:
            cells.append(_md(run_box(lang, src, start, test)))
    nb["cells"] = cells
    nb["metadata"].pop("widgets", None)
    dst.write_text(json.dumps(nb, ensure_ascii=False, indent=1))


def stage(lang: str, langs: list[str], src_root: Path, zh_dir: Path | None) -> None:
    shutil.rmtree(src_root, ignore_errors=True)
    (src_root / "source").mkdir(parents=True)
    start, test = readme_commands()
    links = Links(lang, langs, zh_dir)
    t = TEXT[lang]

    for nb in lessons(lang, zh_dir):
        stage_notebook(nb, src_root / nb.name, lang, links, start, test)

    for page, src in doc_pages(lang).items():
        text = links.rewrite(src.read_text(), src.relative_to(ROOT).as_posix(), page)
        (src_root / f"{page}.md").write_text(text)

    listing = []
    for src in source_files():
        rel = src.relative_to(ROOT).as_posix()
        code = src.read_text()
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", code)), default=0))
        lexer = "python" if src.suffix == ".py" else "bash"
        page = source_page(src)
        (src_root / f"{page}.md").write_text(
            f"# {t['source_title'].format(path=rel)}\n\n{t['source_body'].format(path=rel)}\n\n"
            f"{fence}{lexer}\n{code}{fence}\n"
        )
        listing.append(f"- [`{rel}`]({page.split('/', 1)[1]}.md)")
    title = {"en": "The package's source", "zh-CN": "ipa_lab 包的源代码"}[lang]
    intro = {
        "en": "Every module of `ipa_lab`, one page each. The README's table says which concept each holds.",
        "zh-CN": "`ipa_lab` 的每个模块各占一页。",
    }[lang]
    (src_root / "source" / "index.md").write_text(f"# {title}\n\n{intro}\n\n" + "\n".join(listing) + "\n")

    landing = (HERE / ("index.md" if lang == "en" else f"index.{lang}.md")).read_text()
    landing = landing.replace("{{README_RESULTS}}", readme_results(lang))
    landing = landing.replace("{{START_COMMAND}}", start).replace("{{TEST_COMMAND}}", test)
    (src_root / "index.md").write_text(links.rewrite(landing, "docs/site/index.md", "index"))

    toc = yaml.safe_load((HERE / "_toc.yml").read_text())
    if lang != "en":
        for part in toc["parts"]:
            part["caption"] = CAPTIONS_ZH.get(part["caption"], part["caption"])
    for part in toc["parts"]:  # pages that do not exist in this checkout (glossary) are left out
        part["chapters"] = [c for c in part["chapters"] if "glob" in c or _exists(src_root, c["file"])]
    (src_root / "_toc.yml").write_text(yaml.safe_dump(toc, allow_unicode=True, sort_keys=False))

    config = yaml.safe_load((HERE / "_config.yml").read_text())
    config["sphinx"]["config"]["language"] = "en" if lang == "en" else lang.replace("-", "_")
    if lang != "en":
        config["title"] = "ipa-lab 中文版"
    config["sphinx"]["config"]["html_context"]["ipa_lang"] = lang
    (src_root / "_config.yml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))

    shutil.copytree(HERE / "_static", src_root / "_static")
    switch = "" if len(langs) == 1 else ("zh-CN/|中文" if lang == "en" else "../|English")
    other = OTHER[lang]
    # The other book's pages: the switch leads to its landing page from a page it lacks (a lesson not
    # translated yet), not to a 404.
    other_pages = sorted({"index", "search", "genindex", "source/index"} | {nb.stem for nb in lessons(other, zh_dir)}
                         | set(doc_pages(other)) | {source_page(p) for p in source_files()})
    js = (src_root / "_static" / "ipa-site.js")
    js.write_text(js.read_text().replace("__OTHER_BOOK__", switch)
                  .replace('["__OTHER_PAGES__"]', json.dumps(other_pages, ensure_ascii=False)))


def _exists(src_root: Path, name: str) -> bool:
    return any((src_root / f"{name}{s}").exists() for s in (".md", ".ipynb"))


def build_book(src_root: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    bindir = Path(sys.executable).parent
    jb = bindir / "jupyter-book"
    subprocess.run([str(jb), "config", "sphinx", str(src_root)], check=True, env=env, stdout=subprocess.DEVNULL)
    # Jupyter Book always loads sphinx-thebe, which writes its inline script twice per page (a
    # console error) and names a CDN; the site has no live kernels, so it goes.
    with (src_root / "conf.py").open("a") as conf:
        conf.write('\nextensions = [e for e in extensions if e != "sphinx_thebe"]\n')
        # Chinese words in the search index without jieba (docs/site/_ext/ipa_search_zh.py).
        conf.write(f"\nimport sys\nsys.path.insert(0, {str(HERE / '_ext')!r})\nextensions.append('ipa_search_zh')\n")
    shutil.rmtree(out, ignore_errors=True)
    log = src_root / "sphinx-warnings.log"
    subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-d", str(src_root / ".doctrees"), "-w", str(log),
         str(src_root), str(out)],
        check=True, env=env,
    )
    warnings = [l for l in log.read_text().splitlines() if "WARNING" in l or "ERROR" in l]
    if warnings:
        print("\n".join(warnings), file=sys.stderr)
        raise SystemExit(f"build.py: {len(warnings)} Sphinx warnings in {src_root.name} (see {log})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "site", help="where the site goes")
    ap.add_argument("--src", type=Path, default=ROOT / "build" / "site-src", help="staging copies")
    ap.add_argument("--zh-notebooks", type=Path, default=None,
                    help="the Chinese notebooks (default notebooks/zh-CN/; built when it holds any)")
    ap.add_argument("--lang", choices=LANGS, action="append", help="build only this book (repeatable)")
    args = ap.parse_args(argv)
    zh_dir = args.zh_notebooks.resolve() if args.zh_notebooks else None
    langs = ["en"] + (["zh-CN"] if lessons("zh-CN", zh_dir) else [])
    shutil.rmtree(args.out, ignore_errors=True)
    for lang in langs:
        if args.lang and lang not in args.lang:
            continue
        t0 = time.time()
        src_root = args.src / lang
        stage(lang, langs, src_root, zh_dir)
        build_book(src_root, args.out / BOOK_DIR[lang])  # English first: its folder holds zh-CN/
        print(f"site: {lang} built in {time.time() - t0:.0f} s -> {args.out / BOOK_DIR[lang]}")
    print(f"site: open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
