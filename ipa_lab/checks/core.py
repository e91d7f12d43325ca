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

Language. Every message a learner can see is written in both languages with `tr(en, zh)`, picked
when the message is made (so `checks.set_language("zh-CN")` after the import takes effect). The
conventions, for every checker module:

- the verdict line begins ``PASS name: `` / ``FAIL name: `` / ``TODO name: `` in both languages
  (teachers and tests grep it); only what follows the colon is translated;
- a checker writes each CheckFailed / `expect` message, each `what` it gives `expect_shape`,
  `expect_close` or `expect_equal`, and its pass message as ``tr(f"...", f"...")``; code
  identifiers, shapes and numbers stay as they are; the English text is never reworded;
- what a checker expects (said when the checker cannot use an answer) is the first line of its
  docstring; its Chinese version is the docstring's first line that begins with ``中文：``, e.g.::

      @checker
      def latent_shape(fn) -> str:
          '''fn(height, width, vae_config) -> (channels, latent_height, latent_width).

          中文：fn(height, width, vae_config) -> (通道数, 潜变量高, 潜变量宽)。
          ...'''

  (without one, the English line is used in Chinese too);
- a Chinese message that puts a `what` (which may end in a code identifier) before Chinese text
  writes ``zh_word(what)``: it adds the space that Chinese typesetting puts between a Latin word
  and a Chinese one (``proj.weight 的形状``, but ``输出的形状``).

The terms follow docs/glossary.md (图像提示, 解耦交叉注意力, 检查器, 练习 ...; token is not translated).
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


def zh_word(text: str) -> str:
    """`text` before Chinese words: followed by a space when it ends in a Latin character or digit."""
    return f"{text} " if text[-1:].isascii() and not text[-1:].isspace() else text


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
        dtype, shape = str(value.dtype).removeprefix("torch."), tuple(value.shape)
        return tr(f"a tensor of dtype {dtype} and shape {shape}", f"dtype 为 {dtype}、形状为 {shape} 的张量")
    return f"{type(value).__name__} {_short.repr(value)}"


_ZH_DOC = "中文："


def _expected(check) -> str:
    """What the learner's function should do: the first line of the checker's docstring, or in
    Chinese the docstring's first line that begins with "中文：" (see the module's docstring)."""
    lines = [line.strip() for line in (check.__doc__ or "").strip().splitlines()]
    if _language == "zh-CN":
        zh = [line[len(_ZH_DOC):].strip() for line in lines if line.startswith(_ZH_DOC)]
        if zh:
            return zh[0].rstrip("。.")
    if lines and lines[0]:
        return lines[0].rstrip(".")
    return tr("the function the exercise describes", "练习所描述的函数")


def _unusable(check, learner: LearnerFunction, error: Exception) -> str:
    """The verdict when the checker itself raised: the answer could not be used, or a checker bug."""
    if learner.returned is _NOTHING:  # nothing came back yet, so the answer cannot be the cause
        return tr(f"the checker failed before it had an answer from your function ({first_line(error)}); "
                  "this is a bug in ipa_lab.checks, not in your code",
                  f"检查器在拿到你的函数的返回值之前就出错了（{first_line(error)}）；"
                  "这是 ipa_lab.checks 的 bug，不是你的代码的问题")
    return tr(f"your function returned {describe(learner.returned)}, which the checker cannot use "
              f"({first_line(error)}); expected {_expected(check)}",
              f"你的函数返回了 {describe(learner.returned)}，检查器无法使用（{first_line(error)}）；"
              f"期望的是：{_expected(check)}")


_checked: dict[str, tuple] = {}  # exercise name -> (the answer its checker was last given, the verdict line)


def grade(name: str) -> None:
    """The autograded test of an exercise (nbgrader's test cell, after the exercise's cell).

    Passes when the exercise's checker said PASS to the answer the exercise cell gave it (the
    learner's own piece, not the one the notebook carries on with), else raises AssertionError
    with the verdict, so a grade's feedback says what is wrong. Prints nothing."""
    if name not in _checked:
        raise AssertionError(tr(f"{name}: the exercise's cell has not run (it ends with the checker's call); run it first",
                                f"{name}：这个练习的单元格还没有运行（它以检查器的调用结尾）；请先运行它"))
    answer, line = _checked[name]
    if getattr(answer, "__module__", "").startswith("ipa_lab"):
        own = getattr(answer, "__name__", name)
        raise AssertionError(tr(f"FAIL {name}: the checker was given ipa_lab's own {own}, "
                                "not yours: pass it what your cell defines",
                                f"FAIL {name}: 检查器收到的是 ipa_lab 自带的 {own}，不是你的：请传入你的单元格所定义的那个"))
    if not line.startswith("PASS"):
        raise AssertionError(line)


