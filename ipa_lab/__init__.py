"""ipa-lab: build and train IP-Adapter (the image-prompt adapter for Stable Diffusion) by hand.

One module per concept, in the order of the notebooks:

* `projection`: image embedding -> tokens (ImageProjModel; Resampler for IP-Adapter Plus), and
  the projection for a given UNet and image encoder (`build_image_projection`)
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

Importing the package needs only torch; diffusers and transformers load when used.
"""
from .adapter import (
    ParamRow,
    count_ip_adapter_parameters,
    count_parameters,
    format_parameter_table,
    freeze,
    hidden_size_of,
    install_ip_adapter,
    ip_processors,
    parameter_table,
)
from .attention import AttnProcessor, IPAttnProcessor
from .checkpoint import (
    CheckpointMismatchError,
    image_proj_from_state_dict,
    load_into,
    load_ip_adapter,
    read_checkpoint,
    save_ip_adapter,
)
from .projection import ImageProjModel, Resampler, build_image_projection, num_tokens_of
from .runtime import setup
from .tables import format_table

__all__ = [
    "ImageProjModel",
    "Resampler",
    "build_image_projection",
    "num_tokens_of",
    "AttnProcessor",
    "IPAttnProcessor",
    "install_ip_adapter",
    "ip_processors",
    "hidden_size_of",
    "freeze",
    "count_parameters",
    "count_ip_adapter_parameters",
    "parameter_table",
    "format_parameter_table",
    "ParamRow",
    "format_table",
    "save_ip_adapter",
    "load_ip_adapter",
    "read_checkpoint",
    "image_proj_from_state_dict",
    "load_into",
    "CheckpointMismatchError",
    "setup",
]
