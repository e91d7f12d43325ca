"""Turn a checkpoint of the original trainer into an ip_adapter file (`python -m ipa_lab.convert`).

    python -m ipa_lab.convert runs/original/checkpoint-2000 ip_adapter.safetensors --model data/toy-sd

The original's `tutorial_train.py` (and `tutorial_train_plus.py`) trains a wrapper module
`IPAdapter` holding, in this order, `unet`, `image_proj_model` and `adapter_modules =
nn.ModuleList(unet.attn_processors.values())`, and saves it with
`accelerator.save_state("checkpoint-N")`. The adapter's weights are in that state dict twice,
since the processors also sit inside the UNet: as `adapter_modules.<i>.to_k_ip.weight` and as
`unet.<layer>.processor.to_k_ip.weight`. Which names reach the file depends on accelerate:

* `pytorch_model.bin` (older accelerate, or `save_state(..., safe_serialization=False)`):
  torch.save keeps every name: `image_proj_model.*`, `adapter_modules.<i>.*`, all `unet.*`.
* `model.safetensors` (safe serialization, the default of the pinned accelerate 1.15): a
  safetensors file cannot hold one tensor under two names, so accelerate keeps the first name
  the state dict lists and drops the others. `unet` comes first, so every `adapter_modules.*`
  key is gone; the adapter survives only as `unet.<layer>.processor.to_k_ip.weight` /
  `to_v_ip.weight`, among all the UNet's own weights.

The original README's conversion snippet reads `pytorch_model.bin` and keeps `adapter_modules.`
keys only: pointed at a `model.safetensors`, it writes an empty `ip_adapter` part. Here a `unet.<layer>.processor` key goes to the
index of that processor in `unet.attn_processors`. That order follows from the UNet's config
alone, so the UNet is built from its config on the meta device (shapes, no weights, nothing
loaded) and numbered the way `install_ip_adapter` numbers it. Every tensor's shape is checked
against that UNet, every cross-attention layer must have both its tensors, and only then is the
file written (atomically, with `checkpoint.write_checkpoint`, metadata included).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import block_of, install_ip_adapter
from .checkpoint import (
    DIM_HEAD,
    PARTS,
    SUFFIXES,
    CheckpointMismatchError,
    image_proj_from_state_dict,
    projection_metadata,
    unreadable,
    write_checkpoint,
)
from .configs import available_configs, build_unet
from .pipeline import TOY_SD, resolve_model
from .projection import num_tokens_of

# What accelerate's save_state calls the (first) model's weights, in the order we prefer them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Prefixes that wrappers add to every key: DistributedDataParallel (save_state does not unwrap
# the model) and torch.compile.
WRAPPERS = ("module.", "_orig_mod.")
PROJECTION = "image_proj_model."
OLD_LAYOUT = "adapter_modules.<i>"  # torch.save kept every name
NEW_LAYOUT = "unet.<layer>.processor"  # safetensors kept the UNet's names only
WHY = {OLD_LAYOUT: "torch.save kept every name", NEW_LAYOUT: "safetensors dropped adapter_modules.* as duplicates"}
_OLD_KEY = re.compile(r"adapter_modules\.(\d+)\.(.+)$")
_NEW_KEY = re.compile(r"unet\.(.+\.processor)\.(to_[kv]_ip\.weight)$")


@dataclass(frozen=True)
class Conversion:
    """What `convert` read and wrote; `str()` is the summary the command prints."""

    source: Path
    unused: tuple[str, ...]  # other weight files in the checkpoint folder
    layout: str
    variant: str
    num_tokens: int
    layers: int  # cross-attention layers with an adapter
    parameters: int
    destination: Path

    def __str__(self) -> str:
        also = f" (not used: {', '.join(self.unused)})" if self.unused else ""
        return (f"read    {self.source}{also}\n"
                f"layout  {self.layout} keys ({WHY[self.layout]})\n"
                f"wrote   {self.destination}: IP-Adapter {self.variant}, {self.num_tokens} image tokens, "
                f"{self.layers} adapter layers, {self.parameters:,} parameters")


# ---------------------------------------------------------------------------------------------
# Reading the training checkpoint: only the projection's and the adapter's tensors
# ---------------------------------------------------------------------------------------------
def weights_file(src: str | Path) -> tuple[Path, tuple[str, ...]]:
    """The weights file of a `checkpoint-N/` folder (model.safetensors first), or `src` if a file.

    Returns (the file, the names of other weight files found beside it and not used)."""
    src = Path(src).expanduser()
    if src.is_file():
        return src, ()
    if not src.is_dir():
        raise FileNotFoundError(f"no training checkpoint at {src}: expected a checkpoint-N folder or a weights file")
    found = [name for name in WEIGHT_FILES if (src / name).is_file()]
    if not found:
        present = sorted(p.name for p in src.iterdir())[:8]
        raise FileNotFoundError(f"{src} holds no {' or '.join(WEIGHT_FILES)} (what accelerate's save_state writes); "
                                f"it holds {present or 'nothing'}")
    return src / found[0], tuple(found[1:])


def _unwrapped(key: str) -> str:
    """The key without the prefixes DDP or torch.compile add."""
    while key.startswith(WRAPPERS):
        key = key.split(".", 1)[1]
    return key


def _wanted(key: str) -> bool:
    """Is this (unwrapped) key the projection's or the adapter's, in either layout?"""
    return key.startswith((PROJECTION, "adapter_modules.")) or bool(_NEW_KEY.match(key))


def read_training_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The projection's and the adapter's tensors of a training checkpoint, wrapper prefixes removed,
    and all its keys (for messages). The UNet's own weights are not read into memory: safetensors
    reads tensor by tensor, and a torch.save archive is memory-mapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                return {_unwrapped(k): f.get_tensor(k) for k in keys if _wanted(_unwrapped(k))}, keys
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # say what is wrong with the file, not only what the library tripped on
        raise unreadable(path, error, "training checkpoint") from error
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return {_unwrapped(k): v for k, v in state.items() if _wanted(_unwrapped(k))}, list(state)


# ---------------------------------------------------------------------------------------------
# The UNet the adapter was trained on: processor order and the adapter's shapes, from its config
# ---------------------------------------------------------------------------------------------
def meta_unet(model: str | Path = TOY_SD):
    """The UNet of a pipeline folder (or hub id in the local cache), or of a config name in
    ipa_lab/configs (e.g. 'sd15_unet'), built on the meta device: no weights are loaded."""
    configs = [name for name in available_configs() if name.endswith("_unet")]
    if str(model) in configs and not Path(model).exists():
        return build_unet(str(model))
    try:
        folder = resolve_model(model)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}\n--model takes a pipeline folder (or a cached hub id) or a UNet config "
                                f"name: {', '.join(configs)}") from None
    from diffusers import UNet2DConditionModel

    config = json.loads((folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def expected_adapter(unet) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """(processor names in `unet.attn_processors` order, the adapter's keys -> shapes).

    The shapes are install_ip_adapter's: to_k_ip / to_v_ip of the processor at index i are
    (hidden_size of its block, cross_attention_dim). Built on the meta device, like `unet`.
    """
    names = list(unet.attn_processors)
    adapter = install_ip_adapter(unet)
    return names, {key: tuple(t.shape) for key, t in adapter.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# From the trainer's names to the checkpoint's
# ---------------------------------------------------------------------------------------------
def _neither_layout(keys: list[str], why: str) -> CheckpointMismatchError:
    if any(k.startswith(tuple(p + "." for p in PARTS)) for k in keys):
        return CheckpointMismatchError("this file already holds image_proj.* / ip_adapter.* keys: it is an ip_adapter "
                                       "file, not a training checkpoint; load it as it is")
    return CheckpointMismatchError(
        f"{why}: this is not a checkpoint of the original's IPAdapter wrapper. Expected image_proj_model.* keys and "
        f"either adapter_modules.<i>.to_k_ip.weight ({OLD_LAYOUT}) or unet.<layer>.processor.to_k_ip.weight "
        f"({NEW_LAYOUT}); found {len(keys)} keys, e.g. {keys[:4]}")


def split_parts(tensors: dict[str, torch.Tensor], names: list[str], keys: list[str]
                ) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(layout, image_proj part, ip_adapter part) from the wrapper's keys.

    `adapter_modules.<i>.x` -> `<i>.x`; `unet.<layer>.processor.x` -> `<index of the processor>.x`.
    Where both are present (a .bin) they are the same tensors; the adapter_modules names are used.
    """
    image_proj = {k[len(PROJECTION):]: t for k, t in tensors.items() if k.startswith(PROJECTION)}
    if not image_proj:
        raise _neither_layout(keys, "no image_proj_model.* keys")
    old = {f"{m[1]}.{m[2]}": t for k, t in tensors.items() if (m := _OLD_KEY.match(k))}
    if old:
        return OLD_LAYOUT, image_proj, old
    index = {name: i for i, name in enumerate(names)}
    new, unknown = {}, []
    for key, tensor in tensors.items():
        if m := _NEW_KEY.match(key):
            if m[1] in index:
                new[f"{index[m[1]]}.{m[2]}"] = tensor
            else:
                unknown.append(m[1])
    if unknown:
        raise CheckpointMismatchError(
            f"the checkpoint has adapter weights for {len(unknown)} attention layer(s) this UNet does not have "
            f"(e.g. {unknown[0]!r}); --model must be the base model the adapter was trained on")
    if not new:
        raise _neither_layout(keys, "image_proj_model.* keys but no adapter weights")
    return NEW_LAYOUT, image_proj, new


def adapter_problems(ip_adapter: dict[str, torch.Tensor], names: list[str],
                     expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Every missing, unexpected or mis-shaped adapter tensor, each named with its UNet layer."""
    def layer(key):
        i = int(key.split(".")[0])
        return names[i].removesuffix(".processor") if i < len(names) else f"no processor {i} in this UNet"

    problems = []
    for key, want in expected.items():
        if key not in ip_adapter:
            problems.append(f"missing {key} (layer {layer(key)}): every cross-attention layer needs to_k_ip and to_v_ip")
        elif tuple(ip_adapter[key].shape) != want:
            problems.append(f"{key} (layer {layer(key)}) has shape {tuple(ip_adapter[key].shape)}, expected {want} "
                            f"= (hidden_size of {block_of(layer(key))}, cross_attention_dim)")
    problems += [f"unexpected {key} ({layer(key)}): not an adapter weight of this UNet" for key in ip_adapter
                 if key not in expected]
    return problems


def _projection_problems(image_proj: dict[str, torch.Tensor], cross_attention_dim: int, dim_head: int):
    """(the projection built from its tensors or None, what is wrong with it)."""
    try:
        projection = image_proj_from_state_dict(image_proj, dim_head=dim_head)
    except CheckpointMismatchError as error:
        return None, [f"image_proj_model: {error}"]
    width = image_proj["norm.weight" if "norm.weight" in image_proj else "norm_out.weight"].shape[0]
    if width != cross_attention_dim:
        return None, [f"image_proj_model makes {width}-wide tokens, but the UNet's cross_attention_dim is "
                      f"{cross_attention_dim}: --model is not the base model it was trained on"]
    return projection, []


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------
def convert(src: str | Path, dst: str | Path, model: str | Path = TOY_SD, overwrite: bool = False,
            dim_head: int = DIM_HEAD) -> Conversion:
    """Convert a training checkpoint (`checkpoint-N/` or its weights file) into `dst` (.safetensors or .bin).

    `model`: the pipeline (or UNet config name) it was trained on; only its UNet config is read.
    `dim_head`: the Resampler's head width (Plus): the original's trainer always uses 64.
    Nothing is written unless every tensor is there and has the UNet's shape; an existing `dst`
    is kept unless `overwrite`.
    """
    dst = Path(dst)
    if dst.suffix not in SUFFIXES:
        raise ValueError(f"cannot write {str(dst)!r}: the destination must end in {' or '.join(SUFFIXES)}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    source, unused = weights_file(src)
    tensors, keys = read_training_checkpoint(source)
    unet = meta_unet(model)
    names, expected = expected_adapter(unet)
    layout, image_proj, ip_adapter = split_parts(tensors, names, keys)

    projection, problems = _projection_problems(image_proj, unet.config.cross_attention_dim, dim_head)
    problems += adapter_problems(ip_adapter, names, expected)
    if problems:
        raise CheckpointMismatchError(f"{source} ({layout} keys) does not fit the UNet of {model}; nothing written:\n  "
                                      + "\n  ".join(problems))
    write_checkpoint(dst, {"image_proj": image_proj, "ip_adapter": ip_adapter}, projection_metadata(projection))
    return Conversion(source, unused, layout, "plus" if "latents" in image_proj else "base",
                      num_tokens_of(projection), len(ip_adapter) // 2,
                      sum(t.numel() for part in (image_proj, ip_adapter) for t in part.values()), dst)


def main(argv: list[str] | None = None) -> int:
    """The command line: convert, print the summary; a refusal prints its reason and exits 1."""
    parser = argparse.ArgumentParser(
        prog="python -m ipa_lab.convert",
        description="Turn a checkpoint-N folder written by the original trainer (accelerator.save_state) "
                    "into an ip_adapter file that ipa_lab, the original and diffusers load.")
    parser.add_argument("src", help="checkpoint-N folder (model.safetensors or pytorch_model.bin), or such a file")
    parser.add_argument("dst", help="the ip_adapter file to write: .safetensors (preferred) or .bin")
    parser.add_argument("--model", default=str(TOY_SD),
                        help="the pipeline it was trained on (folder or cached hub id), or a UNet config name such "
                             "as sd15_unet; only the UNet config is read (default: data/toy-sd)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    parser.add_argument("--dim-head", type=int, default=DIM_HEAD,
                        help="Plus only: the Resampler's head width (the original's trainer uses 64)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.dst, args.model, args.overwrite, args.dim_head))
    except (OSError, ValueError) as error:  # CheckpointMismatchError is a ValueError
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