def checker(check=None, *, fallback: str | None = None):
    """Turn `check(fn) -> str` (the pass message; raises CheckFailed) into a verdict printer.

    `fallback` (used by `builds`) names the piece of ipa_lab the notebook uses when the answer
    does not pass (e.g. "ImageProjModel"); the verdict line then says so."""
    if check is None:
        return functools.partial(checker, fallback=fallback)

    @functools.wraps(check)
    def run(fn) -> bool:
        name = check.__name__
        carry_on = (tr(f"the notebook carries on with ipa_lab's {fallback}", f"笔记本继续使用 ipa_lab 的 {fallback}")
                    if fallback else
                    tr("the notebook carries on with ipa_lab's version", "笔记本继续使用 ipa_lab 的版本"))
        then = tr(f"; {carry_on} until yours passes", f"；在你的实现通过之前，{carry_on}") if fallback else ""
        _checked.pop(name, None)  # a new answer: the previous verdict no longer stands

        def print(line):  # every verdict line is also kept, with its answer, for `grade`
            _checked[name] = (fn, line)
            builtins.print(line)

        if not callable(fn):  # e.g. checks.latent_shape(latent_shape(32, 32, cfg))
            print(f"FAIL {name}: " + tr(f"pass your function itself, as in checks.{name}(my_function), "
                                        f"not what it returns (got {describe(fn)})",
                                        f"请传入函数本身，如 checks.{name}(my_function)，而不是它的返回值"
                                        f"（收到的是 {describe(fn)}）"))
            return False
        learner = LearnerFunction(fn)
        try:
            msg = check(learner)
        except NotYetImplemented as e:
            if e.other:  # an earlier exercise's stub, called by this piece
                print(f"TODO {name}: " + tr(f"your code calls {e.other}, which is still the stub; solve that exercise "
                                            f"first ({carry_on})",
                                            f"你的代码调用了 {e.other}，而它还是未实现的占位代码；请先完成那个练习"
                                            f"（{carry_on}）"))
            else:
                print(f"TODO {name}: " + tr(f"not yet implemented ({carry_on})", f"尚未实现（{carry_on}）"))
            return False
        except CheckFailed as e:
            print(f"FAIL {name}: {e}{then}")
            return False
        except LearnerRaised as e:  # the learner's code crashed: say where, briefly
            print(f"FAIL {name}: " + tr(f"your code raised {first_line(e.error)}{then}",
                                        f"你的代码抛出了 {first_line(e.error)}{then}"))
            return False
        except Exception as e:  # the checker stumbled on the answer: not the learner's crash
            print(f"FAIL {name}: {_unusable(check, learner, e)}{then}")
            return False
        if fallback:
            msg = tr(f"{msg.rstrip('.')}. The notebook uses yours from here on.",
                     f"{msg.rstrip('。.')}。从这里开始，笔记本使用你的实现。")
        print(f"PASS {name}: {msg}")
        return True

    return run


def expect(condition: bool, message: str) -> None:
    """Fail the check with `message` unless `condition` holds."""
    if not condition:
        raise CheckFailed(message)


def expect_shape(t, shape, what: str | None = None) -> None:
    """`t` is a tensor of exactly `shape`. `what` names it (already in the learner's language, via
    `tr`); by default "the output"."""
    what = what or tr("the output", "输出")
    expect(isinstance(t, torch.Tensor), tr(f"{what} should be a torch.Tensor, got {type(t).__name__}",
                                           f"{zh_word(what)}应为 torch.Tensor，实际是 {type(t).__name__}"))
    expect(tuple(t.shape) == tuple(shape), tr(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}",
                                              f"{zh_word(what)}的形状是 {tuple(t.shape)}，应为 {tuple(shape)}"))


def expect_close(a: torch.Tensor, b: torch.Tensor, what: str | None = None, atol: float = 1e-5) -> None:
    """`a` has `b`'s shape and its values within `atol`; the message gives the largest difference."""
    what = what or tr("the output", "输出")
    expect_shape(a, b.shape, what)
    diff = (a.detach().float() - b.detach().float()).abs().max().item()
    expect(diff <= atol, tr(f"{what} differs from the expected values by up to {diff:.3g} (allowed {atol:g})",
                            f"{zh_word(what)}与期望值最多相差 {diff:.3g}（允许 {atol:g}）"))


def expect_equal(got, want, what: str) -> None:
    """`got == want`; the message shows both."""
    expect(got == want, tr(f"{what} is {got!r}, expected {want!r}", f"{zh_word(what)}是 {got!r}，应为 {want!r}"))


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
        verdict = checker(check, fallback=name)

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
