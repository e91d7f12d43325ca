"""The Chinese edition stays in step with the English notebooks (ipa_lab.translate)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from ipa_lab import translate

NOTEBOOKS = translate.english_notebooks()
IDS = [p.stem for p in NOTEBOOKS]


def _nb(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _entries(nb: dict) -> dict:
    """A complete, current translation of `nb` (so these tests do not depend on the shipped files)."""
    return {c["id"]: translate.Entry(c["id"], translate.fingerprint("".join(c["source"])), "中文。")
            for c in nb["cells"] if c["cell_type"] == "markdown"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_every_markdown_cell_has_a_current_translation(notebook):
    problems = translate.problems(notebook)
    assert not problems, "stale or missing translations (fix docs/zh-CN/, then run python -m ipa_lab.translate):\n" + \
        "\n".join(map(str, problems))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_the_chinese_notebook_is_the_english_one_with_its_prose_translated(notebook):
    chinese = translate.EDITION / notebook.name
    assert chinese.exists(), f"{chinese.name} is missing from notebooks/zh-CN: run python -m ipa_lab.translate"
    assert translate.differences(_nb(notebook), _nb(chinese), chinese.name) == []
    expected = json.dumps(translate.translated(_nb(notebook), translate.load(notebook)), indent=1, ensure_ascii=False) + "\n"
    assert chinese.read_text(encoding="utf-8") == expected, \
        f"notebooks/zh-CN/{chinese.name} is out of date: run python -m ipa_lab.translate"


def test_a_changed_english_cell_makes_its_translation_stale():
    notebook = NOTEBOOKS[1]
    nb = _nb(notebook)
    entries = _entries(nb)
    assert translate.problems(notebook, nb, entries) == []
    cell = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    cell["source"] = ["".join(cell["source"]) + "\nOne more English sentence.\n"]
    (problem,) = translate.problems(notebook, nb, entries)
    assert (problem.notebook, problem.cell_id) == (notebook.name, cell["id"])
    assert "stale" in str(problem) and translate.fingerprint("".join(cell["source"])) in str(problem)


def test_a_new_cell_and_a_removed_cell_are_named():
    notebook = NOTEBOOKS[1]
    nb = _nb(notebook)
    entries = _entries(nb)
    removed = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    nb["cells"].remove(removed)
    nb["cells"].append({"cell_type": "markdown", "id": "new-cell", "metadata": {}, "source": ["## New\n"]})
    found = {p.cell_id: p.what for p in translate.problems(notebook, nb, entries)}
    assert found.keys() == {removed["id"], "new-cell"}
    assert "no longer in the notebook" in found[removed["id"]] and "no translation" in found["new-cell"]


def test_a_todo_section_is_not_a_translation():
    notebook = NOTEBOOKS[0]
    nb = _nb(notebook)
    entries = _entries(nb)
    first = next(iter(entries.values()))
    first.text = f"{translate.TODO}\n# English, still"
    assert [p.cell_id for p in translate.problems(notebook, nb, entries)] == [first.cell_id]


def test_an_edited_code_cell_in_the_chinese_notebook_is_named():
    english = _nb(NOTEBOOKS[2])
    chinese = translate.translated(english, _entries(english))
    assert translate.differences(english, chinese, "x.ipynb") == []
    code = next(c for c in chinese["cells"] if c["cell_type"] == "code" and c["outputs"])
    edited = copy.deepcopy(chinese)
    next(c for c in edited["cells"] if c["id"] == code["id"])["source"] = ["print('changed')\n"]
    assert translate.differences(english, edited, "x.ipynb") == [
        f"x.ipynb, cell {code['id']}: the code cell's source differs from the English notebook's"]
    edited = copy.deepcopy(chinese)
    next(c for c in edited["cells"] if c["id"] == code["id"])["outputs"] = []
    assert "outputs or metadata" in translate.differences(english, edited, "x.ipynb")[0]


def test_translation_files_round_trip():
    notebook = NOTEBOOKS[0]
    text = translate.translation_path(notebook).read_text(encoding="utf-8")
    entries = translate.parse(text)
    assert translate.parse(translate.render(notebook, list(entries.values()))) == entries
    with pytest.raises(ValueError, match="translated twice"):
        first = next(iter(entries.values()))
        translate.parse(translate.render(notebook, [first, first]))


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_relative_links_in_the_chinese_notebook_resolve(notebook):
    """The Chinese notebooks sit one folder deeper: a link out of notebooks/ needs one more ../."""
    broken = []
    for entry in translate.load(notebook).values():
        for target in _LINK.findall(entry.text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            if path and not (translate.EDITION / path).resolve().exists():
                broken.append(f"cell {entry.cell_id}: {target}")
    assert not broken, f"{notebook.name}: links that lead nowhere from notebooks/zh-CN/: {broken}"


def test_the_glossary_links_resolve():
    text = (translate.ROOT / "docs" / "glossary.md").read_text(encoding="utf-8")
    targets = [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    assert targets and all((translate.ROOT / "docs" / t).resolve().exists() for t in targets)


def _glossary_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in (translate.ROOT / "docs" / "glossary.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| ") and not line.startswith("| English"):
            english, chinese, link = (c.strip() for c in line.strip().strip("|").split("|"))
            rows.append((english, chinese, re.search(r"\(\.\./notebooks/(\w+)\.ipynb\)", link).group(1)))
    return rows


def test_each_glossary_term_is_used_in_the_notebook_it_links_to():
    """The glossary is the translation's: a term it lists is the one the linked Chinese notebook uses."""
    texts = {p.stem: "\n".join(e.text for e in translate.load(p).values()) for p in NOTEBOOKS}
    rows = _glossary_rows()
    assert len(rows) > 40
    unused = [(english, chinese, stem) for english, chinese, stem in rows
              if re.split(r"（| / ", chinese)[0].strip() not in texts[stem]]
    assert not unused, f"glossary terms not found in the Chinese text of the notebook they link to: {unused}"


