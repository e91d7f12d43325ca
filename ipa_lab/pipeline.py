"""Load a Stable Diffusion pipeline folder: the toy one in data/, or a real SD 1.5 on disk.

One function, `load_pipeline`, for both, so that going from the toy to the real model is one
string. It never downloads: a hub id is looked up in the local Hugging Face cache only, and
anything missing is reported at once, with where it looked.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .runtime import quiet

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_SD = REPO_ROOT / "data" / "toy-sd"
TOY_CLIP = REPO_ROOT / "data" / "toy-clip"
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _hub_cache() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local pipeline folder for `name_or_path`, or a FileNotFoundError that says what is missing.

    Accepts a folder with model_index.json, or a hub id such as "runwayml/stable-diffusion-v1-5"
    whose snapshot is already in the local Hugging Face cache.
    """
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but not a diffusers pipeline: it has no model_index.json "
                f"(expected subfolders {', '.join(REQUIRED)}; see data/toy-sd for an example)")
        missing = [c for c in REQUIRED if not (path / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"pipeline folder {path} lacks {', '.join(missing)}")
        return path
    text = str(name_or_path)
    if text.count("/") == 1 and not path.exists() and not text.startswith((".", "/")):
        snapshots = _hub_cache() / f"models--{text.replace('/', '--')}" / "snapshots"
        found = sorted(p for p in snapshots.glob("*") if (p / "model_index.json").is_file()) if snapshots.is_dir() else []
        if found:
            return found[-1]
        raise FileNotFoundError(
            f"{text!r} is not in the local Hugging Face cache (looked in {snapshots}); this course never "
            f"downloads. Download it once yourself, or pass the path of a pipeline folder.")
    raise FileNotFoundError(f"no pipeline folder at {path}; expected a diffusers pipeline folder such as data/toy-sd")


def load_pipeline(name_or_path: str | os.PathLike = TOY_SD, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, image_encoder: str | os.PathLike | None = None):
    """Load a `StableDiffusionPipeline` offline (`local_files_only=True`), progress bars off.

    `image_encoder`: a folder with a `CLIPVisionModelWithProjection` (the real IP-Adapter keeps
    it apart from the pipeline, in `models/image_encoder`); the toy pipeline ships its own.
    """
    quiet()
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

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
    quiet()
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {path}; run `python -m ipa_lab.pretrain` to make data/toy-clip")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    return model, CLIPTokenizer.from_pretrained(path), CLIPImageProcessorPil.from_pretrained(path)
