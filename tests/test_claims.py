"""Numbers quoted in the notebooks' prose equal the stored outputs they describe.

Each claim: (notebook whose markdown quotes the number, the number as quoted, the notebook and the id of
the code cell whose stored output holds it, the value as that output prints it). A quoted number with
fewer decimals must be the printed value rounded. When a re-recorded output changes a number, this test
names the notebook, the number and the cell: update the prose (and its Chinese) or the table below.
CONTRIBUTING.md ("Numbers in the prose") says when to add a row.
"""
from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

CLAIMS = [
    # notebook 01: the projection's size, toy and SD 1.5
    ("01_image_projection", "8,576", "01_image_projection", "c22", "8,576"),
    ("01_image_projection", "3,150,336", "01_image_projection", "c22", "3,150,336"),
    # notebook 03: the adapter's size by block and on the real models
    ("03_freeze_and_count", "90,112", "03_freeze_and_count", "c07", "90,112"),
    ("03_freeze_and_count", "32,768", "03_freeze_and_count", "c07", "32,768"),
    ("03_freeze_and_count", "12,480", "03_freeze_and_count", "c23", "12,480"),
    ("03_freeze_and_count", "19,169,280", "03_freeze_and_count", "c25", "19,169,280"),
    ("03_freeze_and_count", "22,319,616", "03_freeze_and_count", "c25", "22,319,616"),
    ("03_freeze_and_count", "859,520,964", "03_freeze_and_count", "c25", "859,520,964"),
    ("03_freeze_and_count", "2.6", "03_freeze_and_count", "c25", "2.6"),
    ("03_freeze_and_count", "49,087,488", "03_freeze_and_count", "c25", "49,087,488"),
    ("03_freeze_and_count", "351,285,248", "03_freeze_and_count", "c25", "351,285,248"),
    ("03_freeze_and_count", "340,787,200", "03_freeze_and_count", "c25", "340,787,200"),
    ("03_freeze_and_count", "13.7", "03_freeze_and_count", "c25", "13.7"),
    # notebook 04: the recipe experiment (data/ablations/recipe.csv), the fixed validation loss (shipped adapter; yours as the CPU stored it) and what 30 steps taught
    ("04_training_loop", "67", "04_training_loop", "650c9b95", "67"),
    ("04_training_loop", "233", "04_training_loop", "650c9b95", "233"),
    ("04_training_loop", "343", "04_training_loop", "650c9b95", "343"),
    ("04_training_loop", "0.23", "04_training_loop", "650c9b95", "0.23"),
    ("04_training_loop", "0.258", "04_training_loop", "bbad6170", "0.258"),
    ("04_training_loop", "0.262", "04_training_loop", "bbad6170", "0.262"),
    ("04_training_loop", "0.263", "04_training_loop", "bbad6170", "0.263"),
    ("04_training_loop", "0.286", "04_training_loop", "bbad6170", "0.286"),
    ("04_training_loop", "0.262", "04_training_loop", "6f9e9f10", "0.262"),
    ("04_training_loop", "0.266", "04_training_loop", "6f9e9f10", "0.266"),
    ("04_training_loop", "0.812", "04_training_loop", "cell-29", "0.812"),
    ("04_training_loop", "0.188", "04_training_loop", "cell-29", "0.188"),
    ("04_training_loop", "0.562", "04_training_loop", "cell-29", "0.562"),
    ("04_training_loop", "0.688", "04_training_loop", "cell-29", "0.688"),
    ("04_training_loop", "0.125", "04_training_loop", "cell-29", "0.125"),
    ("04_training_loop", "0.250", "04_training_loop", "cell-29", "0.250"),
    ("04_training_loop", "0.438", "04_training_loop", "cell-29", "0.438"),
    # notebook 05: Table 1 in miniature (image only, on shape)
    ("05_inference", "98,688", "04_training_loop", "cell-36", "98,688"),
    ("05_inference", "0.88", "05_inference", "cell-28", "0.875"),
    # notebook 05: where the trained image tokens look (attention on the shape vs the shape's share, map spread)
    ("05_inference", "0.14", "05_inference", "cell-attn", "0.14"),
    ("05_inference", "2.2", "05_inference", "cell-attn", "2.2"),
    # notebook 06: its parameter counts
    ("06_ip_adapter_plus", "8,576", "06_ip_adapter_plus", "cell-16", "8,576"),
    ("06_ip_adapter_plus", "19,169,280", "06_ip_adapter_plus", "cell-16", "19,169,280"),
    ("06_ip_adapter_plus", "29,918,208", "06_ip_adapter_plus", "cell-16", "29,918,208"),
    ("06_ip_adapter_plus", "49,087,488", "06_ip_adapter_plus", "cell-16", "49,087,488"),
    # notebook 07: the real sizes and the fixed part of the memory bill
    ("07_going_real", "22,319,616", "07_going_real", "cell-08", "22,319,616"),
    ("07_going_real", "98,688", "07_going_real", "cell-08", "98,688"),
    ("07_going_real", "49,087,488", "07_going_real", "cell-08", "49,087,488"),
    ("07_going_real", "3.5", "07_going_real", "cell-21", "3.50"),
    ("07_going_real", "6.7", "07_going_real", "cell-21", "6.66"),
    # notebook 07: the activations, counted (toy against a measured step; SD 1.5 at 512 px, batch 8)
    ("07_going_real", "1.000", "07_going_real", "activations-toy", "1.000"),
    ("07_going_real", "20", "07_going_real", "activations-toy", "20"),
    ("07_going_real", "1.126", "07_going_real", "activations-toy", "1.126"),
    ("07_going_real", "21.8", "07_going_real", "activations-sd15", "21.8"),
    ("07_going_real", "28.5", "07_going_real", "activations-sd15", "28.5"),
    ("07_going_real", "77", "07_going_real", "activations-sd15", "77"),
    ("07_going_real", "35.2", "07_going_real", "activations-sd15", "35.2"),
    ("07_going_real", "30.7", "07_going_real", "activations-sd15", "30.7"),
    ("07_going_real", "13.3", "07_going_real", "activations-sd15", "13.3"),
    ("07_going_real", "19.8", "07_going_real", "activations-sd15", "19.8"),
    # notebook 08: the family counted (meta device), the toy recognizer's probe, FaceID against the base adapter
    ("08_ip_adapter_family", "19,169,280", "08_ip_adapter_family", "f8a1c0e3", "19,169,280"),
    ("08_ip_adapter_family", "340,787,200", "08_ip_adapter_family", "f8a1c0e3", "340,787,200"),
    ("08_ip_adapter_family", "3,150,336", "08_ip_adapter_family", "f8a1c0e3", "3,150,336"),
    ("08_ip_adapter_family", "29,918,208", "08_ip_adapter_family", "f8a1c0e3", "29,918,208"),
    ("08_ip_adapter_family", "2,625,024", "08_ip_adapter_family", "f8a1c0e3", "2,625,024"),
    ("08_ip_adapter_family", "3,675,648", "08_ip_adapter_family", "f8a1c0e3", "3,675,648"),
    ("08_ip_adapter_family", "33,581,568", "08_ip_adapter_family", "f8a1c0e3", "33,581,568"),
    ("08_ip_adapter_family", "82,961,664", "08_ip_adapter_family", "f8a1c0e3", "82,961,664"),
    ("08_ip_adapter_family", "12,779,520", "08_ip_adapter_family", "f8a1c0e3", "12,779,520"),
    ("08_ip_adapter_family", "12,730,368", "08_ip_adapter_family", "f8a1c0e3", "12,730,368"),
    ("08_ip_adapter_family", "48,354,816", "08_ip_adapter_family", "f8a1c0e3", "48,354,816"),
    ("08_ip_adapter_family", "22,319,616", "08_ip_adapter_family", "f8a1c0e3", "22,319,616"),
    ("08_ip_adapter_family", "44.6", "08_ip_adapter_family", "f8a1c0e3", "44.6"),
    ("08_ip_adapter_family", "702.6", "08_ip_adapter_family", "f8a1c0e3", "702.6"),
    ("08_ip_adapter_family", "698.4", "08_ip_adapter_family", "f8a1c0e3", "698.4"),
    ("08_ip_adapter_family", "847.5", "08_ip_adapter_family", "f8a1c0e3", "847.5"),
    ("08_ip_adapter_family", "703", "08_ip_adapter_family", "f8a1c0e3", "703.0"),
    ("08_ip_adapter_family", "698", "08_ip_adapter_family", "f8a1c0e3", "698.0"),
    ("08_ip_adapter_family", "848", "08_ip_adapter_family", "f8a1c0e3", "848.0"),
    ("08_ip_adapter_family", "257", "08_ip_adapter_family", "f8a1c0e3", "257"),
    ("08_ip_adapter_family", "80", "08_ip_adapter_family", "f8a1c0e3", "80"),
    ("08_ip_adapter_family", "80", "08_ip_adapter_family", "f8a1c0ea", "80"),
    ("08_ip_adapter_family", "20", "08_ip_adapter_family", "f8a1c0ea", "20"),
    ("08_ip_adapter_family", "0.283", "08_ip_adapter_family", "f8a1c0ef", "0.283"),
    ("08_ip_adapter_family", "0.250", "08_ip_adapter_family", "f8a1c0ef", "0.250"),
    ("08_ip_adapter_family", "0.922", "08_ip_adapter_family", "f8a1c0ef", "0.922"),
    ("08_ip_adapter_family", "1.00", "08_ip_adapter_family", "f8a1c0f3", "1.000"),
    ("08_ip_adapter_family", "0.95", "08_ip_adapter_family", "f8a1c0f3", "0.953"),
    ("08_ip_adapter_family", "0.36", "08_ip_adapter_family", "f8a1c0f3", "0.359"),
    ("08_ip_adapter_family", "0.61", "08_ip_adapter_family", "f8a1c0f3", "0.609"),
    ("08_ip_adapter_family", "0.98", "08_ip_adapter_family", "f8a1c0f3", "0.984"),
    ("08_ip_adapter_family", "0.25", "08_ip_adapter_family", "f8a1c0f3", "0.250"),
    ("08_ip_adapter_family", "0.28", "08_ip_adapter_family", "f8a1c0f3", "0.281"),
    ("08_ip_adapter_family", "0.17", "08_ip_adapter_family", "f8a1c0f3", "0.172"),
    ("08_ip_adapter_family", "0.97", "08_ip_adapter_family", "f8a1c0f3", "0.969"),
    ("08_ip_adapter_family", "0.03", "08_ip_adapter_family", "f8a1c0f3", "0.031"),
    ("08_ip_adapter_family", "0.80", "08_ip_adapter_family", "f8a1c0f3", "0.797"),
    ("08_ip_adapter_family", "0.59", "08_ip_adapter_family", "f8a1c0f3", "0.594"),
    ("08_ip_adapter_family", "0.84", "08_ip_adapter_family", "f8a1c0f3", "0.844"),
]


