"""The exercise checkers of notebook 09 (which layers matter): PASS for the right answer, TODO for
the stub, FAIL naming each plausible mistake; and the same verdicts in Chinese."""
from __future__ import annotations

import re

import pytest

from ipa_lab import checks
from verdicts import assert_fail, assert_pass, assert_todo, assert_unusable, stub

CJK = re.compile(r"[\u4e00-\u9fff]")
ENGLISH = re.compile(r"\b(the|your|you|expected|should|return|got|with|before|after)\b")


def only_layers_solution(layers):
    spec = {}
    for name in layers:
        parts = name.split(".")
        if parts[0] == "mid_block":
            spec["mid"] = 1.0
            continue
        side = "down" if parts[0] == "down_blocks" else "up"
        values = spec.setdefault(side, {}).setdefault(f"block_{parts[1]}", [0.0] * (1 if side == "down" else 2))
        values[int(parts[3])] = 1.0
    return spec


def one_number_per_block(layers):  # turns on both attentions of an up block
    spec = {}
    for name in layers:
        parts = name.split(".")
        if parts[0] == "mid_block":
            spec["mid"] = 1.0
        else:
            spec.setdefault("down" if parts[0] == "down_blocks" else "up", {})[f"block_{parts[1]}"] = 1.0
    return spec


def module_paths(layers):
    return {name.rsplit(".attentions.", 1)[0]: 1.0 for name in layers}


def bare_indices(layers):
    spec = only_layers_solution(layers)
    return {side: ({k.replace("block_", ""): v for k, v in inner.items()} if isinstance(inner, dict) else inner)
            for side, inner in spec.items()}


def three_per_up_block(layers):  # SD 1.5's count, not the toy's
    spec = only_layers_solution(layers)
    for inner in spec.get("up", {}).values():
        inner.append(0.0)
    return spec


def half_scale(layers):
    spec = only_layers_solution(layers)
    return {**spec, "mid": 0.5} if "mid" in spec else spec


def layers_for_solution(rows, attribute, threshold):
    return [r["layers"] for r in rows if r["kind"] == "layer" and r["condition"] == "image only"
            and r[attribute] >= threshold]


def with_blocks(rows, attribute, threshold):
    return [r["layers"] for r in rows if r["condition"] == "image only" and r[attribute] >= threshold]


def every_condition(rows, attribute, threshold):
    return [r["layers"] for r in rows if r["kind"] == "layer" and r[attribute] >= threshold]


def strictly_above(rows, attribute, threshold):
    return [r["layers"] for r in rows if r["kind"] == "layer" and r["condition"] == "image only"
            and r[attribute] > threshold]


CASES = {
    "only_layers": (only_layers_solution, [(one_number_per_block, "a list with one scale per attention"),
                                           (module_paths, "module paths"), (bare_indices, "'block_<i>'"),
                                           (three_per_up_block, "expected 2 scales in its list"), (half_scale, "other than 0 or 1")]),
    "layers_for": (layers_for_solution, [(with_blocks, "kind 'layer'"), (every_condition, "'image only' rows"),
                                         (strictly_above, "'at least' is >=")]),
}


@pytest.mark.parametrize("name", CASES)
def test_pass_and_todo(capsys, name):
    check = getattr(checks, name)
    assert_pass(capsys, check, CASES[name][0])
    assert_todo(capsys, check)


@pytest.mark.parametrize("name, wrong, fragment", [(n, w, f) for n, (_, ws) in CASES.items() for w, f in ws],
                         ids=lambda x: getattr(x, "__name__", str(x))[:30])
def test_each_mistake_is_named(capsys, name, wrong, fragment):
    assert_fail(capsys, getattr(checks, name), wrong, fragment)


def test_unusable_answers(capsys):
    assert_unusable(capsys, checks.only_layers, lambda layers: [1.0] * 7, "return a dict")
    assert_unusable(capsys, checks.layers_for, lambda rows, a, t: 3, "return a list")


@pytest.fixture
def zh():
    checks.set_language("zh-CN")
    yield
    checks.set_language("en")


@pytest.mark.parametrize("name", CASES)
def test_chinese_verdicts(capsys, zh, name):
    check = getattr(checks, name)
    answers = [(CASES[name][0], "PASS"), (stub, "TODO")] + [(w, "FAIL") for w, _ in CASES[name][1]]
    for answer, word in answers:
        ok = check(answer)
        out = capsys.readouterr().out.rstrip("\n")
        assert out.startswith(f"{word} {name}: ") and ok is (word == "PASS"), out
        rest = out[len(f"{word} {name}: "):]
        if word != "TODO":
            assert CJK.search(rest) and not ENGLISH.search(rest), out


def test_docstrings_have_a_chinese_line():
    for name in CASES:
        assert "中文：" in getattr(checks, name).__doc__