def _stray_breaks(text: str) -> list[str]:
    """Line breaks inside a paragraph that a browser renders as a space in Chinese text: after Chinese
    punctuation, or between two Chinese characters (a new list item, heading, table row or fence is fine)."""
    han, punct = re.compile(r"[\u4e00-\u9fff]"), re.compile(r"[\u3000-\u303f\uff00-\uffef]")
    block = re.compile(r"([-*+]\s|\d+\.\s|#|\||>|<!--|\$\$|```)")
    found, fence = [], False
    lines = text.split("\n")
    for a, b in zip(lines, lines[1:]):
        if a.strip().startswith("```"):
            fence = not fence
        rest = b.lstrip()
        if fence or not a.strip() or not rest or block.match(rest) or re.match(r"(#|\||<!--|\$\$|```)", a.lstrip()):
            continue
        if punct.match(a[-1]) or (han.match(a[-1]) and (han.match(rest[0]) or punct.match(rest[0]))):
            found.append(f"{a[-10:]!r} / {rest[:10]!r}")
    return found


def test_no_line_break_that_renders_as_a_stray_space():
    """Markdown renders a line break inside a paragraph as a space: a gap in Chinese text."""
    found = [f"{notebook.stem}, cell {entry.cell_id}: {gap}" for notebook in NOTEBOOKS
             for entry in translate.load(notebook).values() for gap in _stray_breaks(entry.text)]
    found += [f"README.zh-CN.md: {gap}" for gap in _stray_breaks((translate.ROOT / "README.zh-CN.md").read_text(encoding="utf-8"))]
    assert not found, found


def test_the_chinese_readme_gives_the_english_readmes_commands():
    """README.zh-CN.md's install, test and site commands are the README's, verbatim."""
    def commands(name):
        text = (translate.ROOT / name).read_text(encoding="utf-8")
        return {b.strip() for b in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S) if "python3.11 -m venv" in b}

    english, chinese = commands("README.md"), commands("README.zh-CN.md")
    assert len(english) >= 3 and chinese == english


def test_the_chinese_readmes_links_resolve():
    text = (translate.ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in targets if not (translate.ROOT / t).exists()]
    assert targets and not missing, missing
