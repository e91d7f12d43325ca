"""The skeleton every training run here shares: steps, a progress bar, checkpoints, Ctrl-C.

Two programs train: `ipa_lab.pretrain` (the toy Stable Diffusion, once) and `ipa_lab.trainer`
(IP-Adapter, in every lesson). Both are "for each step: compute a loss, update, and now and then
save everything needed to continue", so that skeleton lives here once:

* `run_steps`: the loop, with a checkpoint every `checkpoint_every` steps, at the end, and when
  the user presses Ctrl-C (the step in hand is finished, then saved: a step cut halfway, its
  update applied to some weights and not to others, could not be resumed exactly);
* `save_state` / `load_state`: a resume state written atomically and read back without
  unpickling arbitrary objects (`weights_only=True`).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import write_atomically


class _DeferredInterrupt:
    """While active, Ctrl-C (SIGINT) only raises a flag that the loop reads between steps.

    Only the main thread can install a signal handler; elsewhere Ctrl-C interrupts as usual."""

    def __enter__(self):
        self.pressed, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame):
        self.pressed = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_steps(start: int, stop: int, step_fn: Callable[[int], float], save_fn: Callable[[int], None],
              checkpoint_every: int, desc: str = "train", progress: bool = True) -> None:
    """Run `step_fn(step)` for step in [start, stop); `save_fn(steps_done)` every
    `checkpoint_every` steps, after the last step, and on Ctrl-C (then KeyboardInterrupt again).

    `progress=False` hides the bar; otherwise tqdm decides (it honours TQDM_DISABLE=1)."""
    bar = tqdm(range(start, stop), initial=start, total=stop, desc=desc, **({} if progress else {"disable": True}))
    done = start
    try:
        with _DeferredInterrupt() as ctrl_c:
            for step in bar:
                loss = step_fn(step)
                done = step + 1
                bar.set_postfix(loss=f"{loss:.4f}")
                if ctrl_c.pressed:
                    raise KeyboardInterrupt
                if done % checkpoint_every == 0 and done != stop:
                    save_fn(done)
    except KeyboardInterrupt:  # pressed during a step (deferred), or raised where no handler could be set
        save_fn(done)
        print(f"interrupted: saved step {done}; continue with --resume", file=sys.stderr)
        raise
    finally:
        bar.close()
    save_fn(done)


def save_state(path: str | os.PathLike, state: dict) -> None:
    """torch.save `state` (tensors, numbers, strings, lists and dicts of them) atomically."""
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a state written by `save_state`; a damaged file or one that carries code is refused
    with a message that names the file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no training state at {path}") from None
    except Exception as e:  # truncated, corrupted, or carrying pickled code
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read the training state {path} ({type(e).__name__}: {first}); "
                         "it is damaged or was not written by ipa_lab") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a training state dict")
    return state
