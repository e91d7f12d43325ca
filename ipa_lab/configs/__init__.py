"""The real architectures as data: configs of SD 1.5, SDXL and the IP-Adapter image encoders.

A config is enough to build a model's exact architecture on the `meta` device: every
parameter has its shape but no memory and no values. That is how the course counts the real
SD 1.5 (859,520,964 UNet parameters; 22,319,616 trained by IP-Adapter) on a laptop, with no
download.

Files (JSON, in this folder): `sd15_unet`, `sdxl_unet` (diffusers UNet2DConditionModel),
`clip_vit_h14_vision`, `clip_vit_bigg14_vision` (transformers CLIPVisionModelWithProjection),
`toy_unet` (the course's own tiny UNet). Keys starting with `_` are notes, not settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent


def available_configs() -> list[str]:
    """The names `load_config` accepts."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str) -> dict:
    """The config called `name` (e.g. 'sd15_unet') as a dict, notes (`_` keys) included."""
    stem = Path(name).stem if str(name).endswith(".json") else str(name)
    path = CONFIG_DIR / f"{stem}.json"
    if not path.is_file():
        raise ValueError(f"no config named {name!r}; available: {', '.join(available_configs())}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _settings(config: dict) -> dict:
    """Drop the notes (`_comment`, `_class_name`, ...): only real constructor arguments remain."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_unet(name: str = "sd15_unet", device: str | torch.device = "meta"):
    """The UNet2DConditionModel of config `name`, built without pretrained weights.

    On 'meta' (the default) it has every parameter's shape and no memory; on 'cpu' it gets
    diffusers' random initialisation.
    """
    from diffusers import UNet2DConditionModel

    with torch.device(device):  # on "meta": shapes only, nothing allocated or initialised
        return UNet2DConditionModel.from_config(_settings(load_config(name)))


def build_image_encoder(name: str = "clip_vit_h14_vision", device: str | torch.device = "meta"):
    """The CLIPVisionModelWithProjection of config `name`, built without pretrained weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**{k: v for k, v in _settings(load_config(name)).items() if k != "architectures"})
    with torch.device(device):
        return CLIPVisionModelWithProjection(config)


def build_image_projection(unet_config: dict, encoder_config: dict, variant: str = "base",
                           num_tokens: int | None = None):
    """The projection IP-Adapter would train for this UNet and image encoder.

    base: ImageProjModel(projection_dim -> num_tokens (4) x cross_attention_dim).
    plus: Resampler(depth 4, dim_head 64, num_tokens (16) queries) reading the encoder's
    hidden states; dim = cross_attention_dim for SD 1.5 (768, 12 heads) and 1280 (20 heads)
    for SDXL, as in the original IPAdapterPlus / IPAdapterPlusXL.
    """
    from ..projection import ImageProjModel, Resampler

    cross_dim = unet_config["cross_attention_dim"]
    if variant == "base":
        return ImageProjModel(cross_attention_dim=cross_dim, clip_embeddings_dim=encoder_config["projection_dim"],
                              clip_extra_context_tokens=num_tokens or 4)
    if variant == "plus":
        dim = cross_dim if cross_dim <= 1024 else 1280
        return Resampler(dim=dim, depth=4, dim_head=64, heads=dim // 64, num_queries=num_tokens or 16,
                         embedding_dim=encoder_config["hidden_size"], output_dim=cross_dim, ff_mult=4)
    raise ValueError(f"unknown variant {variant!r}: use 'base' or 'plus'")


def count_ip_adapter_parameters(unet_config_name: str = "sd15_unet",
                                image_encoder_name: str = "clip_vit_h14_vision",
                                variant: str = "base", num_tokens: int | None = None) -> dict[str, int]:
    """What IP-Adapter trains on a real architecture, counted on the meta device.

    Returns {'projection', 'adapter', 'total', 'cross_attention_layers', 'unet'}; e.g. SD 1.5 +
    ViT-H base: projection 3,150,336 + adapter 19,169,280 = total 22,319,616.
    """
    from ..adapter import count_parameters, install_ip_adapter

    unet = build_unet(unet_config_name)
    unet_size = count_parameters(unet)
    default_tokens = 16 if variant == "plus" else 4
    adapter = install_ip_adapter(unet, num_tokens=num_tokens or default_tokens)
    with torch.device("meta"):
        projection = build_image_projection(load_config(unet_config_name), load_config(image_encoder_name),
                                            variant, num_tokens)
    counts = {"projection": count_parameters(projection), "adapter": count_parameters(adapter)}
    counts["total"] = counts["projection"] + counts["adapter"]
    counts["cross_attention_layers"] = sum(1 for m in adapter if count_parameters(m) > 0)
    counts["unet"] = unet_size
    return counts
