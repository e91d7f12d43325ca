"""One plain-text table formatter: the strings the notebooks print stay exactly what they were.

The expected tables below were printed by the two formatters this one replaced (the evaluation's
dict tables and the parameter table), or are copied from the stored outputs of notebooks 03-06:
nbval compares those outputs character for character.
"""
from __future__ import annotations

import numpy as np
import pytest

from ipa_lab.adapter import ParamRow, format_parameter_table
from ipa_lab.tables import format_table


def test_format_table_is_deterministic_and_aligned():
    rows = [{"condition": "no prompt", "colour": 0.15625, "clip_i": None},
            {"condition": "image only", "colour": 0.96875, "clip_i": 0.8123456, "n": 64}]
    table = format_table(rows)
    assert table == format_table([dict(r) for r in rows])
    assert table.splitlines() == [
        "condition   colour  clip_i   n",
        "----------  ------  ------  --",
        "no prompt    0.156       -   -",
        "image only   0.969   0.812  64",
    ]
    assert format_table(rows, digits=2).splitlines()[3].split()[2] == "0.97"


# The evaluation table of notebook 05 (its stored output), from the scores behind it.
NOTEBOOK_05_TABLE = """\
condition     colour  shape  position   size  clip_i  clip_t
------------  ------  -----  --------  -----  ------  ------
no prompt      0.219  0.562     0.250  0.469   0.060   0.058
text only      1.000  0.969     1.000  1.000   0.976   0.978
image only     1.000  0.969     1.000  1.000   0.969   0.960
text + image   1.000  0.844     1.000  1.000   0.971   0.970"""

NOTEBOOK_05_ROWS = [
    {"condition": "no prompt", "colour": 0.21875, "shape": 0.5625, "position": 0.25, "size": 0.46875,
     "clip_i": 0.0601, "clip_t": 0.0583},
    {"condition": "text only", "colour": 1.0, "shape": 0.96875, "position": 1.0, "size": 1.0,
     "clip_i": 0.9762, "clip_t": 0.9781},
    {"condition": "image only", "colour": 1.0, "shape": 0.96875, "position": 1.0, "size": 1.0,
     "clip_i": 0.9691, "clip_t": 0.9604},
    {"condition": "text + image", "colour": 1.0, "shape": 0.84375, "position": 1.0, "size": 1.0,
     "clip_i": 0.971, "clip_t": 0.9704},
]

# Notebook 06 mixes text, ints and floats in one table.
NOTEBOOK_06_TABLE = """\
adapter                     tokens  colour  shape  position   size
--------------------------  ------  ------  -----  --------  -----
base (the shipped adapter)       4   1.000  0.969     1.000  1.000
plus (this run, 110 steps)      16   0.531  0.531     0.219  0.469
plus (the shipped adapter)      16   1.000  0.844     0.875  0.969"""

NOTEBOOK_06_ROWS = [
    {"adapter": "base (the shipped adapter)", "tokens": 4, "colour": 1.0, "shape": 0.96875, "position": 1.0,
     "size": 1.0},
    {"adapter": "plus (this run, 110 steps)", "tokens": 16, "colour": 0.53125, "shape": 0.53125,
     "position": 0.21875, "size": 0.46875},
    {"adapter": "plus (the shipped adapter)", "tokens": 16, "colour": 1.0, "shape": 0.84375, "position": 0.875,
     "size": 0.96875},
]


@pytest.mark.parametrize("rows, expected", [(NOTEBOOK_05_ROWS, NOTEBOOK_05_TABLE),
                                             (NOTEBOOK_06_ROWS, NOTEBOOK_06_TABLE)], ids=["05", "06"])
def test_the_notebooks_tables_print_as_stored(rows, expected):
    assert format_table(rows) == expected


def test_numpy_values_bools_and_missing_cells_print_as_before():
    rows = [{"adapter": "base (the shipped adapter)", "tokens": 4, "colour": np.float64(1.0), "ok": np.bool_(True),
             "note": None},
            {"adapter": "plus", "tokens": 16, "colour": np.float32(0.53125), "ok": False, "extra": 12345,
             "n": np.int64(7)}]
    assert format_table(rows) == (
        "adapter                     tokens  colour  ok     note  extra  n\n"
        "--------------------------  ------  ------  -----  ----  -----  -\n"
        "base (the shipped adapter)       4   1.000  True      -      -  -\n"
        "plus                            16   0.531  False     -  12345  7")
    assert format_table([]) == "(no rows)"


def test_formats_and_rules():
    rows = [{"what": "a", "n": 1234}, {"what": "b", "n": 5}, {"what": "sum", "n": 1239}]
    assert format_table(rows, formats={"n": ","}, rules={0, 2, 3}).splitlines() == [
        "what      n", "----  -----", "a     1,234", "b         5", "----  -----", "sum   1,239", "----  -----"]


# Notebook 03's parameter table of the toy model (its stored output), from the rows behind it.
NOTEBOOK_03_TABLE = """\
component         block                   width  layers  parameters  trainable
----------------  ----------------------  -----  ------  ----------  ---------
image projection  ImageProjModel              -       -       8,576      8,576
adapter           down_blocks.0              64       1       8,192      8,192
adapter           down_blocks.1             128       1      16,384     16,384
adapter           mid_block                 128       1      16,384     16,384
adapter           up_blocks.1               128       2      32,768     32,768
adapter           up_blocks.2                64       2      16,384     16,384
adapter           no weights (self-attn)      -       7           0          0
----------------  ----------------------  -----  ------  ----------  ---------
adapter           all blocks                  -       7      90,112     90,112
----------------  ----------------------  -----  ------  ----------  ---------
backbone          unet                        -       -   5,835,012          0
backbone          vae                         -       -     954,567          0
backbone          text_encoder                -       -     157,952          0
backbone          image_encoder               -       -     159,552          0
----------------  ----------------------  -----  ------  ----------  ---------
total                                         -       -   7,205,771     98,688"""

NOTEBOOK_03_ROWS = [
    ParamRow("image projection", "ImageProjModel", None, None, 8_576, 8_576),
    ParamRow("adapter", "down_blocks.0", 64, 1, 8_192, 8_192),
    ParamRow("adapter", "down_blocks.1", 128, 1, 16_384, 16_384),
    ParamRow("adapter", "mid_block", 128, 1, 16_384, 16_384),
    ParamRow("adapter", "up_blocks.1", 128, 2, 32_768, 32_768),
    ParamRow("adapter", "up_blocks.2", 64, 2, 16_384, 16_384),
    ParamRow("adapter", "no weights (self-attn)", None, 7, 0, 0),
    ParamRow("adapter", "all blocks", None, 7, 90_112, 90_112, kind="subtotal"),
    ParamRow("backbone", "unet", None, None, 5_835_012, 0),
    ParamRow("backbone", "vae", None, None, 954_567, 0),
    ParamRow("backbone", "text_encoder", None, None, 157_952, 0),
    ParamRow("backbone", "image_encoder", None, None, 159_552, 0),
    ParamRow("total", "", None, None, 7_205_771, 98_688, kind="total"),
]


def test_the_parameter_table_prints_as_stored():
    assert format_parameter_table(NOTEBOOK_03_ROWS) == NOTEBOOK_03_TABLE


def test_parameter_rows_are_not_dict_rows():
    with pytest.raises(TypeError, match="takes rows as dicts.*got a ParamRow.*format_parameter_table"):
        format_table(NOTEBOOK_03_ROWS)
