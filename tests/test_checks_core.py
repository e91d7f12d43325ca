"""The verdict printer: who is blamed for an exception, and what a verdict says about the answer.

"your code raised" is only said when the learner's function raised; an answer the checker cannot
work with is described (what came back, what was expected) instead."""
from __future__ import annotations

import torch

from ipa_lab import checks
from ipa_lab.checks.core import as_number, as_whole_number, checker, describe, expect
from verdicts import assert_fail, assert_pass, assert_todo, assert_unusable


@checker
def double(fn) -> str:
    """fn(x) -> 2 * x, as an int."""
    got = fn(21)
    value = int(got)  # the checker's own conversion: it raises on an unusable answer
    expect(value == 42, f"double(21) gave {value}, expected 42")
    return "twice the input."


@checker
def broken(fn) -> str:
    """fn() -> anything."""
    raise KeyError("a bug in the checker")


def test_pass_todo_and_a_wrong_value(capsys):
    assert_pass(capsys, double, lambda x: 2 * x)
    assert_todo(capsys, double)
    assert_fail(capsys, double, lambda x: x + 1, "double(21) gave 22, expected 42")


def test_an_exception_in_the_learners_function_is_theirs(capsys):
    def crashes(x):
        raise ValueError("boom\nsecond line")

    assert_fail(capsys, double, crashes, "your code raised ValueError: boom")
    assert_fail(capsys, checks.latent_shape, lambda h, w, c: h / 0, "your code raised ZeroDivisionError")


def test_an_answer_the_checker_cannot_use_is_described_not_blamed_on_the_learner(capsys):
    assert_unusable(capsys, double, lambda x: "forty-two", "returned str 'forty-two'",
                    "expected fn(x) -> 2 * x, as an int",
                    "ValueError")  # the checker's own error, kept as a clue


def test_a_checker_bug_before_any_answer_says_so(capsys):
    assert_unusable(capsys, broken, lambda: None, "bug in ipa_lab.checks, not in your code")


def test_a_not_implemented_error_of_the_checker_itself_is_not_a_todo(capsys):
    @checker
    def unfinished(fn) -> str:
        """fn(x) -> x."""
        fn(1)
        raise NotImplementedError("the checker's own")

    assert_unusable(capsys, unfinished, lambda x: x, "returned int 1")


def test_passing_the_result_instead_of_the_function(capsys):
    assert_fail(capsys, checks.latent_shape, (4, 8, 8), "pass your function itself", "tuple (4, 8, 8)")


def test_a_float64_tensor_where_float32_is_compared(capsys):
    assert_unusable(capsys, checks.guidance, lambda u, c, w: (u + w * (c - u)).double(),
                    "dtype float64 and shape (2, 4, 8, 8)", "expected fn(noise_uncond, noise_cond")


def test_describe_and_number_conversions():
    assert describe(torch.zeros(2, 3, dtype=torch.int64)) == "a tensor of dtype int64 and shape (2, 3)"
    assert describe(("4", "x")) == "tuple ('4', 'x')"
    assert len(describe("x" * 1000)) < 80
    assert [as_whole_number(v) for v in (7, 7.0, torch.tensor(7), 7.5, float("nan"), float("inf"), "7", None)] == \
        [7, 7, 7, None, None, None, None, None]
    assert [as_number(v) for v in (2, 2.5, torch.tensor(2.5), torch.ones(2), "2", None)] == [2, 2.5, 2.5, None, None, None]



def test_a_stub_of_an_earlier_exercise_is_named_not_blamed_on_this_one(capsys):
    """A piece that calls an earlier exercise still left as the stub gets a TODO that names that
    exercise (a notebook's functions live in __main__), not "not yet implemented" for itself."""
    namespace = {"__name__": "__main__"}
    exec("def guidance(u, c, w):\n    raise NotImplementedError('your code here')\n\n"
         "def twice(x):\n    return 2 * guidance(x, x, 1)\n\n"
         "def own_stub(x):\n    raise NotImplementedError('your code here')\n", namespace)
    assert double(namespace["twice"]) is False
    out = capsys.readouterr().out
    assert out.startswith("TODO double: your code calls guidance, which is still the stub"), out
    assert double(namespace["own_stub"]) is False
    assert capsys.readouterr().out.startswith("TODO double: not yet implemented"), out


def test_grade_checks_the_learners_own_answer_again_and_says_why_it_fails(capsys):
    """nbgrader's test cell: silent on PASS; otherwise AssertionError carrying the verdict. It
    re-checks what the exercise cell passed (a build exercise's cell rebinds the name to the
    fallback after a FAIL), and refuses ipa_lab's own piece passed off as the learner's."""
    import pytest

    from ipa_lab.checks import grade
    from ipa_lab.projection import ImageProjModel

    double(lambda x: 2 * x)
    capsys.readouterr()
    grade("double")
    assert capsys.readouterr().out == ""  # a test cell that passes prints nothing
    double(lambda x: x + 1)
    with pytest.raises(AssertionError, match="FAIL double: double\\(21\\) gave 22, expected 42"):
        grade("double")
    checks.image_proj_model(ImageProjModel)
    with pytest.raises(AssertionError, match="given ipa_lab's own ImageProjModel"):
        grade("image_proj_model")
    with pytest.raises(AssertionError, match="has not run"):
        grade("no_such_exercise")
