"""Plain-text tables: the one formatter behind every table the notebooks print.

Text, not HTML or a DataFrame, so that a notebook's stored output is a string nbval can compare
and a terminal shows the same thing. Same rows, same string: nothing depends on the screen.

    >>> print(format_table([{"condition": "no prompt", "colour": 0.15625},
    ...                     {"condition": "image only", "colour": 0.96875}]))
    condition   colour
    ----------  ------
    no prompt    0.156
    image only   0.969
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np


def _is_number(value) -> bool:
    """int, float or a numpy number, but not a bool (True is an int in Python, yet not a quantity)."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _cell(value, spec: str | None, digits: int) -> str:
    """One value as text: None -> "-", floats to `digits` decimals, or the column's format spec."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if spec is not None:
        return format(value, spec)
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


def format_table(rows: Sequence[Mapping], digits: int = 3, formats: Mapping[str, str] | None = None,
                 rules: Collection[int] = ()) -> str:
    """An aligned plain-text table of dict rows: text left, numbers right, floats rounded.

    rows: dicts; the columns are their keys in first-seen order, and a missing value or None
        prints as "-".
    digits: decimals for float cells.
    formats: a format spec per column, for values that are not None (e.g. {"parameters": ","}
        prints 1234567 as 1,234,567).
    rules: indices of rows to draw a rule line above, to set sums apart from the rows they add
        up (an index of len(rows) draws one below the last row). The header is always ruled off.
    A column is right-aligned when every value in it is a number (None aside).
    """
    if not rows:
        return "(no rows)"
    stray = next((row for row in rows if not isinstance(row, Mapping)), None)
    if stray is not None:
        hint = " (parameter_table's rows print with ipa_lab.adapter.format_parameter_table)" \
            if type(stray).__name__ == "ParamRow" else ""
        raise TypeError(f"format_table takes rows as dicts (column -> value), got a {type(stray).__name__}{hint}")
    formats = formats or {}
    columns = list(dict.fromkeys(k for row in rows for k in row))
    body = [[_cell(row.get(c), formats.get(c), digits) for c in columns] for row in rows]
    numeric = [all(_is_number(row.get(c)) for row in rows if row.get(c) is not None) for c in columns]
    widths = [max(len(line[i]) for line in [columns, *body]) for i in range(len(columns))]

    def fmt(line) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(line, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(columns), rule]
    for i, line in enumerate(body):
        if i in rules and i > 0:  # above row 0 is the header's rule already
            lines.append(rule)
        lines.append(fmt(line))
    if len(body) in rules:
        lines.append(rule)
    return "\n".join(lines)
