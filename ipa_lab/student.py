"""Make the student copies of the notebooks, and keep the notebooks ready for nbgrader.

    python -m ipa_lab.student            # nbgrader metadata into notebooks/*.ipynb, then
                                         # notebooks/*.ipynb -> notebooks/student/*.ipynb
    python -m ipa_lab.student --check    # exit 1 if either is out of date

A solution is the code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
markers). In the copy it becomes one ``raise NotImplementedError(...)`` at the same indentation,
so the exercise's checker reports "not yet implemented" and the notebook still runs to its end.

For nbgrader (`with_grading`): every exercise cell is a solution cell, and is followed by a locked,
autograded test cell, ``checks.grade("<exercise>")``, which fails with the checker's verdict unless
it was PASS. The metadata is derived from the notebook itself (the exercise's name is its checker's),
so it is never written by hand; `nbgrader generate_assignment` and `autograde` then need no
configuration. The student copies made here leave the test cells out (they would fail on every
stub): they run from top to bottom without nbgrader.
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
TEST_MARK = "# Autograded test (nbgrader)"
_CHECK_CALL = re.compile(r"^(?:(\w+)|_) = checks\.(\w+)\(", re.MULTILINE)


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


# ---------------------------------------------------------------------------------------------
# nbgrader: solution cells, and an autograded test cell after each
# ---------------------------------------------------------------------------------------------
def _source(cell: dict) -> str:
    return "".join(cell["source"])


def exercise_of(cell: dict) -> tuple[str, bool] | None:
    """(exercise name, builds a piece?) for an exercise cell, None for any other cell.

    An exercise cell holds a solution region and ends with its checker's call:
    ``_ = checks.name(fn)`` for a function checked on its own, ``Piece = checks.name(Piece)`` for a
    piece the notebook goes on to use."""
    if cell["cell_type"] != "code" or BEGIN not in _source(cell):
        return None
    calls = _CHECK_CALL.findall(_source(cell))
    if len(calls) != 1:
        raise ValueError(f"an exercise cell must end with exactly one checker call, found {len(calls)}:\n"
                         f"{_source(cell)[:300]}")
    target, name = calls[0]
    return name, bool(target)


def _nbgrader(grade_id: str, *, solution: bool, points: int | None = None) -> dict:
    meta = {"grade": points is not None, "grade_id": grade_id, "locked": points is not None,
            "schema_version": 3, "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return meta


def grading_cell(name: str, points: int) -> dict:
    """The locked, autograded test cell that follows the exercise `name`."""
    return {"cell_type": "code", "execution_count": None, "id": f"test-{name}".replace("_", "-"),
            "metadata": {"nbgrader": _nbgrader(f"test_{name}", solution=False, points=points)},
            "outputs": [], "source": [f"{TEST_MARK}: the exercise above must pass its checker\n",
                                      f'checks.grade("{name}")']}


def is_grading_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and _source(cell).startswith(TEST_MARK)


def with_grading(nb: dict) -> dict:
    """The notebook with nbgrader's metadata on every exercise cell and a test cell after each (a
    piece the notebook builds on is worth 2 points, a function checked on its own 1). Idempotent:
    an up-to-date notebook comes back equal."""
    nb = json.loads(json.dumps(nb))
    cells = []
    for cell in nb["cells"]:
        if is_grading_cell(cell):
            continue  # made anew below, right after its exercise
        cells.append(cell)
        exercise = exercise_of(cell)
        if exercise is None:
            cell.get("metadata", {}).pop("nbgrader", None)
            continue
        name, builds = exercise
        cell.setdefault("metadata", {})["nbgrader"] = _nbgrader(name, solution=True)
        test = grading_cell(name, 2 if builds else 1)
        old = next((c for c in nb["cells"] if is_grading_cell(c) and c.get("id") == test["id"]), None)
        if old is not None:  # keep what a run recorded (a passing test prints nothing)
            test["outputs"], test["execution_count"] = old.get("outputs", []), old.get("execution_count")
        cells.append(test)
    nb["cells"] = cells
    return nb


def student_copy(nb: dict) -> dict:
    """The notebook with solutions stubbed, the autograded test cells left out (they are for
    nbgrader, and would fail on every stub) and every output and execution count cleared."""
    nb = json.loads(json.dumps(nb))
    nb["cells"] = [cell for cell in nb["cells"] if not is_grading_cell(cell)]
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("nbgrader", None)
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


def graded_notebooks(src: Path = NOTEBOOKS) -> dict[Path, str]:
    """{path: text} of every notebook in `src` with its nbgrader metadata and test cells current."""
    return {p: render(with_grading(json.loads(p.read_text()))) for p in _notebooks(src)}


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
        stale = out_of_date(graded_notebooks(a.src)) + out_of_date(student_copies(a.src, a.dst))
        for path in stale:
            print(f"out of date: {path.parent.name}/{path.name} (run python -m ipa_lab.student)")
        return 1 if stale else 0
    graded = graded_notebooks(a.src)
    regraded = out_of_date(graded)
    for path in regraded:  # the solution notebooks first: the student copies are made from them
        path.write_text(graded[path])
    written = write_student_copies(a.src, a.dst)
    print(f"{len(_notebooks(a.src))} notebooks: nbgrader metadata updated in {len(regraded)}; "
          f"student copies: {len(written)} written")
    return 0

if __name__ == "__main__":
    sys.exit(main())
