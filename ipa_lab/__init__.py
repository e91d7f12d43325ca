"""ipa-lab: build and train IP-Adapter (the image-prompt adapter for Stable Diffusion) by hand.

One module per concept, in the order of the notebooks:

* `projection`: image embedding -> tokens (ImageProjModel; Resampler for IP-Adapter Plus), and
  the projection for a given UNet and image encoder (`build_image_projection`)
* `faceid`, `attention_faceid`: FaceID's projections and its LoRA processors (notebook 8); `family`:
  every member of the IP-Adapter family, counted; `recognition`, `train_faceid`: the toy's identity
  embedding, and FaceID trained and measured on the toy
* `attention`: the processors a UNet attention layer runs (AttnProcessor, IPAttnProcessor)
* `adapter`: install the processors, find them again, freeze the backbone, count what trains
* `encoders`: the frozen encoders' outputs the adapter reads (text states, image features, "no image")
* `checkpoint`: save, read and strictly load in the original format (which diffusers loads too)
* `generate`: sampling with an image prompt through our adapter (`load_adapter`, `generate`)
* `diffusers_path`: the same images through diffusers' own IP-Adapter code, for comparison
* `metrics`: what a picture shows (pixel classifier, attribute agreement, CLIP-I / CLIP-T)
* `evaluate`: the evaluation protocol (the miniature Table 1, the scale sweep) and its command line
* `tables`: the plain-text tables the notebooks print
* `viz`: figures (image grids, loss curves)
* `configs`: the real SD 1.5 / SDXL / CLIP architectures as data, built on the meta device

and for training: `train` (the run's settings and command line), `trainer` (the loop), `cache`
(the frozen encoders' outputs on disk), `loop` (steps, checkpoints, Ctrl-C), `data`.

Importing the package imports nothing heavy: each name below loads its module (and torch) on
first use, so `python -m ipa_lab.train` can check its command line before torch loads.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it (one home each)
_HOMES = {
    "ParamRow": "adapter",
    "count_ip_adapter_parameters": "adapter",
    "count_parameters": "adapter",
    "format_parameter_table": "adapter",
    "freeze": "adapter",
    "hidden_size_of": "adapter",
    "install_ip_adapter": "adapter",
    "ip_processors": "adapter",
    "parameter_table": "adapter",
    "AttnProcessor": "attention",
    "IPAttnProcessor": "attention",
    "CheckpointMismatchError": "checkpoint",
    "image_proj_from_state_dict": "checkpoint",
    "load_into": "checkpoint",
    "load_ip_adapter": "checkpoint",
    "read_checkpoint": "checkpoint",
    "save_ip_adapter": "checkpoint",
    "ImageProjModel": "projection",
    "Resampler": "projection",
    "build_image_projection": "projection",
    "num_tokens_of": "projection",
    "setup": "runtime",
    "format_table": "tables",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    """Load a public name's module on first use (PEP 562)."""
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ipa_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
