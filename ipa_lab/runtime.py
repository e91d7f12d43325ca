"""One setup call for every notebook, script and test: seeds, device, quiet libraries.

Notebooks are re-run by nbval, which compares their stored outputs, so everything that could
make two runs differ (random seeds, progress bars, library warnings) is settled here, once.
"""
from __future__ import annotations

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


def setup(seed: int = 0, device: str | None = None) -> torch.device:
    """Seed everything, quiet the libraries, use deterministic kernels; return the device."""
    quiet()
    seed_everything(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, which costs a fifth of a CPU
    # training step here; the kernels we use never read memory they did not write.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return get_device(device)
