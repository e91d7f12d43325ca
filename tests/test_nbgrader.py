"""The teacher's nbgrader flow, for real: the notebooks as they are committed go through
`nbgrader generate_assignment` with no configuration, and a submission is autograded: full
points for the solutions, lost points (with the checker's verdict in the feedback) for a wrong
answer. nbgrader is pinned in the test extra."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipa_lab.student import NOTEBOOKS, exercise_of, is_grading_cell

nbgrader = pytest.importorskip("nbgrader", reason="nbgrader is in the test extra: pip install -e '.[test]'")


def run_nbgrader(course: Path, *args: str) -> str:
    """`nbgrader <args>` in the course folder, as a teacher runs it in the activated environment
    (nbgrader calls the environment's `alembic` by name, so its bin folder goes first on PATH)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_every_lesson_releases_with_no_configuration(tmp_path):
    """generate_assignment accepts every notebook as committed (no 'solution region in a
    non-solution cell'), strips every solution and locks every test cell."""
    source = tmp_path / "source" / "course"
    source.mkdir(parents=True)
    for notebook in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
        shutil.copy(notebook, source)
    run_nbgrader(tmp_path, "generate_assignment", "course", "--force")
    released = sorted((tmp_path / "release" / "course").glob("*.ipynb"))
    assert [p.name for p in released] == [p.name for p in sorted(source.glob("*.ipynb"))]
    for path in released:
        for cell in cells(path):
            text = "".join(cell["source"])
            assert "### BEGIN SOLUTION" not in text, path.name
            if is_grading_cell(cell):
                assert cell["metadata"]["nbgrader"]["locked"] and cell["metadata"]["nbgrader"]["points"] >= 1


def test_a_lesson_is_autograded_with_the_checkers_verdict_as_feedback(tmp_path):
    lesson = "01_image_projection.ipynb"
    (tmp_path / "source" / "lesson01").mkdir(parents=True)
    shutil.copy(NOTEBOOKS / lesson, tmp_path / "source" / "lesson01")
    run_nbgrader(tmp_path, "generate_assignment", "lesson01", "--force")

    solved = json.loads((NOTEBOOKS / lesson).read_text())
    wrong = json.loads(json.dumps(solved))
    for cell in wrong["cells"]:  # a plausible mistake: the LayerNorm defined but never applied
        text = "".join(cell["source"])
        if exercise_of(cell) == ("image_proj_model", True):
            assert "return self.norm(tokens)" in text
            cell["source"] = text.replace("return self.norm(tokens)", "return tokens").splitlines(keepends=True)
    for student, notebook in (("alice", solved), ("bob", wrong)):
        folder = tmp_path / "submitted" / student / "lesson01"
        folder.mkdir(parents=True)
        (folder / lesson).write_text(json.dumps(notebook))
    run_nbgrader(tmp_path, "autograde", "lesson01", "--force")
    run_nbgrader(tmp_path, "generate_feedback", "lesson01", "--force")

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gb:
        scores = {s: (gb.find_submission("lesson01", s).score, gb.find_submission("lesson01", s).max_score)
                  for s in ("alice", "bob")}
    assert scores["alice"] == (4.0, 4.0)  # two exercises, 2 points each
    assert scores["bob"] == (2.0, 4.0)  # ImageProjModel fails; the parameter count still passes
    feedback = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "feedback" / "bob" / "lesson01" /
                                                      lesson.replace(".ipynb", ".html")).read_text()))
    assert "FAIL image_proj_model: the output for the toy" in feedback
    assert "without the LayerNorm" in feedback
