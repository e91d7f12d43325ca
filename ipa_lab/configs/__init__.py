"""The real architectures as data: configs of SD 1.5, SDXL and the IP-Adapter image encoders.

A config is enough to build a model's exact architecture on the `meta` device: every
parameter has its shape but no memory and no values. That is how the course counts the real
SD 1.5 (859,520,964 UNet parameters; 22,319,616 trained by IP-Adapter) on a laptop, with no
download.

Files (JSON, in this folder): `sd15_unet`, `sdxl_unet` (diffusers UNet2DConditionModel),
`clip_vit_h14_vision`, `clip_vit_bigg14_vision` (transformers CLIPVisionModelWithProjection),
`toy_unet` (the course's own tiny UNet). Keys starting with `_` are notes, not settings.

Only data, and builders of diffusers' and transformers' classes: nothing here imports the
course's model code, which reads configs, not the other way round. The IP-Adapter parts built
from configs live with their models: `ipa_lab.projection.build_image_projection`,
`ipa_lab.adapter.count_ip_adapter_parameters`.
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
