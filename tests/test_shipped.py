"""The adapters shipped in data/ load the way the original code builds its models.

The original (tencent-ailab/IP-Adapter, ip_adapter.py) builds the projection from the pipeline's
configs, then `load_state_dict`s the checkpoint strictly: `IPAdapter.init_proj` an ImageProjModel
(cross_attention_dim, projection_dim, num_tokens), `IPAdapterPlus.init_proj` a Resampler with
depth 4, dim_head 64 and heads 12 whatever the width. Our classes carry the original's parameter
names, so building them with those arguments and loading strictly is what the original does."""
from __future__ import annotations

import json

import pytest
import torch

from ipa_lab.checkpoint import load_ip_adapter
from ipa_lab.pipeline import REPO_ROOT
from ipa_lab.projection import ImageProjModel, Resampler

TOY = REPO_ROOT / "data" / "toy-sd"


def _config(part: str) -> dict:
    return json.loads((TOY / part / "config.json").read_text())


def _original_projection(variant: str, num_tokens: int) -> torch.nn.Module:
    unet, encoder = _config("unet"), _config("image_encoder")
    if variant == "base":  # IPAdapter.init_proj
        return ImageProjModel(cross_attention_dim=unet["cross_attention_dim"],
                              clip_embeddings_dim=encoder["projection_dim"], clip_extra_context_tokens=num_tokens)
    return Resampler(dim=unet["cross_attention_dim"], depth=4, dim_head=64, heads=12,  # IPAdapterPlus.init_proj
                     num_queries=num_tokens, embedding_dim=encoder["hidden_size"],
                     output_dim=unet["cross_attention_dim"], ff_mult=4)


@pytest.mark.parametrize("folder, variant, tokens", [("ip-adapter-toy", "base", 4), ("ip-adapter-toy-plus", "plus", 16)])
def test_the_shipped_adapters_load_into_the_originals_projection(folder, variant, tokens):
    state = load_ip_adapter(REPO_ROOT / "data" / folder / "ip_adapter.safetensors")
    projection = _original_projection(variant, tokens)
    projection.load_state_dict(state["image_proj"], strict=True)  # raises on any key or shape difference
    # The adapter part: to_k_ip / to_v_ip at the odd indices of unet.attn_processors, 7 layers in the toy.
    indices = sorted({int(k.split(".")[0]) for k in state["ip_adapter"]})
    assert indices == list(range(1, 15, 2))
