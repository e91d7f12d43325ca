"""Make the student copies of the notebooks: solutions out, outputs cleared.

    python -m ipa_lab.student            # notebooks/*.ipynb -> notebooks/student/*.ipynb
    python -m ipa_lab.student --check    # exit 1 if the student copies are out of date

A solution is the code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
markers). In the copy it becomes one ``raise NotImplementedError(...)`` at the same indentation,
so the exercise's checker reports "not yet implemented" and the notebook still runs to its end.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("your code here")'


def strip_solutions(source: str) -> str:
    """Replace each solution region of a cell's source by a stub at the region's indentation."""
    out, inside = [], False
    for line in source.splitlines(keepends=True):
        if line.strip() == BEGIN:
            if inside:
                raise ValueError(f"nested {BEGIN!r}")
            inside, indent = True, re.match(r"\s*", line).group(0)
            out.append(f"{indent}{STUB}\n")
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"{END!r} without {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN!r} without {END!r}")
    return "".join(out)


def student_copy(nb: dict) -> dict:
    """The notebook with solutions stubbed and every output and execution count cleared."""
    nb = json.loads(json.dumps(nb))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            cell["source"] = strip_solutions(src).splitlines(keepends=True)
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
    return nb


def render(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def _notebooks(src: Path) -> list[Path]:
    """The course notebooks in `src`: the numbered ones, in order."""
    return sorted(src.glob("[0-9]*.ipynb"))


def student_copies(src: Path = NOTEBOOKS, dst: Path | None = None) -> dict[Path, str]:
    """{student path: text} for every notebook in `src` (nothing is written)."""
    dst = dst or src / "student"
    return {dst / p.name: render(student_copy(json.loads(p.read_text()))) for p in _notebooks(src)}


def out_of_date(copies: dict[Path, str]) -> list[Path]:
    """The paths of `copies` that are missing on disk or hold other text."""
    return [path for path, text in copies.items() if not path.exists() or path.read_text() != text]


def write_student_copies(src: Path = NOTEBOOKS, dst: Path | None = None) -> list[Path]:
    """Write the student copy of every notebook in `src` into `dst` (default src/student).

    Only copies that are missing or out of date are written, so an unchanged copy keeps its
    timestamp; returns the paths written.
    """
    copies = student_copies(src, dst)
    stale = out_of_date(copies)
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(copies[path])
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipa_lab.student", description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=NOTEBOOKS)
    p.add_argument("--dst", type=Path, default=None, help="default: SRC/student")
    p.add_argument("--check", action="store_true", help="only report copies that are missing or out of date")
    a = p.parse_args(argv)
    if a.check:
        stale = out_of_date(student_copies(a.src, a.dst))
        for path in stale:
            print(f"out of date: {path.name} (run python -m ipa_lab.student)")
        return 1 if stale else 0
    written = write_student_copies(a.src, a.dst)
    print(f"{len(_notebooks(a.src))} student notebooks, {len(written)} written")
    return 0

if __name__ == "__main__":
    sys.exit(main())
