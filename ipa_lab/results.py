"""The seeded commands' results: tables of measurements as CSV files, written and read back.

Every experiment command (`ipa_lab.ablation`, `ipa_lab.blocks`, `ipa_lab.recognition`,
`ipa_lab.train_faceid`, `ipa_lab.family`) writes its table with `write_csv`, and the notebooks
read the shipped files with `read_csv`: numbers come back as numbers, an empty cell as None.
"""
from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path, rows: list[dict], digits: int = 4) -> Path:
    """Rows -> a CSV, written atomically (a crash leaves the old file): columns in first-seen order,
    floats rounded to `digits` decimals (the measurements are no finer), None as an empty cell."""
    from .checkpoint import write_atomically  # here, not above: reading a CSV should not load torch

    path = Path(path)
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows({k: round(v, digits) if isinstance(v, float) else v for k, v in r.items()} for r in rows)

    write_atomically(path, write)
    return path


def read_csv(path) -> list[dict]:
    """A CSV written by `write_csv`: ints and floats as numbers, an empty cell as None, the rest as text."""
    def value(text: str):
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]
