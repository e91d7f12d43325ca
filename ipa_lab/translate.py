"""The Chinese edition: notebooks/zh-CN/*.ipynb, made from the English notebooks and a translation file each.

    python -m ipa_lab.translate            # notebooks/*.ipynb + docs/zh-CN/*.md -> notebooks/zh-CN/*.ipynb
    python -m ipa_lab.translate --check    # exit 1 if a translation is stale or missing, or a copy out of date
    python -m ipa_lab.translate --todo     # add the cells that have no translation yet, in English, to translate

Only the prose is translated. A Chinese notebook is the English notebook with each markdown cell's
text replaced; its code cells and their stored outputs are the English ones, copied, so there is one
copy of the code to maintain and nbval's checks of the English notebooks hold for both.

A translation file (`docs/zh-CN/NN_name.md`) is plain Markdown, one section per markdown cell::

    <!-- cell c03 en:1f2e3d4c5b6a -->
    ## 解耦交叉注意力
    ...

`c03` is the English cell's id and `1f2e3d4c5b6a` a fingerprint of the English text the translation was
made from. When that English text changes, the fingerprint no longer matches: the translation is
stale, and `--check` (and tests/test_translate.py) name the notebook and the cell until a translator
updates the text and the fingerprint (`--check` prints the new one).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TRANSLATIONS = ROOT / "docs" / "zh-CN"
EDITION = NOTEBOOKS / "zh-CN"
TODO = "<!-- TODO: translate -->"
_HEADER = re.compile(r"^<!-- cell (\S+) en:([0-9a-f]{12}) -->$", re.MULTILINE)


def fingerprint(text: str) -> str:
    """A short fingerprint of a cell's English text: it changes whenever the text does."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def english_notebooks() -> list[Path]:
    """The notebooks of the course, in order (the solution copies: the ones with every output)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def translation_path(notebook: Path) -> Path:
    return TRANSLATIONS / f"{notebook.stem}.md"


@dataclass
class Entry:
    """One translated cell: the English cell's id, the fingerprint of its English text, the Chinese."""

    cell_id: str
    english: str
    text: str


def parse(text: str) -> dict[str, Entry]:
    """Read a translation file: cell id -> Entry. Text before the first section is a comment for humans."""
    headers = list(_HEADER.finditer(text))
    entries: dict[str, Entry] = {}
    for i, h in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        cell_id = h.group(1)
        if cell_id in entries:
            raise ValueError(f"cell {cell_id} is translated twice")
        entries[cell_id] = Entry(cell_id, h.group(2), text[h.end():end].strip("\n"))
    return entries


def render(notebook: Path, entries: list[Entry]) -> str:
    """Write a translation file's text (the inverse of `parse`)."""
    head = (f"<!-- The Chinese text of {notebook.relative_to(ROOT).as_posix()}'s markdown cells, "
            "read by `python -m ipa_lab.translate` (see its docstring). -->\n")
    return head + "".join(f"\n<!-- cell {e.cell_id} en:{e.english} -->\n{e.text}\n" for e in entries)


def load(notebook: Path) -> dict[str, Entry]:
    path = translation_path(notebook)
    return parse(path.read_text(encoding="utf-8")) if path.exists() else {}


@dataclass
class Problem:
    """Why a notebook's translation cannot be used as it is: one cell, and what to do."""

    notebook: str
    cell_id: str
    what: str

    def __str__(self) -> str:
        return f"{self.notebook}, cell {self.cell_id}: {self.what}"


def problems(notebook: Path, nb: dict | None = None, entries: dict[str, Entry] | None = None) -> list[Problem]:
    """Every markdown cell without an up-to-date translation, and every translation of no cell."""
    nb = nb if nb is not None else json.loads(notebook.read_text(encoding="utf-8"))
    entries = entries if entries is not None else load(notebook)
    name, found = notebook.name, []
    markdown = {c["id"]: c for c in nb["cells"] if c["cell_type"] == "markdown"}
    for cell_id, cell in markdown.items():
        english, first = _source(cell), _source(cell).strip().splitlines()[0][:60] if _source(cell).strip() else ""
        entry = entries.get(cell_id)
        if entry is None:
            found.append(Problem(name, cell_id, f"no translation (English begins {first!r})"))
        elif entry.english != fingerprint(english):
            found.append(Problem(name, cell_id, f"stale: the English changed after it was translated "
                                                f"(English begins {first!r}); update the text, then "
                                                f"its fingerprint to en:{fingerprint(english)}"))
        elif TODO in entry.text or not entry.text.strip():
            found.append(Problem(name, cell_id, "not translated yet (still marked TODO or empty)"))
    for cell_id in entries.keys() - markdown.keys():
        found.append(Problem(name, cell_id, "translates a cell that is no longer in the notebook (or is "
                                            "no longer markdown): delete the section"))
    return found