def _cells(notebook: str) -> list[dict]:
    return json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]


def _markdown(notebook: str) -> str:
    return "\n".join("".join(c["source"]) for c in _cells(notebook) if c["cell_type"] == "markdown")


def _output(notebook: str, cell_id: str) -> str | None:
    """The stored text of a code cell's outputs (streams and text/plain), or None if no such cell."""
    for c in _cells(notebook):
        if c.get("id") == cell_id and c["cell_type"] == "code":
            return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                           for o in c.get("outputs", []))
    return None


def _quoted(number: str, text: str) -> bool:
    """`number` in `text` as a whole number: not a piece of a longer one (0.81 is not in 0.812)."""
    return re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d]|[.,]\d)", text) is not None


def _rounds_to(printed: str, quoted: str) -> bool:
    """The printed value, rounded to the quoted number's decimals, is the quoted number."""
    p, q = Decimal(printed.replace(",", "")), Decimal(quoted.replace(",", ""))
    return p.quantize(q, rounding=ROUND_HALF_EVEN) == q or p.quantize(q) == q


@pytest.mark.parametrize("prose, quoted, notebook, cell_id, printed", CLAIMS,
                         ids=[f"{c[0][:2]}-{c[1]}-{c[2][:2]}:{c[3]}" for c in CLAIMS])
