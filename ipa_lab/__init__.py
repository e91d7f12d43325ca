"""ipa-lab: build and train IP-Adapter (the image-prompt adapter for Stable Diffusion) by hand.

One module per concept, in the order of the notebooks:

* `projection`: image embedding -> tokens (ImageProjModel; Resampler for IP-Adapter Plus)
* `attention`: the processors a UNet attention layer runs (AttnProcessor, IPAttnProcessor)
* `adapter`: install the processors, freeze the backbone, count what trains
* `checkpoint`: save/load in the original format (which diffusers loads too)
* `configs`: the real SD 1.5 / SDXL / CLIP architectures as data, built on the meta device

Importing the package needs only torch; diffusers and transformers load when used.
"""
from .adapter import (
    ParamRow,
    count_parameters,
    format_table,
    freeze,
    hidden_size_of,
    install_ip_adapter,
    parameter_table,
)
from .attention import AttnProcessor, IPAttnProcessor
from .checkpoint import CheckpointMismatchError, load_into, load_ip_adapter, save_ip_adapter
from .projection import ImageProjModel, Resampler
from .runtime import setup

__all__ = [
    "ImageProjModel",
    "Resampler",
    "AttnProcessor",
    "IPAttnProcessor",
    "install_ip_adapter",
    "hidden_size_of",
    "freeze",
    "count_parameters",
    "parameter_table",
    "format_table",
    "ParamRow",
    "save_ip_adapter",
    "load_ip_adapter",
    "load_into",
    "CheckpointMismatchError",
    "setup",
]
