"""Save, read and load IP-Adapter weights in the original format, which diffusers loads too.

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
A file that cannot be read (empty, truncated, not a checkpoint) is refused with a message that
names the file and what is wrong with it.

The way in, step by step:
* `load_ip_adapter(path)`: a file -> the nested dict;
* `read_checkpoint(checkpoint)`: a path, the nested dict or a flat prefixed dict -> the nested dict;
* `image_proj_from_state_dict(state)`: build the projection a checkpoint describes (its sizes
  are written in its tensors' shapes) and load it;
* `load_into(state, image_proj_model, adapter_modules)`: copy a checkpoint into modules you
  built, strictly (one error lists every missing, unexpected or mis-shaped key).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .projection import ImageProjModel, Resampler, num_tokens_of

PARTS = ("image_proj", "ip_adapter")
SUFFIXES = (".safetensors", ".bin")
# The head width every IP-Adapter Plus checkpoint uses; a checkpoint stores heads * dim_head
# (the rows of to_q) but not the split, so loaders (diffusers' included) assume 64.
DIM_HEAD = 64


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the modules it is loaded into (keys, shapes or token counts
    differ), or its keys are not laid out as an IP-Adapter checkpoint's."""


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


# ---------------------------------------------------------------------------------------------
# Reading: a file, or a dict in either layout, -> {"image_proj": {...}, "ip_adapter": {...}}
# ---------------------------------------------------------------------------------------------
def _nest(flat: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Flat `image_proj.x` / `ip_adapter.y` keys -> the nested dict; `source` names where they came from."""
    state: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    stray = []
    for key, tensor in flat.items():
        part, _, rest = key.partition(".")
        if part in state and rest:
            state[part][rest] = tensor
        else:
            stray.append(key)
    if stray:
        raise CheckpointMismatchError(
            f"{source}: {len(stray)} key(s) belong to neither part (e.g. {stray[:3]}); this is not an IP-Adapter "
            "checkpoint: expected {'image_proj': {...}, 'ip_adapter': {...}} or flat keys 'image_proj.*' / "
            "'ip_adapter.*'"
        )
    empty = [part for part in PARTS if not state[part]]
    if empty:
        raise CheckpointMismatchError(f"{source}: the checkpoint has no {' and no '.join(map(repr, empty))} part; "
                                      f"expected keys starting with {', '.join(p + '.' for p in PARTS)}")
    return state


def _as_nested(state: Mapping, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Either layout (nested parts, or flat prefixed keys) -> the nested dict, parts copied."""
    if all(part in state for part in PARTS):
        return {part: dict(state[part]) for part in PARTS}
    return _nest(state, source)


def _safetensors_damage(path: Path, size: int, head: bytes) -> str:
    """What is wrong with a .safetensors file. The format: 8 bytes (little-endian) giving the
    header's length n, n bytes of JSON (each tensor's dtype, shape and byte range), the tensors."""
    if size < 8:
        return f"not a safetensors file: {size} bytes, fewer than the 8 that give the header's length; the file is truncated"
    n = int.from_bytes(head[:8], "little")
    if n > size - 8:
        return (f"not a safetensors file: its first 8 bytes announce a {n:,}-byte header, but only {size - 8:,} "
                f"bytes follow (the file starts with {head[:16]!r}); the file is truncated or not a checkpoint")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        return f"not a safetensors file: the header is not a JSON object (it starts with {raw[:24]!r}); not a checkpoint"
    need = max((end for v in header.values() if isinstance(v, dict) for end in v.get("data_offsets", [0])), default=0)
    if 8 + n + need > size:
        return f"the tensors need {need:,} bytes after the header, but the file has {size - 8 - n:,}: the file is truncated"
    return "the safetensors header looks whole, but the tensors cannot be read; the file is corrupt"


def _torch_save_damage(path: Path, size: int, head: bytes) -> str:
    """What is wrong with a .bin file: torch.save writes a ZIP archive (a pickle in older versions)."""
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):  # the archive's directory sits at its very end
            return f"a torch.save archive (ZIP) without its end (no central directory): the file is truncated ({size:,} bytes)"
        return "a ZIP archive, but not one torch.save wrote, or a damaged one"
    if head[:1] == b"\x80":  # the pickle protocol marker: torch.save's legacy format
        return f"a pickle that ends too early or is damaged ({size:,} bytes): the file is truncated or corrupt"
    return (f"not a torch.save file: it starts with {head[:16]!r}, neither a ZIP archive (torch.save's format) "
            "nor a pickle; the file is corrupt or not a checkpoint")


