"""One setup call for every notebook, script and test: seeds, device, quiet libraries, CPU threads.

Notebooks are re-run by nbval, which compares their stored outputs, so everything that could
make two runs differ (random seeds, progress bars, library warnings) is settled here, once.
"""
from __future__ import annotations

import numbers
import os
import random
import warnings

import numpy as np
import torch


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator with that seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on: the one asked for, else CUDA when present, else the CPU."""
    if device is not None and str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA GPU; use 'cpu' or 'auto'")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet() -> None:
    """Silence the chatter of diffusers and transformers (and progress bars under CI)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()  # "Loading weights" bars: noise on stderr, and they differ run to run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the course never downloads anything
    dlog.disable_progress_bar()
    if os.environ.get("CI"):
        os.environ["TQDM_DISABLE"] = "1"  # our own training bars read this
    warnings.filterwarnings("ignore", category=FutureWarning)


THREADS_VARIABLE = "IPA_LAB_THREADS"


def _thread_count(value, source: str) -> int:
    """`value` as a number of CPU threads, else a ValueError naming `source`.

    The environment gives a string ("2", " 2 "); the `threads` argument must be an int (numpy's
    integers too), not a bool, a float or a string."""
    number = None
    if isinstance(value, str) and source != "threads":
        try:
            number = int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    if number is None or number < 1:
        example, default = (("threads=1", "None") if source == "threads"
                            else (f"{THREADS_VARIABLE}=1", "unset it"))
        raise ValueError(f"{source} is {value!r}; expected a whole number of CPU threads >= 1 (e.g. {example}), "
                         f"or {default} to keep PyTorch's default")
    return number


def set_threads(threads: int | None = None) -> int | None:
    """Set torch's CPU threads: `threads` if given, else the IPA_LAB_THREADS environment variable.

    With neither (or the variable set to an empty string), nothing changes: PyTorch keeps its own
    default, which already follows OMP_NUM_THREADS. Returns the number set, or None."""
    if threads is not None:
        n = _thread_count(threads, "threads")
    else:
        value = os.environ.get(THREADS_VARIABLE, "")
        if not value.strip():
            return None
        n = _thread_count(value, f"the environment variable {THREADS_VARIABLE}")
    torch.set_num_threads(n)
    return n


def setup(seed: int = 0, device: str | None = None, threads: int | None = None) -> torch.device:
    """Seed everything, quiet the libraries, use deterministic kernels, set the CPU threads; return the device.

    `threads` (or, when it is None, the environment variable IPA_LAB_THREADS, a whole number >= 1)
    sets torch's CPU threads with torch.set_num_threads; with neither, PyTorch's default is kept
    (one thread per core, or OMP_NUM_THREADS when that is set). The setting exists for classes:
    on a shared server several kernels run on the same cores, and each one by default starts a
    thread per core, so four kernels on 2 cores run 8 threads that wait on each other. Measured
    with four toy training runs at once on 2 cores: 12.6 times as long as one run with the default
    threads, 2.5 times with one thread each (docs/contention.sh, docs/teaching.md). A bad value
    raises ValueError naming the setting, the value and what is expected."""
    set_threads(threads)
    quiet()
    seed_everything(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, which costs a fifth of a CPU
    # training step here; the kernels we use never read memory they did not write.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return get_device(device)