def test_a_quoted_number_is_the_stored_output(prose, quoted, notebook, cell_id, printed):
    assert _quoted(quoted, _markdown(prose)), (
        f"notebook {prose}: no markdown cell quotes {quoted} any more; remove its row from tests/test_claims.py "
        "or put the number back")
    output = _output(notebook, cell_id)
    assert output is not None, f"notebook {notebook} has no code cell {cell_id!r} (the source of {quoted} in {prose})"
    assert _quoted(printed, output), (
        f"notebook {prose} quotes {quoted}, but the stored output of cell {cell_id!r} of {notebook} no longer "
        f"prints {printed}: re-read the output and fix the prose (and docs/zh-CN) or this row")
    assert _rounds_to(printed, quoted), f"notebook {prose} quotes {quoted} for {printed} (cell {cell_id!r} of {notebook})"


def test_the_readme_counts_each_notebooks_exercises():
    """README's exercise counts (both editions) are the notebooks' checked exercises."""
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    counts = {}
    for path in sorted(NOTEBOOKS.glob("0*.ipynb")):
        graded = set(re.findall(r'checks\.grade\(\\?"(\w+)', path.read_text()))
        counts.setdefault(len(graded), []).append(str(int(path.name[:2])))
    readme = " ".join((ROOT / "README.md").read_text().split())
    for n, numbers in counts.items():
        listed = numbers[0] if len(numbers) == 1 else ", ".join(numbers[:-1]) + " and " + numbers[-1]
        noun = "notebook" if len(numbers) == 1 else "notebooks"
        assert f"{words[n]} in {noun} {listed}" in readme, (
            f"README.md: notebooks {listed} have {n} exercises each; the Exercises paragraph says otherwise")