def _damage(path: Path, suffix: str) -> str:
    """Why a checkpoint file that failed to load cannot be one, read from its bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        return "the file is empty (0 bytes): the write or the download did not finish"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the checkpoint itself: fetch the file with `git lfs pull`"
    if suffix == ".safetensors":
        return _safetensors_damage(path, size, head)
    return _torch_save_damage(path, size, head)


def _refused_code(error: Exception) -> bool:
    """Did weights_only refuse a pickle because it names a function or class (which could run code)?"""
    return isinstance(error, pickle.UnpicklingError) and "GLOBAL" in str(error)


def load_ip_adapter(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read a checkpoint (`.safetensors` or `.bin`) into {"image_proj": {...}, "ip_adapter": {...}}.

    The result is what diffusers' `pipe.load_ip_adapter(state_dict, ...)` accepts as well.
    A file that cannot be read raises a ValueError naming the file and what is wrong with it.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no IP-Adapter checkpoint at {str(path)!r}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the libraries' own errors say little about the file: diagnose it
        if _refused_code(error):
            raise ValueError(
                f"refusing to load {str(path)!r}: the file holds pickled objects other than tensors, and "
                "unpickling them could run arbitrary code. Only load .bin files you trust, with "
                "torch.load(..., weights_only=False) yourself, and re-save them as .safetensors. "
                f"(torch said: {str(error).splitlines()[0]})"
            ) from error
        # The library's own error stays attached (`from error`), for the curious.
        raise ValueError(f"cannot read the IP-Adapter checkpoint {str(path)!r}: {_damage(path, suffix)}") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not an IP-Adapter checkpoint dict")
    return _as_nested(state, repr(str(path)))  # a .bin may hold either layout


def read_checkpoint(checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint in any form -> the nested dict {"image_proj": {...}, "ip_adapter": {...}}.

    Accepts a `.safetensors`/`.bin` path (read with `load_ip_adapter`), the nested dict itself,
    or a flat dict with `image_proj.` / `ip_adapter.` prefixed keys (a safetensors file's layout).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        return load_ip_adapter(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a checkpoint path or dict, got {type(checkpoint).__name__}")
    return _as_nested(checkpoint, "the checkpoint dict")


# ---------------------------------------------------------------------------------------------
# Loading into modules, strictly
# ---------------------------------------------------------------------------------------------
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


def _token_mismatch(image_proj_model: nn.Module, adapter_modules: nn.Module) -> list[str]:
    """Projection and processors must agree on the number of image tokens.

    Nothing in the weights' shapes says so (to_k_ip is as wide for 4 tokens as for 16), so a base
    checkpoint loaded into processors built for 16 tokens would run, cut [text; image] at the
    wrong place, and draw wrong images without an error.
    """
    try:
        tokens = num_tokens_of(image_proj_model)
    except TypeError:  # a projection we do not know: nothing to compare
        return []
    counts = sorted({m.num_tokens for m in adapter_modules.modules() if isinstance(getattr(m, "num_tokens", None), int)})
    if not counts or counts == [tokens]:
        return []
    return [f"num_tokens: the projection makes {tokens} image tokens, but the processors take the last "
            f"{' or '.join(map(str, counts))} as the image (IPAttnProcessor.num_tokens); install them with "
            f"install_ip_adapter(unet, num_tokens={tokens})"]


def _strict_problems(parts: Mapping[str, tuple[nn.Module, Mapping[str, torch.Tensor]]]) -> list[str]:
    """Every key and shape difference between each part's module and its state dict."""
    return [p for part, (module, state) in parts.items() for p in _mismatches(part, module.state_dict(), state)]


