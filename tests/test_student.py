"""Student copies: solutions become stubs, outputs go, and the committed copies are current."""
from __future__ import annotations

import json

import pytest

from ipa_lab.student import NOTEBOOKS, STUB, generate, main, strip_solutions, student_copy


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
    copies = generate()
    assert len(copies) == 8
    for path, text in copies.items():
        solution = json.loads((NOTEBOOKS / path.name).read_text())
        sources = ["".join(c["source"]) for c in solution["cells"] if c["cell_type"] == "code"]
        n = sum(s.count("### BEGIN SOLUTION") for s in sources)
        assert n >= (1 if path.name.startswith("00") else 2), f"{path.name} has {n} exercises"
        copy = ["".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
        assert not any("SOLUTION" in s for s in copy), f"{path.name} leaks a solution marker"
        assert sum(s.count(STUB) for s in copy) == n, f"{path.name}: expected {n} stubs"


def test_committed_student_copies_are_up_to_date(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().out