def translated(nb: dict, entries: dict[str, Entry]) -> dict:
    """The Chinese notebook: a copy of `nb` whose markdown cells carry the translations."""
    out = copy.deepcopy(nb)
    for cell in out["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = entries[cell["id"]].text.splitlines(keepends=True)
    out["metadata"]["language"] = "zh-CN"  # a notebook-level note; Jupyter ignores unknown keys
    return out


def _cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def differences(english: dict, chinese: dict, name: str) -> list[str]:
    """Where a Chinese notebook departs from its English one in anything but the prose.

    The cells must match one for one (same ids and kinds); code cells, with their outputs, exactly;
    markdown cells must carry Chinese."""
    found = []
    en_cells, zh_cells = english["cells"], chinese["cells"]
    if [(c["id"], c["cell_type"]) for c in en_cells] != [(c["id"], c["cell_type"]) for c in zh_cells]:
        return [f"{name}: its cells are not the English notebook's cells (ids or kinds differ)"]
    for en, zh in zip(en_cells, zh_cells):
        if en["cell_type"] == "code" and en != zh:
            what = "source" if en["source"] != zh["source"] else "outputs or metadata"
            found.append(f"{name}, cell {en['id']}: the code cell's {what} differs from the English notebook's")
        elif en["cell_type"] == "markdown" and not _cjk(_source(zh)):
            found.append(f"{name}, cell {en['id']}: the markdown cell has no Chinese text")
    return found


def _dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def build(check: bool = False) -> list[str]:
    """Write (or, with check=True, compare) every Chinese notebook; returns what is wrong, if anything."""
    wrong: list[str] = []
    for notebook in english_notebooks():
        nb = json.loads(notebook.read_text(encoding="utf-8"))
        entries = load(notebook)
        found = problems(notebook, nb, entries)
        if found:
            wrong += [str(p) for p in found]
            continue
        target, text = EDITION / notebook.name, _dump(translated(nb, entries))
        if check:
            if target.exists():
                wrong += differences(nb, json.loads(target.read_text(encoding="utf-8")), target.name)
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                wrong.append(f"{target.relative_to(ROOT).as_posix()} is out of date: run python -m ipa_lab.translate")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    if not check and EDITION.exists():  # a notebook renamed or removed in English goes in Chinese too
        names = {p.name for p in english_notebooks()}
        for stray in EDITION.glob("*.ipynb"):
            if stray.name not in names:
                stray.unlink()
    return wrong


def add_todo() -> list[Path]:
    """Append a TODO section, with the English text, for each markdown cell not yet in its file."""
    changed = []
    for notebook in english_notebooks():
        nb = json.loads(notebook.read_text(encoding="utf-8"))
        entries = load(notebook)
        ordered = []
        for cell in nb["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            ordered.append(entries.get(cell["id"]) or Entry(cell["id"], fingerprint(_source(cell)),
                                                            f"{TODO}\n{_source(cell)}"))
        if len(ordered) != len([e for e in ordered if e.cell_id in entries]) or not translation_path(notebook).exists():
            path = translation_path(notebook)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(notebook, ordered), encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipa_lab.translate", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if anything is stale, missing or out of date")
    mode.add_argument("--todo", action="store_true", help="add the untranslated cells to the translation files")
    args = parser.parse_args(argv)
    if args.todo:
        for path in add_todo():
            print(f"added cells to translate: {path.relative_to(ROOT).as_posix()}")
        return 0
    wrong = build(check=args.check)
    for line in wrong:
        print(line, file=sys.stderr)
    if not wrong and not args.check:
        print(f"wrote {len(english_notebooks())} notebooks to {EDITION.relative_to(ROOT).as_posix()}/")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
