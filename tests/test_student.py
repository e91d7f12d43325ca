"""Student copies: solutions become stubs, outputs go, and the committed copies are current."""
from __future__ import annotations

import json

import pytest

from ipa_lab.student import (NOTEBOOKS, STUB, main, strip_solutions, student_copies, student_copy,
                             write_student_copies)


def test_a_solution_region_becomes_one_stub_at_its_indentation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n    ### END SOLUTION\n\ncheck(f)\n"
    assert strip_solutions(src) == f"def f(x):\n    {STUB}\n\ncheck(f)\n"


@pytest.mark.parametrize("src", ["### BEGIN SOLUTION\nx = 1\n", "x = 1\n### END SOLUTION\n",
                                 "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n"])
def test_unbalanced_markers_are_refused(src):
    with pytest.raises(ValueError, match="SOLUTION"):
        strip_solutions(src)


def test_outputs_and_counts_are_cleared():
    nb = {"cells": [{"cell_type": "code", "source": ["print(1)\n"], "outputs": [{"output_type": "stream"}],
                     "execution_count": 3, "metadata": {}}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    cell = student_copy(nb)["cells"][0]
    assert cell["outputs"] == [] and cell["execution_count"] is None


def test_every_notebook_has_checked_exercises_and_no_solution_leaks():
    copies = student_copies()
    assert len(copies) == len(list(NOTEBOOKS.glob("[0-9]*.ipynb"))) >= 8  # one per notebook
    for path, text in copies.items():
        solution = json.loads((NOTEBOOKS / path.name).read_text())
        sources = ["".join(c["source"]) for c in solution["cells"] if c["cell_type"] == "code"]
        n = sum(s.count("### BEGIN SOLUTION") for s in sources)
        assert n >= (1 if path.name.startswith("00") else 2), f"{path.name} has {n} exercises"
        copy = ["".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
        assert not any("SOLUTION" in s for s in copy), f"{path.name} leaks a solution marker"
        assert sum(s.count(STUB) for s in copy) == n, f"{path.name}: expected {n} stubs"


def test_write_student_copies_writes_what_is_missing_or_stale_and_nothing_else(tmp_path, capsys):
    nb = {"cells": [{"cell_type": "code", "source": ["x = 1\n", "### BEGIN SOLUTION\n", "y = 2\n",
                                                      "### END SOLUTION\n", "_ = checks.y(y)"], "outputs": [],
                     "execution_count": 1, "metadata": {}}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "00_a.ipynb").write_text(json.dumps(nb))
    (tmp_path / "notes.ipynb").write_text(json.dumps(nb))  # not a numbered course notebook: no copy
    copy = tmp_path / "student" / "00_a.ipynb"
    assert write_student_copies(tmp_path) == [copy]
    assert "".join(json.loads(copy.read_text())["cells"][0]["source"]) == f"x = 1\n{STUB}\n_ = checks.y(y)"
    assert write_student_copies(tmp_path) == []  # up to date: nothing rewritten
    copy.write_text("stale")
    out = (main(["--src", str(tmp_path), "--check"]), capsys.readouterr().out)
    assert out[0] == 1 and "out of date: student/00_a.ipynb" in out[1] and f"out of date: {tmp_path.name}/00_a.ipynb" in out[1]
    assert main(["--src", str(tmp_path)]) == 0
    assert "nbgrader metadata updated in 1; student copies: 1 written" in capsys.readouterr().out
    assert main(["--src", str(tmp_path), "--check"]) == 0
    graded = json.loads((tmp_path / "00_a.ipynb").read_text())["cells"]
    assert graded[0]["metadata"]["nbgrader"]["grade_id"] == "y" and "".join(graded[1]["source"]).endswith('checks.grade("y")')


def test_committed_student_copies_are_up_to_date(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().out


def test_the_committed_notebooks_carry_current_nbgrader_metadata():
    """Every exercise cell is an nbgrader solution cell followed by its locked test cell, exactly
    as `python -m ipa_lab.student` writes them; a stale or missing one fails here, not in a
    teacher's `nbgrader generate_assignment`."""
    from ipa_lab.student import with_grading

    for path in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
        nb = json.loads(path.read_text())
        assert with_grading(nb) == nb, f"{path.name}: run python -m ipa_lab.student"
        exercises = [c for c in nb["cells"] if "### BEGIN SOLUTION" in "".join(c["source"])]
        assert exercises and all(c["metadata"]["nbgrader"]["solution"] for c in exercises), path.name


def test_student_copies_leave_the_grading_cells_out():
    from ipa_lab.student import is_grading_cell, with_grading

    nb = with_grading(json.loads((NOTEBOOKS / "04_training_loop.ipynb").read_text()))
    assert sum(map(is_grading_cell, nb["cells"])) == 4  # drop bands, noising, the step, the loop
    copy = student_copy(nb)
    assert not any(map(is_grading_cell, copy["cells"]))
    assert not any("nbgrader" in c.get("metadata", {}) for c in copy["cells"])
