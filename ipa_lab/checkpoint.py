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

What the tensors do not say goes into the `.safetensors` metadata (a JSON object of strings in
the file's header, which diffusers ignores): the variant ("base"/"plus"), the number of image
tokens, and for Plus the Resampler's heads and dim_head (to_q stores heads * dim_head rows, so
12 heads of 64 look like 24 heads of 32). `read_metadata(path)` reads it, `parse_metadata` types
it; the loaders use it to build the right Resampler and to name any disagreement between it,
the tensors and the processors. A `.bin` stays a plain nested dict of tensors (the original
reads it with `torch.load`), so it has no metadata; files without metadata load as before.

Files are written atomically: a crash mid-write leaves the previous file, never half a file.
A file that cannot be read (empty, truncated, not a checkpoint) is refused with a message that
names the file and what is wrong with it.

The way out: `save_ip_adapter(path, image_proj_model, adapter_modules)`, which describes the
projection (`projection_metadata`) and hands both to `write_checkpoint`, the one writer
(`ipa_lab.convert` uses it too).

The way in, step by step:
* `read_metadata(path)`: what the file says about itself (its header only);
* `load_ip_adapter(path)`: a file -> the nested dict (its metadata attached, see `metadata_of`);
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
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .projection import ImageProjModel, Resampler, num_tokens_of

PARTS = ("image_proj", "ip_adapter")
SUFFIXES = (".safetensors", ".bin")
# The head width every IP-Adapter Plus checkpoint uses. The tensors store heads * dim_head (the
# rows of to_q) but not the split: our files record it in their metadata; without it, loaders
# (diffusers' included) assume 64.
DIM_HEAD = 64


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the modules it is loaded into (keys, shapes or token counts
    differ), its keys are not laid out as an IP-Adapter checkpoint's, or its metadata is
    malformed or disagrees with its tensors or with the processors."""


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


# ---------------------------------------------------------------------------------------------
# Metadata: what the tensors do not say, written beside them in a .safetensors header
# ---------------------------------------------------------------------------------------------
PREFIX = "ipa_lab."  # our entries, beside safetensors' own "format": "pt"
FORMAT, FORMAT_VERSION = "ip-adapter", 1
VARIANTS = ("base", "plus")
_FIELDS = {"format": str, "format_version": int, "variant": str, "num_tokens": int, "heads": int, "dim_head": int}


def _variant_of(image_proj_model: nn.Module) -> str | None:
    """'plus' for a Resampler (learned queries, `latents`), 'base' for an ImageProjModel, else None."""
    if isinstance(getattr(image_proj_model, "latents", None), torch.Tensor):
        return "plus"
    return "base" if hasattr(image_proj_model, "clip_extra_context_tokens") else None


def _first_attention(image_proj_model: nn.Module):
    """A Resampler's first PerceiverAttention (it knows heads and dim_head), or None."""
    layers = getattr(image_proj_model, "layers", None)
    attn = layers[0][0] if layers is not None and len(layers) else None
    return attn if hasattr(attn, "heads") and hasattr(attn, "dim_head") else None


def projection_metadata(image_proj_model: nn.Module) -> dict[str, str]:
    """The .safetensors metadata describing a projection, every value a string (as the format wants).

    e.g. {"format": "pt", "ipa_lab.format": "ip-adapter", "ipa_lab.format_version": "1",
    "ipa_lab.variant": "plus", "ipa_lab.num_tokens": "16", "ipa_lab.heads": "12",
    "ipa_lab.dim_head": "64"}. A projection of another kind gets the format entries only.
    """
    fields = {"format": FORMAT, "format_version": FORMAT_VERSION}
    variant = _variant_of(image_proj_model)
    if variant is not None:
        fields.update(variant=variant, num_tokens=num_tokens_of(image_proj_model))
    attn = _first_attention(image_proj_model)
    if variant == "plus" and attn is not None:
        fields.update(heads=attn.heads, dim_head=attn.dim_head)
    return {"format": "pt", **{PREFIX + key: str(value) for key, value in fields.items()}}


