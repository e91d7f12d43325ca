"""How a checker runs: the verdict printer every exercise checker is wrapped in, and its helpers.

A checker is a function `check(fn) -> str` that calls the learner's `fn` on a few cases, raises
`CheckFailed` with a message for the learner at the first wrong answer, and otherwise returns
the pass message. `checker` turns it into a function that prints one verdict line (PASS, FAIL
or TODO) and returns True or False, never raising, so a notebook always runs to its end.

Who is to blame for an exception matters: "your code raised ValueError" is only true when the
learner's function raised it. So the checker never sees the learner's function itself, only a
`LearnerFunction` around it, which tags what the call raises (`LearnerRaised`, or
`NotYetImplemented` for the stub) and remembers what it returned. Anything else that escapes a
checker was raised by the checker while it worked on that returned value, and the verdict says
so: what the function returned, and what was expected.
"""
from __future__ import annotations

import builtins
import functools
import numbers
import os
import reprlib

import torch


LANGUAGES = ("en", "zh-CN")
_language = "en"


def set_language(language: str) -> None:
    """Print the checkers' verdicts in `language`: "en" (the default) or "zh-CN" (Simplified Chinese).

    The environment variable IPA_LAB_LANG sets it for a whole session (`IPA_LAB_LANG=zh-CN jupyter lab`);
    the words PASS, FAIL and TODO that begin a verdict stay in English in both, so a class can grep them."""
    global _language
    if language not in LANGUAGES:
        raise ValueError(f"language {language!r} is not one of {', '.join(LANGUAGES)}")
    _language = language


def tr(en: str, zh: str) -> str:
    """A message in the learner's language: `en`, or `zh` when set_language("zh-CN") is in force."""
    return zh if _language == "zh-CN" else en


set_language(os.environ.get("IPA_LAB_LANG", "en") or "en")


class CheckFailed(AssertionError):
    """Raised inside a checker with a message for the learner."""


