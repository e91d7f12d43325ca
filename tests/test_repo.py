"""The repository keeps its promises: one dependency list, and the README's commands are CI's."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_deps() -> list[str]:
    """The package's dependencies and those of its extras (course, test, site): all pinned."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]


def test_the_package_needs_no_course_or_test_tools():
    """Jupyter, matplotlib, nbval and pytest are extras: a script or a GPU job that imports
    ipa_lab to train does not install a notebook server."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split("[=<>]", d)[0] for d in project["dependencies"]}
    assert not runtime & {"jupyterlab", "matplotlib", "ipywidgets", "nbval", "pytest", "jupyter-book", "playwright"}
    assert set(project["optional-dependencies"]) == {"course", "test", "site"}


def _environment_pip_deps() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    deps = []
    for line in lines[start + 1 :]:
        m = re.match(r"^\s+- (.+)$", line)
        if not m:
            break
        deps.append(m.group(1).strip())
    return [d for d in deps if d != "-e ."]


def test_environment_yml_and_pyproject_list_the_same_pinned_packages():
    assert sorted(_environment_pip_deps()) == sorted(_pyproject_deps())
    assert "python=3.11" in (ROOT / "environment.yml").read_text()
    # torch is pinned to the release that has a CPU build: an open range pulls CUDA wheels.
    assert "torch==2.13.0" in _pyproject_deps()
    for dep in _pyproject_deps():
        assert "==" in dep, f"{dep} is not pinned; nbval's stored outputs need exact versions"


def _readme_commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    cmds = [b.strip() for b in blocks if "python3.11 -m venv .venv" in b]
    return {"start": next(c for c in cmds if "jupyter lab" in c), "test": next(c for c in cmds if "pytest" in c)}


def test_readme_has_a_start_command_and_a_test_command():
    cmds = _readme_commands()
    assert "pip install" in cmds["start"] and "notebooks" in cmds["start"] and ".[course]" in cmds["start"]
    assert ".[course,test,site]" in cmds["test"]  # site: the website's browser test (tests/test_site.py)
    assert "--nbval" in cmds["test"] and "--nbval-lax" not in cmds["test"]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()["test"] in ci
    assert 'if [ "$rc" -eq 5 ]' in ci  # "no tests collected" must fail CI


def test_no_generated_junk_is_tracked():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    junk = [f for f in files if f.startswith((".venv/", "runs/")) or "__pycache__" in f or f.endswith((".pyc", ".ckpt"))]
    assert junk == []


def _texts(cell: dict):
    """Every text a stored output shows: streams, plain-text results and error messages."""
    for out in cell.get("outputs", []):
        yield out.get("name", out["output_type"]), "".join(out.get("text", ""))
        yield "text/plain", "".join(out.get("data", {}).get("text/plain", ""))


def test_stored_notebooks_are_quiet_and_portable():
    """What nbval compares must not depend on the machine: no stderr, no paths, addresses, device
    names or timings in outputs, and no execution timestamps or widget state in the metadata."""
    import json

    leaks = re.compile(r"/(?:home|tmp|work|Users)/|0x[0-9a-f]{6,}|\bcuda\b|NVIDIA|\bit/s\b|Warning\b|\d+(?:\.\d+)? ?(?:s|ms) elapsed")
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert len(notebooks) >= 8
    for path in notebooks:
        nb = json.loads(path.read_text())
        assert set(nb["metadata"]) <= {"kernelspec", "language_info"}, f"{path.name}: {set(nb['metadata'])}"
        for i, cell in enumerate(nb["cells"]):
            assert "execution" not in cell.get("metadata", {}), f"{path.name} cell {i}: execution timestamps"
            for kind, text in _texts(cell):
                assert kind != "stderr" or not text.strip(), f"{path.name} cell {i} wrote to stderr: {text[:200]}"
                assert kind != "error", f"{path.name} cell {i} stored an error"
                assert not leaks.search(text), f"{path.name} cell {i}: {leaks.search(text).group(0)!r} in {text[:200]!r}"


def test_parallel_runs_keep_each_notebook_with_what_shares_its_run_folder():
    """conftest.py's units for `pytest -n auto`: a test file is one unit; a notebook, its student copy and
    notebook 05 (which reads notebook 04's adapter) are one, so that no two of them run at the same time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    unit = root_conftest.unit_of
    assert unit("notebooks/04_training_loop.ipynb::Cell 20") == unit("notebooks/student/04_training_loop.ipynb::Cell 0")
    assert unit("notebooks/05_inference.ipynb::Cell 12") == unit("notebooks/04_training_loop.ipynb::Cell 0") == "notebook 04"
    assert unit("notebooks/06_ip_adapter_plus.ipynb::Cell 1") == unit("notebooks/student/06_ip_adapter_plus.ipynb::Cell 9")
    assert unit("notebooks/06_ip_adapter_plus.ipynb::Cell 1") != unit("notebooks/08_ip_adapter_family.ipynb::Cell 1")
    assert unit("tests/test_site.py::test_every_page_loads_without_console_errors") == "tests/test_site.py"
    # the run folders the notebooks' code names (runs/NN-...): each in the unit of the notebook that uses it
    uses = set()
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        uses |= {(nb.name[:2], folder) for folder in re.findall(r'"runs"\s*/\s*"(\d\d)-', code)}
    assert uses == {("04", "04"), ("05", "04"), ("08", "08"), ("09", "09")}  # a new one: give it its unit
    for number, folder in uses:
        assert unit(f"notebooks/{number}_x.ipynb") == unit(f"notebooks/{folder}_x.ipynb")