def parse_metadata(metadata: Mapping[str, str]) -> dict:
    """Our entries of a file's metadata, typed: {"variant": "plus", "num_tokens": 16, "heads": 12, ...}.

    {} for a file without them (older files, the original's, diffusers'). A malformed entry raises
    a CheckpointMismatchError naming the key, its value and what was expected.
    """
    fields = {}
    for field, kind in _FIELDS.items():
        raw = metadata.get(PREFIX + field)
        if raw is None:
            continue
        if kind is int and not (isinstance(raw, str) and raw.isdigit() and int(raw) > 0):
            raise CheckpointMismatchError(f"metadata {PREFIX}{field}={raw!r}: expected a positive integer (as a string)")
        fields[field] = kind(raw)
    if fields.get("format", FORMAT) != FORMAT:
        raise CheckpointMismatchError(f"metadata {PREFIX}format={fields['format']!r}: expected {FORMAT!r}")
    if fields.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"metadata {PREFIX}format_version={fields['format_version']}: written by a newer ipa_lab; this one "
            f"reads version {FORMAT_VERSION} (update ipa_lab)")
    if fields.get("variant", "base") not in VARIANTS:
        raise CheckpointMismatchError(f"metadata {PREFIX}variant={fields['variant']!r}: expected one of {VARIANTS}")
    return fields


def metadata_of(state) -> dict[str, str]:
    """The file metadata a checkpoint dict carries ({} if none).

    `load_ip_adapter` attaches it as an attribute `metadata` to the nested dict and to each part,
    the way torch attaches `_metadata` to a state dict: so `image_proj_from_state_dict(state["image_proj"])`
    still knows the heads. The parts are OrderedDicts, which torch.save / torch.load(weights_only=True)
    keep whole; a copy with `dict(...)` drops the metadata.
    """
    for holder in (state, state.get("image_proj") if isinstance(state, Mapping) else None):
        found = getattr(holder, "metadata", None)
        if isinstance(found, Mapping):
            return dict(found)
    return {}


def _with_metadata(state: dict[str, dict[str, torch.Tensor]], metadata: Mapping[str, str]):
    """The nested dict with `metadata` attached to it and its parts (see metadata_of); as is without ours."""
    if not any(key.startswith(PREFIX) for key in metadata):
        return state
    nested = OrderedDict((part, OrderedDict(state[part])) for part in PARTS)
    for holder in (nested, *nested.values()):
        holder.metadata = dict(metadata)
    return nested