class LearnerRaised(Exception):
    """The learner's function raised `error` (the one case where "your code raised" is true)."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


class NotYetImplemented(Exception):
    """The learner's function is still the stub: it raised NotImplementedError.

    `other` names another of the learner's functions when the stub that raised was that one (an
    earlier exercise the piece calls), not the piece itself."""

    def __init__(self, other: str | None = None):
        super().__init__(other)
        self.other = other


def _own_code(fn) -> set:
    """The code objects of the learner's piece: a function's own, or every method of a class (or
    of an instance's class); decorators such as torch.no_grad are looked through."""
    import inspect

    target = fn if isinstance(fn, type) or inspect.isroutine(fn) else type(fn)
    if isinstance(target, type):
        functions = [inspect.unwrap(v) for v in vars(target).values() if inspect.isroutine(v)]
    else:
        functions = [inspect.unwrap(target)]
    return {f.__code__ for f in functions if hasattr(f, "__code__")}


def _stub_that_raised(fn, error: NotImplementedError) -> str | None:
    """The name of the learner's *other* function whose stub raised `error`, or None when the
    piece's own stub (or code we cannot tell apart) raised it."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if code in _own_code(fn) or tb.tb_frame.f_globals.get("__name__") != "__main__":
        return None
    return code.co_name


_NOTHING = object()  # what a LearnerFunction has returned before its first successful call


class LearnerFunction:
    """The learner's function as checkers call it: exceptions from the call are tagged, results kept.

    Calling it calls the learner's function with the same arguments. An exception raised in that
    call comes out as `LearnerRaised` (or `NotYetImplemented`), so the verdict can tell it apart
    from an exception the checker raises itself; `returned` is the latest value the call returned.
    """

    def __init__(self, fn):
        self.fn = fn
        self.returned = _NOTHING

    def __call__(self, *args, **kwargs):
        try:
            result = self.fn(*args, **kwargs)
        except NotImplementedError as e:
            raise NotYetImplemented(_stub_that_raised(self.fn, e)) from None
        except Exception as e:
            raise LearnerRaised(e) from e
        self.returned = result
        return result


def first_line(error: BaseException) -> str:
    """`ValueError: the first line of its message`: enough to find the bug, no traceback."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


_short = reprlib.Repr()
_short.maxstring, _short.maxother = 60, 60


def describe(value) -> str:
    """A short description of a returned value: dtype and shape for a tensor, else type and repr."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {str(value.dtype).removeprefix('torch.')} and shape {tuple(value.shape)}"
    return f"{type(value).__name__} {_short.repr(value)}"


def _expected(check) -> str:
    """What the learner's function should do: the first line of the checker's docstring."""
    doc = (check.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else "the function the exercise describes"


def _unusable(check, learner: LearnerFunction, error: Exception) -> str:
    """The verdict when the checker itself raised: the answer could not be used, or a checker bug."""
    if learner.returned is _NOTHING:  # nothing came back yet, so the answer cannot be the cause
        return (f"the checker failed before it had an answer from your function ({first_line(error)}); "
                "this is a bug in ipa_lab.checks, not in your code")
    return (f"your function returned {describe(learner.returned)}, which the checker cannot use "
            f"({first_line(error)}); expected {_expected(check)}")


_checked: dict[str, tuple] = {}  # exercise name -> (the answer its checker was last given, the verdict line)


def grade(name: str) -> None:
    """The autograded test of an exercise (nbgrader's test cell, after the exercise's cell).

    Passes when the exercise's checker said PASS to the answer the exercise cell gave it (the
    learner's own piece, not the one the notebook carries on with), else raises AssertionError
    with the verdict, so a grade's feedback says what is wrong. Prints nothing."""
    if name not in _checked:
        raise AssertionError(f"{name}: the exercise's cell has not run (it ends with the checker's call); run it first")
    answer, line = _checked[name]
    if getattr(answer, "__module__", "").startswith("ipa_lab"):
        raise AssertionError(f"FAIL {name}: the checker was given ipa_lab's own {getattr(answer, '__name__', name)}, "
                             "not yours: pass it what your cell defines")
    if not line.startswith("PASS"):
        raise AssertionError(line)


def checker(check=None, *, fallback: str | None = None):
    """Turn `check(fn) -> str` (the pass message; raises CheckFailed) into a verdict printer.

    `fallback` (used by `builds`) names what the notebook uses when the answer does not pass; the
    verdict line then says so."""
    if check is None:
        return functools.partial(checker, fallback=fallback)
    carry_on = "the notebook carries on with " + (fallback or "ipa_lab's version")
    then = f"; {carry_on} until yours passes" if fallback else ""

    @functools.wraps(check)
    def run(fn) -> bool:
        name = check.__name__
        _checked.pop(name, None)  # a new answer: the previous verdict no longer stands

        def print(line):  # every verdict line is also kept, with its answer, for `grade`
            _checked[name] = (fn, line)
            builtins.print(line)

        if not callable(fn):  # e.g. checks.latent_shape(latent_shape(32, 32, cfg))
            print(f"FAIL {name}: pass your function itself, as in checks.{name}(my_function), "
                  f"not what it returns (got {describe(fn)})")
            return False
        learner = LearnerFunction(fn)
        try:
            msg = check(learner)
        except NotYetImplemented as e:
            if e.other:  # an earlier exercise's stub, called by this piece
                print(f"TODO {name}: your code calls {e.other}, which is still the stub; solve that exercise "
                      f"first ({carry_on})")
            else:
                print(f"TODO {name}: not yet implemented ({carry_on})")
            return False
        except CheckFailed as e:
            print(f"FAIL {name}: {e}{then}")
            return False
        except LearnerRaised as e:  # the learner's code crashed: say where, briefly
            print(f"FAIL {name}: your code raised {first_line(e.error)}{then}")
            return False
        except Exception as e:  # the checker stumbled on the answer: not the learner's crash
            print(f"FAIL {name}: {_unusable(check, learner, e)}{then}")
            return False
        if fallback:
            msg = f"{msg.rstrip('.')}. The notebook uses yours from here on."
        print(f"PASS {name}: {msg}")
        return True

    return run


def expect(condition: bool, message: str) -> None:
    """Fail the check with `message` unless `condition` holds."""
    if not condition:
        raise CheckFailed(message)


def expect_shape(t, shape, what: str = "the output") -> None:
    """`t` is a tensor of exactly `shape`."""
    expect(isinstance(t, torch.Tensor), f"{what} should be a torch.Tensor, got {type(t).__name__}")
    expect(tuple(t.shape) == tuple(shape), f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def expect_close(a: torch.Tensor, b: torch.Tensor, what: str = "the output", atol: float = 1e-5) -> None:
    """`a` has `b`'s shape and its values within `atol`; the message gives the largest difference."""
    expect_shape(a, b.shape, what)
    diff = (a.detach().float() - b.detach().float()).abs().max().item()
    expect(diff <= atol, f"{what} differs from the expected values by up to {diff:.3g} (allowed {atol:g})")


def expect_equal(got, want, what: str) -> None:
    """`got == want`; the message shows both."""
    expect(got == want, f"{what} is {got!r}, expected {want!r}")


def as_number(value) -> float | None:
    """`value` as a float if it is one number (an int, a float, a one-element tensor), else None."""
    if isinstance(value, (str, bytes)):  # float("12") works, but a string is not a count
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several numbers raises ValueError
        return None


def as_whole_number(value) -> int | None:
    """`value` as an int if it is a whole number (7, 7.0, tensor(7)), else None (7.5, nan, "7")."""
    if isinstance(value, numbers.Integral):
        return int(value)
    number = as_number(value)
    if number is None or not number.is_integer():  # is_integer() is False for nan and inf
        return None
    return int(number)


def reference(path: str):
    """The object at a dotted path inside ipa_lab, e.g. "projection.ImageProjModel"."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(f"ipa_lab.{module}"), name)


def builds(path: str):
    """For an exercise that builds a piece the notebook goes on to use (a module, a loop).

    `check(piece) -> str` is written as for `checker`. The decorated function prints the verdict
    and returns the piece to use from then on: the learner's own when it passed, otherwise
    ipa_lab's reference at `path` (a dotted path inside ipa_lab), and the verdict line says so. So
    a notebook writes ``ImageProjModel = checks.image_proj_model(ImageProjModel)``, and a student
    copy with the exercise still unsolved runs to its end on the package's version.
    `.passed(piece)` gives the bare True/False verdict (for tests)."""

    def wrap(check):
        name = path.rpartition(".")[2]
        verdict = checker(check, fallback=f"ipa_lab's {name}")

        @functools.wraps(check)
        def run(piece):
            return piece if verdict(piece) else reference(path)

        run.passed = verdict
        run.reference_path = path
        return run

    return wrap


class _LearnerMethod(LearnerFunction):
    """A call on a learner-built object whose result counts as the learner's answer (see learner_code)."""

    def __init__(self, obj, owner: LearnerFunction):
        super().__init__(obj)
        self.owner = owner

    def __call__(self, *args, **kwargs):
        result = super().__call__(*args, **kwargs)
        self.owner.returned = result
        return result


def learner_code(obj, owner: LearnerFunction | None = None) -> LearnerFunction:
    """A learner-built object (a module made by the learner's class) called as learner code.

    For a class exercise, the checker builds the instance through the LearnerFunction around the
    class; calls on that instance go through this wrapper too, so a crash in the learner's
    `forward` reads "your code raised ..." and a stubbed method reads TODO. With `owner` (the
    LearnerFunction around the class), what the call returns becomes the owner's `returned`: a
    verdict about an answer the checker cannot use then describes the forward's output (a tensor),
    not the module that made it."""
    return LearnerFunction(obj) if owner is None else _LearnerMethod(obj, owner)


@functools.lru_cache(maxsize=1)
def toy_pipeline():
    """The shipped toy pipeline, loaded once per process (checkers run again and again in a notebook).

    Shared by every checker: never mutate what it holds; deep-copy a model (`copy.deepcopy`)
    before installing processors in it, freezing it or training it."""
    from ..pipeline import load_pipeline

    return load_pipeline()
