"""Notebook 07, going real: the arithmetic of training at the paper's scale.

Global batch and steps per epoch across processes, and the memory of weights, gradients and AdamW.
"""
from __future__ import annotations

from .core import CheckFailed, as_number, checker, expect


@checker
def global_batch(fn) -> str:
    """fn(per_device_batch, num_processes, dataset_size) -> (global_batch, steps_per_epoch)."""
    cases = [("the paper: 8 GPUs x 8 images, about 10M pairs", (8, 8, 10_000_000), 64, {156_250}),
             ("this course on one CPU: batch 64, 4000 images", (64, 1, 4000), 64, {62, 63}),
             ("4 GPUs x 16 images, 1024 images", (16, 4, 1024), 64, {16}),
             ("2 GPUs x 8 images, 4000 images", (8, 2, 4000), 16, {250})]
    for what, args, want_batch, want_steps in cases:
        got = fn(*args)
        try:
            batch, steps = (int(x) for x in got)
        except (TypeError, ValueError, OverflowError):  # not a pair, or not numbers (inf, nan, text)
            raise CheckFailed(f"return a pair (global_batch, steps_per_epoch), got {got!r}") from None
        expect(batch == want_batch, f"for {what} the global batch is {batch}, expected {want_batch}: every process "
               "takes its own per-device batch at each step, so one step consumes per_device x num_processes images")
        expect(steps != args[2] // args[0] or args[1] == 1, f"for {what} you get {steps:,} steps per epoch: that is "
               "one GPU's count; all processes move through the data together, so divide by the global batch")
        expect(steps in want_steps, f"for {what} you get {steps:,} steps per epoch, expected "
               f"{' or '.join(f'{s:,}' for s in sorted(want_steps))} (dataset_size / global batch)")
    return "global batch = per-device batch x processes; an epoch is dataset_size / global batch steps (156,250 for the paper)."


@checker
def adamw_state_bytes(fn) -> str:
    """fn(num_trainable) -> bytes of AdamW's state for that many fp32 parameters."""
    for n in (22_319_616, 49_087_488, 1000):
        got = fn(n)
        number = as_number(got)
        expect(number is not None, f"return a number, got {got!r}")
        got = number
        want = 8 * n
        expect(got != 4 * n, f"for {n:,} parameters you get {got:,.0f} bytes: that is one fp32 moment; AdamW keeps "
               "two per parameter (exp_avg and exp_avg_sq)")
        expect(got != 16 * n, f"for {n:,} parameters you get {got:,.0f} bytes: that also counts the weights and "
               "the gradients; the optimizer's state is the two moments alone")
        expect(got != 2 * n, f"for {n:,} parameters you get {got:,.0f}: count bytes, not values (fp32 = 4 bytes)")
        expect(abs(got - want) < 0.5, f"for {n:,} parameters you get {got:,.0f} bytes, expected {want:,}")
    return "two fp32 moments per parameter = 8 bytes: 178.6 MB for SD 1.5's 22,319,616 trainable parameters."


# Plausible wrong bills, as formulas of (n_frozen, n_trainable, frozen_bytes), each with what it got wrong.
# A formula is named only when it explains the answers of EVERY case: 12 bytes per trainable
# parameter at 2 frozen bytes fits both "no gradients" and "weights and gradients at 2 bytes".
_WRONG_BILLS = (
    (lambda f, t, b: f * b + 16 * t + 12 * f, "you gave the frozen models gradients and AdamW states: they have "
     "none (requires_grad is False and they are not in the optimizer)"),
    (lambda f, t, b: 16 * (f + t), "you counted every parameter as trainable; only the adapter has gradients and "
     "optimizer state"),
    (lambda f, t, b: f * b + t * (4 + b + 8), "you stored the gradients with frozen_bytes_per_param bytes: the "
     "trainable parameters are fp32, and so are their gradients (4 bytes each, whatever the frozen models use)"),
    (lambda f, t, b: f * b + t * (4 + 2 + 8), "you counted the gradients at 2 bytes: the trainable parameters are "
     "fp32, and so are their gradients (4 bytes each)"),
    (lambda f, t, b: (f + t) * b + t * (b + 8), "you stored the trainable weights and their gradients with "
     "frozen_bytes_per_param bytes: the adapter trains in fp32, so its weights and gradients take 4 bytes each"),
    (lambda f, t, b: f * b + 12 * t, "you left out the trainable weights' gradients (4 bytes each)"),
    (lambda f, t, b: f * b + 8 * t, "the trainable part needs its fp32 weights (4), gradients (4) and two AdamW "
     "moments (8): 16 bytes each"),
    (lambda f, t, b: (f + t) * b, "you left out the gradients and AdamW state of the trainable part"),
)


@checker
def static_training_bytes(fn) -> str:
    """fn(n_frozen, n_trainable, frozen_bytes_per_param) -> bytes of weights, gradients and optimizer state."""
    cases = ((1_700_000_000, 22_319_616, 2), (1_700_000_000, 22_319_616, 4), (1000, 10, 2))
    answers = []
    for args in cases:
        got = fn(*args)
        number = as_number(got)
        expect(number is not None, f"return a number, got {got!r}")
        answers.append(number)
    for args, got in zip(cases, answers):
        n_frozen, n_trainable, frozen_bytes = args
        want = n_frozen * frozen_bytes + 16 * n_trainable
        if abs(got - want) < 0.5:
            continue
        what = f"for {n_frozen:,} frozen ({frozen_bytes} bytes each) and {n_trainable:,} trainable parameters"
        for bill, message in _WRONG_BILLS:
            expect(not all(abs(a - bill(*c)) < 0.5 for c, a in zip(cases, answers)), f"{what} you get {got:,.0f} "
                   f"bytes: {message}")
        raise CheckFailed(f"{what} you get {got:,.0f} bytes, expected {want:,}")
    return "frozen weights x their bytes + 16 bytes per trainable parameter (fp32 weight, gradient, two moments)."
