"""IP-Adapter-FaceID: an identity embedding in, a LoRA in every attention layer (notebook 8).

FaceID keeps IP-Adapter's decoupled cross-attention but changes two things:

* what feeds it: not CLIP, but a face-recognition embedding (InsightFace, 512 numbers), which
  knows who is in the picture and little else; the projection is an MLP (`MLPProjModel`);
* what trains: besides the projection and `to_k_ip` / `to_v_ip`, a LoRA on to_q, to_k, to_v and
  to_out of every attention layer, self-attention included (`ipa_lab.attention_faceid`;
  `install_ip_adapter(unet, lora_rank=...)` installs them).

FaceID-Plus feeds the same MLP's tokens as queries to a Perceiver over CLIP's patch features
(`ProjPlusModel`, `FacePerceiverResampler`); PlusV2 is a checkpoint of its own with the same
architecture, used with `shortcut=True`.
Names and parameter names are the original's (ip_adapter_faceid.py), so checkpoints load there
and in diffusers (`IPAdapterFaceIDImageProjection`, the LoRA through PEFT).

Training and measuring it on the toy: `ipa_lab.train_faceid`.
"""
from __future__ import annotations

import torch
from torch import nn

from .projection import PerceiverAttention, feed_forward

# FaceID's settings in the original (tutorial_train_faceid.py, IPAdapterFaceID): 4 tokens, LoRA rank 128.
NUM_TOKENS = 4
LORA_RANK = 128


def identity_mlp(id_embeddings_dim: int, cross_attention_dim: int, num_tokens: int) -> nn.Sequential:
    """FaceID's `proj`, shared by MLPProjModel and ProjPlusModel: linear (id -> 2 id), GELU,
    linear (2 id -> tokens x dim); the caller cuts the result into tokens."""
    return nn.Sequential(
        nn.Linear(id_embeddings_dim, id_embeddings_dim * 2),
        nn.GELU(),
        nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens),
    )


class MLPProjModel(nn.Module):
    """FaceID's projection: an identity embedding -> `num_tokens` tokens.

    Shapes: (batch, id_embeddings_dim) -> (batch, num_tokens, cross_attention_dim).
    linear (id -> 2 id), GELU, linear (2 id -> tokens x dim), cut into tokens, LayerNorm. For SD 1.5
    (512 -> 1024 -> 4 x 768): 3,675,648 parameters. Unlike the base model's ImageProjModel, a hidden
    layer: the identity embedding is not CLIP's, so nothing in the UNet's text space resembles it.
    """

    def __init__(self, cross_attention_dim: int = 768, id_embeddings_dim: int = 512, num_tokens: int = NUM_TOKENS):
        super().__init__()
        self.cross_attention_dim, self.id_embeddings_dim, self.num_tokens = cross_attention_dim, id_embeddings_dim, num_tokens
        self.proj = identity_mlp(id_embeddings_dim, cross_attention_dim, num_tokens)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """(batch, id_embeddings_dim) identity embeddings -> (batch, num_tokens, cross_attention_dim) tokens."""
        if id_embeds.ndim != 2 or id_embeds.shape[-1] != self.id_embeddings_dim:
            raise ValueError(f"FaceID's MLPProjModel expects identity embeddings of shape (batch, "
                             f"{self.id_embeddings_dim}), got {tuple(id_embeds.shape)}")
        tokens = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class FacePerceiverResampler(nn.Module):
    """FaceID-Plus's Perceiver: given queries (the identity tokens) read CLIP's patch features.

    The Plus `Resampler` without its learned `latents`: the queries come from outside. Layers are
    the Resampler's (`PerceiverAttention`, `feed_forward`), so the parameter names match.
    """

    def __init__(self, *, dim: int = 768, depth: int = 4, dim_head: int = 64, heads: int = 16,
                 embedding_dim: int = 1280, output_dim: int = 768, ff_mult: float = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """latents (batch, n_queries, dim), x (batch, n_features, embedding_dim) -> (batch, n_queries, output_dim)."""
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(nn.Module):
    """FaceID-Plus's projection: identity tokens (FaceID's MLP) refined by CLIP's patch features.

    `forward(id_embeds, clip_embeds, shortcut, scale)`: the MLP's tokens are the queries of a
    `FacePerceiverResampler` (heads = dim // 64) over the penultimate CLIP features; with
    `shortcut` (PlusV2) the output is tokens + scale * perceiver(tokens), so `scale` weighs the
    face's structure against its identity. For SD 1.5 + ViT-H: 33,581,568 parameters.
    """

    def __init__(self, cross_attention_dim: int = 768, id_embeddings_dim: int = 512, clip_embeddings_dim: int = 1280,
                 num_tokens: int = NUM_TOKENS):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = identity_mlp(id_embeddings_dim, cross_attention_dim, num_tokens)
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=4, dim_head=64, heads=cross_attention_dim // 64,
            embedding_dim=clip_embeddings_dim, output_dim=cross_attention_dim, ff_mult=4)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, shortcut: bool = False,
                scale: float = 1.0) -> torch.Tensor:
        """id_embeds (batch, id dim), clip_embeds (batch, patches, clip dim) -> (batch, num_tokens, dim)."""
        tokens = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))
        out = self.perceiver_resampler(tokens, clip_embeds)
        return tokens + scale * out if shortcut else out
