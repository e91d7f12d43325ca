"""How the checker tests judge a checker: it prints exactly one line (never a traceback) that
starts with PASS, TODO or FAIL and its own name, and returns True only on PASS."""
from __future__ import annotations


def stub(*args, **kwargs):
    raise NotImplementedError("your code here")


def verdict(capsys, checker, answer) -> tuple[bool, str]:
    result = checker(answer)
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one line, no traceback
    return result, out


def assert_pass(capsys, checker, answer):
    ok, out = verdict(capsys, checker, answer)
    assert ok is True and out.startswith(f"PASS {checker.__name__}:"), out


def assert_todo(capsys, checker):
    ok, out = verdict(capsys, checker, stub)
    assert ok is False and out.startswith(f"TODO {checker.__name__}: not yet implemented"), out


def assert_fail(capsys, checker, answer, *fragments):
    ok, out = verdict(capsys, checker, answer)
    assert ok is False and out.startswith(f"FAIL {checker.__name__}:"), out
    for fragment in fragments:
        assert fragment in out, out


def assert_unusable(capsys, checker, answer, *fragments):
    """A FAIL for an answer the checker cannot use: it must not claim the learner's code raised."""
    ok, out = verdict(capsys, checker, answer)
    assert ok is False and out.startswith(f"FAIL {checker.__name__}:"), out
    assert "your code raised" not in out, out
    for fragment in fragments:
        assert fragment in out, out
