"""Load a Stable Diffusion pipeline folder: the toy one in data/, or a real SD 1.5 on disk.

One function, `load_pipeline`, for both, so that going from the toy to the real model is one
string. It never downloads: a hub id is looked up in the local Hugging Face cache only, and
anything missing is reported at once, with where it looked.

Nothing heavy is imported until a model loads: `python -m ipa_lab.train` checks its --model with
`resolve_model` before torch is imported, so a typo fails in a fraction of a second.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations only
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_SD = REPO_ROOT / "data" / "toy-sd"
TOY_CLIP = REPO_ROOT / "data" / "toy-clip"
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now, as huggingface_hub reads it.

    HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, where HF_HOME defaults
    to $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface. (huggingface_hub reads these once, at
    import; reading them per call lets a test or a notebook point elsewhere.)
    """
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _check_pipeline_folder(path: Path) -> Path:
    """`path` if it holds a diffusers pipeline (model_index.json and the parts the course loads)."""
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is a folder but not a diffusers pipeline: it has no model_index.json "
            f"(expected subfolders {', '.join(REQUIRED)}; see data/toy-sd for an example)")
    missing = [c for c in REQUIRED if not (path / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"pipeline folder {path} lacks {', '.join(missing)}")
    return path


def _looks_like_path(text: str) -> bool:
    """Whether `text` is meant as a folder on disk rather than a hub id such as "org/name".

    A hub id is exactly one "org/name"; "./x", "/x", "~/x", "a/b/c" are paths, and so is a bare
    name or "data/toy_sd" when its parent folder ("." or "data") exists here.
    """
    return (text.startswith((".", "/", "~")) or text.count(os.sep) > 1
            or Path(text).expanduser().parent.is_dir())


def _no_such_folder(path: Path) -> str:
    """ "no such folder: ..." naming the first part of `path` that is missing, with close names beside it."""
    missing = path
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent  # walk up to the first part that is not there
    message = f"no such folder: {path}" + ("" if missing == path else f" ({missing} does not exist)")
    siblings = [p.name for p in missing.parent.iterdir() if p.is_dir()] if missing.parent.is_dir() else []
    close = difflib.get_close_matches(missing.name, siblings, n=3, cutoff=0.6)
    if close:
        return message + f"; did you mean {' or '.join(str(missing.parent / c) for c in close)}?"
    return message + "; expected a diffusers pipeline folder such as data/toy-sd"


def _cached_snapshot(repo_id: str) -> Path:
    """The snapshot of hub id `repo_id` that the local cache's refs/main names; never downloads.

    This is what `from_pretrained(repo_id, local_files_only=True)` loads: huggingface_hub reads the
    commit hash in models--org--name/refs/main and returns snapshots/<that hash>. The snapshot
    that sorts last is not necessarily the newest download, so it is not a substitute.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = _hub_cache()
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a folder nor a valid hub id ({e})") from None
    except LocalEntryNotFoundError as e:
        not_found = e
    ref = storage / "refs" / "main"
    if ref.is_file():  # cached, but refs/main points nowhere useful: say exactly what is wrong
        commit = ref.read_text().strip()
        if (storage / "snapshots" / commit).is_dir():  # a partial download; huggingface_hub lists what is missing
            raise FileNotFoundError(f"{repo_id!r} is in the local Hugging Face cache but incomplete: {not_found}")
        raise FileNotFoundError(f"{repo_id!r}: {ref} names snapshot {commit}, which is not in {storage / 'snapshots'}")
    snapshots = sorted(p.name for p in (storage / "snapshots").glob("*")) if storage.is_dir() else []
    orphans = (f" It has snapshots {', '.join(snapshots)} but no refs/main naming one; pass a snapshot's folder "
               "to use it." if snapshots else "")
    cached = [p.name.removeprefix("models--").replace("--", "/") for p in cache.glob("models--*")] if cache.is_dir() else []
    close = difflib.get_close_matches(repo_id, cached, n=1, cutoff=0.8)
    hint = f" Did you mean {close[0]!r}, which is cached?" if close else ""
    raise FileNotFoundError(
        f"{repo_id!r} is not in the local Hugging Face cache (looked in {storage}); this course never "
        f"downloads. Download it once yourself, or pass the path of a pipeline folder.{orphans}{hint}")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local pipeline folder for `name_or_path`, or a FileNotFoundError that says what is missing.

    Accepts a folder with model_index.json, or a hub id such as "runwayml/stable-diffusion-v1-5"
    whose snapshot is already in the local Hugging Face cache (the one refs/main names, as
    huggingface_hub resolves it). A mistyped folder is told apart from a missing hub id.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return _check_pipeline_folder(path)
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; expected a diffusers pipeline folder such as data/toy-sd")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(_no_such_folder(path))
    return _check_pipeline_folder(_cached_snapshot(text))


def load_pipeline(name_or_path: str | os.PathLike = TOY_SD, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, image_encoder: str | os.PathLike | None = None):
    """Load a `StableDiffusionPipeline` offline (`local_files_only=True`), progress bars off.

    `dtype`: the weights' dtype, torch.float32 when None.

    `image_encoder`: a folder with a `CLIPVisionModelWithProjection` (the real IP-Adapter keeps
    it apart from the pipeline, in `models/image_encoder`); the toy pipeline ships its own.
    """
    from .runtime import quiet

    quiet()  # before anything loads: no chatter from diffusers or transformers
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    dtype = torch.float32 if dtype is None else dtype

    folder = resolve_model(name_or_path)
    extra = {}
    if image_encoder is not None:
        enc = Path(image_encoder)
        if not (enc / "config.json").is_file():
            raise FileNotFoundError(f"no image encoder at {enc}; expected a CLIPVisionModelWithProjection folder with config.json")
        extra["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(enc, local_files_only=True, torch_dtype=dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_scoring_clip(path: str | os.PathLike = TOY_CLIP):
    """The toy CLIP (both towers) that scores images, as the paper scores with CLIP ViT-L/14."""
    from .runtime import quiet

    quiet()
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {path}; run `python -m ipa_lab.pretrain` to make data/toy-clip")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    return model, CLIPTokenizer.from_pretrained(path), CLIPImageProcessorPil.from_pretrained(path)