def _load_checked(parts: Mapping[str, tuple[nn.Module, Mapping[str, torch.Tensor]]], problems: list[str]) -> None:
    """All problems in one error and nothing loaded, or every (module, state) loaded strictly."""
    if problems:
        raise CheckpointMismatchError("the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    for module, state in parts.values():
        module.load_state_dict(dict(state), strict=True)


def load_into(state: Mapping[str, Mapping[str, torch.Tensor]], image_proj_model: nn.Module,
              adapter_modules: nn.Module) -> None:
    """Copy a checkpoint dict into the projection and the adapter processors, strictly.

    Every key must match in name and shape, and the processors must take as many image tokens
    as the projection makes; otherwise one CheckpointMismatchError lists every missing,
    unexpected and mis-shaped key (with both shapes) for both parts, and nothing is loaded.
    """
    absent = [part for part in PARTS if part not in state]
    if absent:
        raise CheckpointMismatchError(f"checkpoint has no {' and no '.join(repr(p) for p in absent)} part; "
                                      f"expected the keys {PARTS}")
    parts = {"image_proj": (image_proj_model, state["image_proj"]), "ip_adapter": (adapter_modules, state["ip_adapter"])}
    # The token counts are compared once the shapes fit: only then is the projection the checkpoint's.
    _load_checked(parts, _strict_problems(parts) or _token_mismatch(image_proj_model, adapter_modules))


# ---------------------------------------------------------------------------------------------
# The projection a checkpoint describes: its sizes are written in its tensors' shapes
# ---------------------------------------------------------------------------------------------
def image_proj_from_state_dict(state_dict: Mapping[str, torch.Tensor], dim_head: int = DIM_HEAD) -> nn.Module:
    """Build the image projection a checkpoint was trained with, sized from its tensors, and load it.

    Base IP-Adapter (`proj.weight` present) -> `ImageProjModel`:
        norm.weight (dim,)                      -> cross_attention_dim = dim
        proj.weight (tokens * dim, clip_dim)    -> clip_embeddings_dim, tokens = rows // dim
    IP-Adapter Plus (`latents` present) -> `Resampler`:
        latents (1, num_queries, dim), proj_in.weight (dim, embedding_dim),
        proj_out.weight (output_dim, dim), layers.{i}.* -> depth,
        layers.0.0.to_q.weight (heads * dim_head, dim) -> heads = rows // dim_head,
        layers.0.1.1.weight (dim * ff_mult, dim) -> ff_mult.
    The split of to_q's rows into heads x dim_head is not stored anywhere: like diffusers we take
    dim_head = 64. (diffusers also fixes depth = 4 and, for the base model, tokens = 4; we read
    both from the tensors.) Accepts the whole checkpoint too (uses its "image_proj" part).
    """
    if "image_proj" in state_dict and isinstance(state_dict["image_proj"], Mapping):
        state_dict = state_dict["image_proj"]
    sd = dict(state_dict)
    if "proj.weight" in sd:
        if "norm.weight" not in sd:
            raise CheckpointMismatchError("image_proj has proj.weight but no norm.weight: not an ImageProjModel")
        dim = sd["norm.weight"].shape[0]
        rows, clip_dim = sd["proj.weight"].shape
        if rows % dim:
            raise CheckpointMismatchError(
                f"image_proj.proj.weight has {rows} rows, not a multiple of the token width {dim} "
                "(norm.weight): it cannot be cut into tokens")
        model = ImageProjModel(cross_attention_dim=dim, clip_embeddings_dim=clip_dim,
                               clip_extra_context_tokens=rows // dim)
    elif "latents" in sd:
        for key in ("proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"):
            if key not in sd:
                raise CheckpointMismatchError(f"image_proj has latents but no {key}: not a Resampler")
        _, num_queries, dim = sd["latents"].shape
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        if inner % dim_head:
            raise CheckpointMismatchError(
                f"to_q has {inner} rows, not a multiple of dim_head={dim_head}: pass the dim_head "
                "the Resampler was built with")
        model = Resampler(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head,
                          num_queries=num_queries, embedding_dim=sd["proj_in.weight"].shape[1],
                          output_dim=sd["proj_out.weight"].shape[0],
                          ff_mult=sd["layers.0.1.1.weight"].shape[0] / dim)
    else:
        raise CheckpointMismatchError(
            "cannot tell the image projection from its keys: expected 'proj.weight' (ImageProjModel) "
            f"or 'latents' (Resampler), got {sorted(sd)[:6]}")
    first = next(iter(sd.values()))
    model.to(dtype=first.dtype)
    parts = {"image_proj": (model, sd)}
    _load_checked(parts, _strict_problems(parts))
    return model.eval().requires_grad_(False)
