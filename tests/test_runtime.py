"""runtime.setup: the CPU threads come from the `threads` argument, else IPA_LAB_THREADS, else PyTorch.

Every test restores what setup() changes process-wide (torch's thread count, deterministic mode,
the random states), so the tests after these run as before.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ipa_lab.runtime import THREADS_VARIABLE, set_threads, setup


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch):
    """No IPA_LAB_THREADS from the caller's shell; torch threads, deterministic mode and RNGs put back after."""
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)


def _start_from(n: int) -> None:
    """A thread count that is not what setup would pick by itself, so 'unchanged' can be seen."""
    torch.set_num_threads(n)
    assert torch.get_num_threads() == n


def test_without_argument_or_variable_pytorch_keeps_its_threads():
    _start_from(3)
    assert setup(seed=0, device="cpu") == torch.device("cpu")
    assert torch.get_num_threads() == 3


def test_an_empty_variable_counts_as_unset(monkeypatch):
    _start_from(3)
    monkeypatch.setenv(THREADS_VARIABLE, " ")
    setup(seed=0, device="cpu")
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("value, want", [("1", 1), ("2", 2), (" 2\n", 2)])
def test_the_variable_sets_the_threads(monkeypatch, value, want):
    _start_from(3)
    monkeypatch.setenv(THREADS_VARIABLE, value)
    setup(seed=0, device="cpu")
    assert torch.get_num_threads() == want


def test_the_argument_wins_over_the_variable(monkeypatch):
    _start_from(3)
    monkeypatch.setenv(THREADS_VARIABLE, "2")
    setup(seed=0, device="cpu", threads=1)
    assert torch.get_num_threads() == 1


def test_the_argument_is_used_when_the_variable_is_bad(monkeypatch):
    """The variable is read only when no argument is given."""
    _start_from(3)
    monkeypatch.setenv(THREADS_VARIABLE, "many")
    setup(seed=0, device="cpu", threads=2)
    assert torch.get_num_threads() == 2


def test_numpy_integers_are_whole_numbers():
    _start_from(3)
    assert set_threads(np.int64(2)) == 2
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "2 threads"])
def test_a_bad_variable_is_refused_with_its_name_and_value(monkeypatch, value):
    _start_from(3)
    monkeypatch.setenv(THREADS_VARIABLE, value)
    with pytest.raises(ValueError) as error:
        setup(seed=0, device="cpu")
    message = str(error.value)
    assert THREADS_VARIABLE in message and repr(value) in message and ">= 1" in message, message
    assert torch.get_num_threads() == 3  # refused before anything changed


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_a_bad_argument_is_refused(value):
    _start_from(3)
    with pytest.raises(ValueError) as error:
        setup(seed=0, device="cpu", threads=value)
    message = str(error.value)
    assert message.startswith(f"threads is {value!r}") and ">= 1" in message, message
    assert torch.get_num_threads() == 3
