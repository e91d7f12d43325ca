"""How a checker runs: the verdict printer every exercise checker is wrapped in, and its helpers.

A checker is a function `check(fn) -> str` that calls the learner's `fn` on a few cases, raises
`CheckFailed` with a message for the learner at the first wrong answer, and otherwise returns
the pass message. `checker` turns it into a function that prints one verdict line (PASS, FAIL
or TODO) and returns True or False, never raising, so a notebook always runs to its end.
"""
from __future__ import annotations

import functools

import torch


class CheckFailed(AssertionError):
    """Raised inside a checker with a message for the learner."""


def checker(fn):
    """Turn `fn(answer) -> str` (the pass message; raises CheckFailed) into a verdict printer."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> bool:
        name = fn.__name__
        try:
            msg = fn(*args, **kwargs)
        except NotImplementedError:
            print(f"TODO {name}: not yet implemented (the notebook carries on with ipa_lab's version)")
            return False
        except CheckFailed as e:
            print(f"FAIL {name}: {e}")
            return False
        except Exception as e:  # the learner's code crashed: say where, briefly
            print(f"FAIL {name}: your code raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return False
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
