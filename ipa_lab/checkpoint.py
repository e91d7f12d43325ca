"""Save and load IP-Adapter weights in the original format, which diffusers loads too.

A checkpoint is two state dicts: {"image_proj": <projection>, "ip_adapter": <adapter_modules>}.
The adapter keys are `{i}.to_k_ip.weight` / `{i}.to_v_ip.weight`, i being the processor's index
in `unet.attn_processors`; weightless processors (self-attention) contribute no key, so the
indices are odd: 1, 3, 5, ...

On disk:
* `.safetensors`: one flat dict, keys prefixed `image_proj.` and `ip_adapter.`. Only tensors,
  so loading can never run code. Preferred.
* `.bin`: `torch.save` of the nested dict (the original's format). Loaded with
  `weights_only=True`, which refuses pickles that would run code.

Files are written atomically: a crash mid-write leaves the previous file, never half a file.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

PARTS = ("image_proj", "ip_adapter")
SUFFIXES = (".safetensors", ".bin")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the modules it is loaded into (keys or shapes differ)."""


def _suffix(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise ValueError(
            f"unknown checkpoint format {path.suffix or '(no suffix)'!r} for {str(path)!r}: "
            f"use one of {', '.join(SUFFIXES)}"
        )
    return path.suffix


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as plain, contiguous CPU tensors (what a file can hold)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def checkpoint_state(image_proj_model: nn.Module, adapter_modules: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The nested checkpoint dict {"image_proj": ..., "ip_adapter": ...} of these modules."""
    return {"image_proj": _tensors(image_proj_model), "ip_adapter": _tensors(adapter_modules)}


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call write(temp_path) on a temp file next to `path`, flush it to disk, rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes the file private, and a writer may re-create it: give it the usual permissions
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows (same directory, same file system)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX only; best effort)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_ip_adapter(path: str | os.PathLike, image_proj_model: nn.Module, adapter_modules: nn.Module) -> Path:
    """Save the image projection and the adapter processors in the original format.

    `.safetensors` -> flat prefixed keys; `.bin` -> torch.save of the nested dict. Returns the path.
    """
    path = Path(path)
    suffix = _suffix(path)
    state = checkpoint_state(image_proj_model, adapter_modules)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{part}.{key}": t for part in PARTS for key, t in state[part].items()}
        write_atomically(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"}))
    else:
        write_atomically(path, lambda tmp: torch.save(state, tmp))
    return path


def _nest(flat: Mapping[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Flat `image_proj.x` / `ip_adapter.y` keys -> the nested dict."""
    state: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    stray = []
    for key, tensor in flat.items():
        part, _, rest = key.partition(".")
        if part in state and rest:
            state[part][rest] = tensor
        else:
            stray.append(key)
    if stray:
        raise ValueError(
            f"{str(path)!r}: {len(stray)} key(s) start with neither 'image_proj.' nor 'ip_adapter.' "
            f"(e.g. {stray[:3]}); this is not an IP-Adapter checkpoint"
        )
    return state


def load_ip_adapter(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read a checkpoint (`.safetensors` or `.bin`) into {"image_proj": {...}, "ip_adapter": {...}}.

    The result is what diffusers' `pipe.load_ip_adapter(state_dict, ...)` accepts as well.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no IP-Adapter checkpoint at {str(path)!r}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return _nest(load_file(str(path), device="cpu"), path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {str(path)!r}: the file holds pickled objects other than tensors, and "
            "unpickling them could run arbitrary code. Only load .bin files you trust, with "
            "torch.load(..., weights_only=False) yourself, and re-save them as .safetensors. "
            f"(torch said: {str(error).splitlines()[0]})"
        ) from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not an IP-Adapter checkpoint dict")
    if all(part in state for part in PARTS):
        return {part: dict(state[part]) for part in PARTS}
    return _nest(state, path)  # a .bin saved with flat, prefixed keys


def _mismatches(part: str, expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a module's state dict and a checkpoint part."""
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [(k, tuple(given[k].shape), tuple(expected[k].shape))
              for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if missing:
        problems.append(f"{part}: missing keys (the model has them, the checkpoint does not): {', '.join(missing)}")
    if unexpected:
        problems.append(f"{part}: unexpected keys (in the checkpoint, not in the model): {', '.join(unexpected)}")
    for key, got, want in shapes:
        problems.append(f"{part}: {key} has shape {got} in the checkpoint, but {want} in the model")
    return problems


def load_into(state: Mapping[str, Mapping[str, torch.Tensor]], image_proj_model: nn.Module,
              adapter_modules: nn.Module) -> None:
    """Copy a checkpoint dict into the projection and the adapter processors, strictly.

    Every key must match in name and shape; otherwise one CheckpointMismatchError lists all
    missing, unexpected and mis-shaped keys (with both shapes) for both parts.
    """
    absent = [part for part in PARTS if part not in state]
    if absent:
        raise CheckpointMismatchError(f"checkpoint has no {' and no '.join(repr(p) for p in absent)} part; "
                                      f"expected the keys {PARTS}")
    modules = {"image_proj": image_proj_model, "ip_adapter": adapter_modules}
    problems = [p for part in PARTS for p in _mismatches(part, modules[part].state_dict(), state[part])]
    if problems:
        raise CheckpointMismatchError("the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    for part in PARTS:
        modules[part].load_state_dict(dict(state[part]), strict=True)