def _metadata_problems(fields: Mapping, image_proj_model: nn.Module, adapter_modules: nn.Module | None = None
                       ) -> list[str]:
    """Where the metadata (parsed) disagrees with the projection the tensors built, or with the processors."""
    problems = []
    variant = _variant_of(image_proj_model)
    if "variant" in fields and variant is not None and fields["variant"] != variant:
        problems.append(f"variant: the metadata records {PREFIX}variant={fields['variant']!r}, but the tensors "
                        f"describe {type(image_proj_model).__name__} ({variant!r})")
    if "num_tokens" in fields and variant is not None:
        tokens = num_tokens_of(image_proj_model)
        if tokens != fields["num_tokens"]:
            problems.append(f"num_tokens: the metadata records {PREFIX}num_tokens={fields['num_tokens']}, but the "
                            f"projection's tensors make {tokens} tokens")
        counts = _processor_tokens(adapter_modules) if adapter_modules is not None else []
        if counts and counts != [fields["num_tokens"]]:
            problems.append(f"num_tokens: the metadata records {PREFIX}num_tokens={fields['num_tokens']}, but the "
                            f"processors take the last {' or '.join(map(str, counts))} (IPAttnProcessor.num_tokens)")
    attn = _first_attention(image_proj_model)
    for field in ("heads", "dim_head"):
        if attn is not None and field in fields and getattr(attn, field) != fields[field]:
            problems.append(f"{field}: the metadata records {PREFIX}{field}={fields[field]}, but the Resampler "
                            f"was built with {field}={getattr(attn, field)}")
    return problems


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata in a checkpoint file's header, as stored (strings); {} for a `.bin` or a file without any.

    e.g. {"format": "pt", "ipa_lab.variant": "base", "ipa_lab.num_tokens": "4", ...}; type it with
    `parse_metadata`. Only the header is read, not the tensors.
    """
    path = Path(path)
    if _suffix(path) == ".bin":
        return {}  # a plain nested dict of tensors: nowhere to keep metadata (see the module docstring)
    if not path.is_file():
        raise FileNotFoundError(f"no IP-Adapter checkpoint at {str(path)!r}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as error:
        raise unreadable(path, error) from error


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_checkpoint(path: str | os.PathLike, state: Mapping[str, Mapping[str, torch.Tensor]],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a nested checkpoint dict atomically: the one way files of this format are written.

    `.safetensors` -> flat prefixed keys and `metadata` in the header; `.bin` -> torch.save of
    the nested dict as plain dicts (no metadata: the original reads it with torch.load). Returns the path.
    """
    path = Path(path)
    suffix = _suffix(path)
    nested = {part: dict(state[part]) for part in PARTS}  # plain dicts, whatever came in
    if suffix == ".bin":
        write_atomically(path, lambda tmp: torch.save(nested, tmp))
        return path
    from safetensors.torch import save_file

    # Re-saving a loaded file keeps what it said about itself (heads, dim_head, ...).
    metadata = dict(metadata if metadata is not None else (metadata_of(state) or {"format": "pt"}))
    odd = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if odd:
        raise TypeError(f"safetensors metadata must map strings to strings; got {odd}")
    flat = {f"{part}.{key}": t.contiguous() for part in PARTS for key, t in nested[part].items()}
    write_atomically(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    return path


def save_ip_adapter(path: str | os.PathLike, image_proj_model: nn.Module, adapter_modules: nn.Module) -> Path:
    """Save the image projection and the adapter processors in the original format.

    `.safetensors` -> flat prefixed keys, with the projection's `projection_metadata`;
    `.bin` -> torch.save of the nested dict. Returns the path.
    """
    return write_checkpoint(path, checkpoint_state(image_proj_model, adapter_modules),
                            projection_metadata(image_proj_model))


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
    """Either layout (nested parts, or flat prefixed keys) -> the nested dict, parts copied
    (with the metadata the given dict carried, if any)."""
    if all(part in state for part in PARTS):
        return _with_metadata({part: dict(state[part]) for part in PARTS}, metadata_of(state))
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


def unreadable(path: Path, error: Exception, what: str = "IP-Adapter checkpoint") -> ValueError:
    """The error to raise for a file torch or safetensors failed to read: why, told from its bytes.

    A pickle refused for naming code (weights_only) is a security refusal, not damage."""
    if _refused_code(error):
        return ValueError(
            f"refusing to load {str(path)!r}: the file holds pickled objects other than tensors, and "
            "unpickling them could run arbitrary code. Only load .bin files you trust, with "
            "torch.load(..., weights_only=False) yourself, and re-save them as .safetensors. "
            f"(torch said: {str(error).splitlines()[0]})")
    suffix = ".safetensors" if path.suffix == ".safetensors" else ".bin"  # anything else: torch.save's
    return ValueError(f"cannot read the {what} {str(path)!r}: {_damage(path, suffix)}")


def load_ip_adapter(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read a checkpoint (`.safetensors` or `.bin`) into {"image_proj": {...}, "ip_adapter": {...}}.

    The result is what diffusers' `pipe.load_ip_adapter(state_dict, ...)` accepts as well.
    A file that cannot be read raises a ValueError naming the file and what is wrong with it.
    A `.safetensors` file's metadata (if it has ours) is checked and attached: `metadata_of(result)`.
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
        # The library's own error stays attached (`from error`), for the curious.
        raise unreadable(path, error) from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not an IP-Adapter checkpoint dict")
    metadata = read_metadata(path)
    try:
        parse_metadata(metadata)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{str(path)!r}: {error}") from None
    return _with_metadata(_as_nested(state, repr(str(path))), metadata)  # a .bin may hold either layout


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


def _processor_tokens(adapter_modules: nn.Module) -> list[int]:
    """The distinct token counts the processors cut off (`IPAttnProcessor.num_tokens`), sorted."""
    return sorted({m.num_tokens for m in adapter_modules.modules() if isinstance(getattr(m, "num_tokens", None), int)})


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
    counts = _processor_tokens(adapter_modules)
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
              adapter_modules: nn.Module, metadata: Mapping[str, str] | None = None) -> None:
    """Copy a checkpoint dict into the projection and the adapter processors, strictly.

    Every key must match in name and shape, and the processors must take as many image tokens
    as the projection makes; otherwise one CheckpointMismatchError lists every missing,
    unexpected and mis-shaped key (with both shapes) for both parts, and nothing is loaded.
    With metadata (`metadata`, else what `state` carries, see `metadata_of`), the recorded
    variant, num_tokens, heads and dim_head must match the modules as well.
    """
    absent = [part for part in PARTS if part not in state]
    if absent:
        raise CheckpointMismatchError(f"checkpoint has no {' and no '.join(repr(p) for p in absent)} part; "
                                      f"expected the keys {PARTS}")
    parts = {"image_proj": (image_proj_model, state["image_proj"]), "ip_adapter": (adapter_modules, state["ip_adapter"])}
    fields = parse_metadata(metadata_of(state) if metadata is None else metadata)
    # The token counts are compared once the shapes fit: only then is the projection the checkpoint's.
    _load_checked(parts, _strict_problems(parts) or (_token_mismatch(image_proj_model, adapter_modules)
                                                     + _metadata_problems(fields, image_proj_model, adapter_modules)))


# ---------------------------------------------------------------------------------------------
# The projection a checkpoint describes: its sizes are written in its tensors' shapes
# ---------------------------------------------------------------------------------------------
def _dim_head(given: int | None, fields: Mapping) -> int:
    """The Resampler's head width: the one passed, else the metadata's, else 64 (every loader's guess)."""
    recorded = fields.get("dim_head")
    if given is not None and recorded is not None and given != recorded:
        raise CheckpointMismatchError(f"dim_head={given} was passed, but the checkpoint's metadata records "
                                      f"{PREFIX}dim_head={recorded}")
    return given or recorded or DIM_HEAD


def image_proj_from_state_dict(state_dict: Mapping[str, torch.Tensor], dim_head: int | None = None,
                               metadata: Mapping[str, str] | None = None) -> nn.Module:
    """Build the image projection a checkpoint was trained with, sized from its tensors, and load it.

    Base IP-Adapter (`proj.weight` present) -> `ImageProjModel`:
        norm.weight (dim,)                      -> cross_attention_dim = dim
        proj.weight (tokens * dim, clip_dim)    -> clip_embeddings_dim, tokens = rows // dim
    FaceID (`proj.0.weight`, `proj.2.weight`, `norm.weight`) -> `ipa_lab.faceid.MLPProjModel`:
        proj.0.weight (2 id, id), proj.2.weight (tokens * dim, 2 id), norm.weight (dim,).
    IP-Adapter Plus (`latents` present) -> `Resampler`:
        latents (1, num_queries, dim), proj_in.weight (dim, embedding_dim),
        proj_out.weight (output_dim, dim), layers.{i}.* -> depth,
        layers.0.0.to_q.weight (heads * dim_head, dim) -> heads = rows // dim_head,
        layers.0.1.1.weight (dim * ff_mult, dim) -> ff_mult.
    The split of to_q's rows into heads x dim_head is not in the tensors: it is read from the
    metadata (`metadata`, else what the dict carries, see `metadata_of`) when the file has it;
    without, like diffusers we take dim_head = 64. (diffusers also fixes depth = 4 and, for the
    base model, tokens = 4; we read both from the tensors.) The metadata's variant and num_tokens
    must agree with the tensors. Accepts the whole checkpoint too (uses its "image_proj" part).
    """
    fields = parse_metadata(metadata_of(state_dict) if metadata is None else metadata)
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
    elif any(key.startswith("perceiver_resampler.") for key in sd) or "proj.3.weight" in sd:
        kind = "FaceID-Plus (ProjPlusModel)" if "proj.3.weight" not in sd else "Full-face (MLPProjModel)"
        raise CheckpointMismatchError(
            f"image_proj is a {kind} projection: ipa_lab builds it (ipa_lab.faceid, ipa_lab.projection; notebook 8) "
            "but does not sample with it; diffusers' load_ip_adapter loads it")
    elif {"proj.0.weight", "proj.2.weight", "norm.weight"} <= set(sd):  # FaceID's MLPProjModel
        from .faceid import MLPProjModel as FaceIDProjModel

        dim = sd["norm.weight"].shape[0]
        hidden, id_dim = sd["proj.0.weight"].shape
        rows = sd["proj.2.weight"].shape[0]
        if hidden != 2 * id_dim or rows % dim:
            raise CheckpointMismatchError(
                f"image_proj looks like FaceID's MLPProjModel, but proj.0.weight is {hidden} x {id_dim} (expected "
                f"{2 * id_dim} x {id_dim}) and proj.2.weight has {rows} rows (expected a multiple of {dim})")
        model = FaceIDProjModel(cross_attention_dim=dim, id_embeddings_dim=id_dim, num_tokens=rows // dim)
    elif "latents" in sd:
        for key in ("proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"):
            if key not in sd:
                raise CheckpointMismatchError(f"image_proj has latents but no {key}: not a Resampler")
        _, num_queries, dim = sd["latents"].shape
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        dim_head = _dim_head(dim_head, fields)
        if "heads" in fields and fields["heads"] * dim_head != inner:
            raise CheckpointMismatchError(
                f"the metadata records {PREFIX}heads={fields['heads']} x dim_head={dim_head} = "
                f"{fields['heads'] * dim_head}, but image_proj.layers.0.0.to_q.weight has {inner} rows")
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
            "cannot tell the image projection from its keys: expected 'proj.weight' (ImageProjModel), "
            f"'latents' (Resampler) or 'proj.0.weight' + 'norm.weight' (FaceID's MLPProjModel), got {sorted(sd)[:6]}")
    first = next(iter(sd.values()))
    model.to(dtype=first.dtype)
    parts = {"image_proj": (model, sd)}
    _load_checked(parts, _strict_problems(parts) or _metadata_problems(fields, model))
    return model.eval().requires_grad_(False)
