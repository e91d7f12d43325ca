"""The image projection: turn what the CLIP image encoder says into tokens the UNet can attend to.

The UNet's cross-attention layers read a sequence of `cross_attention_dim`-wide tokens (the text
encoder's hidden states). An image prompt must arrive in the same form, so IP-Adapter learns a
small module that maps the image encoder's output to a few extra tokens:

* `ImageProjModel` (IP-Adapter, notebook 1): one global image embedding -> 4 tokens, with a
  single linear layer and a LayerNorm.
* `Resampler` (IP-Adapter Plus, notebook 6): the 257 patch features of the encoder's penultimate
  layer -> 16 tokens, with a small Perceiver: learned queries that attend to the features.
* `MLPProjModel` (IP-Adapter Full-face, notebook 8): each of those 257 features -> one token.

Parameter names follow the original implementation (tencent-ailab/IP-Adapter) on purpose: the
checkpoints these modules save then load in the original code and in diffusers' converters.

Around them: `num_tokens_of` (how many tokens a projection makes: what the processors must cut
off), `is_plus`, and `build_image_projection` (the projection for a UNet and an image encoder,
from their configs: how training builds it, and how the course sizes the real SD 1.5 / SDXL).
"""
from __future__ import annotations

import torch
from torch import nn


class ImageProjModel(nn.Module):
    """Project one CLIP image embedding to `clip_extra_context_tokens` tokens.

    Shapes: (batch, clip_embeddings_dim) -> (batch, clip_extra_context_tokens, cross_attention_dim).

    One linear layer produces all tokens at once (its output is `tokens * dim` wide and is cut
    into tokens by a reshape), then a LayerNorm brings each token to the scale of the text
    tokens it will sit next to. For SD 1.5 with the ViT-H/14 encoder: 1024 -> 4 x 768,
    1024 * 3072 + 3072 (linear) + 2 * 768 (norm) = 3,150,336 parameters.
    """

    def __init__(self, cross_attention_dim: int = 768, clip_embeddings_dim: int = 1024,
                 clip_extra_context_tokens: int = 4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.clip_embeddings_dim = clip_embeddings_dim
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Map (batch, clip_embeddings_dim) image embeddings to (batch, tokens, cross_attention_dim)."""
        # Checked up front: the reshape below would silently turn a (2, 5, D) input into 10 images.
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != self.clip_embeddings_dim:
            raise ValueError(
                f"ImageProjModel expects image embeddings of shape (batch, {self.clip_embeddings_dim}): one "
                f"embedding {self.clip_embeddings_dim} wide (the image encoder's projection_dim) per image; got "
                f"shape {tuple(image_embeds.shape)} (last dimension {image_embeds.shape[-1]}). Pass `image_embeds` "
                "of CLIPVisionModelWithProjection, or build ImageProjModel with the matching clip_embeddings_dim."
            )
        tokens = self.proj(image_embeds)
        # One long vector per image -> a short sequence of tokens, each as wide as a text token.
        tokens = tokens.reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MLPProjModel(nn.Module):
    """IP-Adapter Full-face's projection: every one of the encoder's patch tokens becomes a token.

    Shapes: (batch, n_features, clip_embeddings_dim) -> (batch, n_features, cross_attention_dim).
    An MLP (linear, GELU, linear, LayerNorm) applied to each of the 257 penultimate-layer tokens
    of ViT-H/14 (256 patches + the class token), so the UNet gets 257 image tokens: all the
    encoder saw, no summary. For SD 1.5: 1280 -> 1280 -> 768, 2,625,024 parameters.
    Named as in the original's ip_adapter.py; FaceID's projection of the same name is
    `ipa_lab.faceid.MLPProjModel`.
    """

    def __init__(self, cross_attention_dim: int = 1024, clip_embeddings_dim: int = 1024):
        super().__init__()
        self.clip_embeddings_dim = clip_embeddings_dim
        self.proj = nn.Sequential(
            nn.Linear(clip_embeddings_dim, clip_embeddings_dim),
            nn.GELU(),
            nn.Linear(clip_embeddings_dim, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Map each token of (batch, n_features, clip_embeddings_dim) to a cross-attention token."""
        return self.proj(image_embeds)


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    """The Resampler's MLP: LayerNorm, widen by `mult`, GELU, back to `dim` (no biases).

    Kept as an `nn.Sequential` so the parameters are named `0` (norm), `1` and `3` (linears),
    exactly as in the original checkpoints.
    """
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Learned queries (the latents) attend to the image features *and* to themselves.

    Queries come from the latents only; keys and values come from the concatenation
    [features; latents], so each query sees the image and the other queries in one step.
    Both q and k are multiplied by dim_head**-0.25 before the dot product: the product then
    carries the usual 1/sqrt(dim_head), but intermediate values stay small (kinder to fp16).
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # for the image features
        self.norm2 = nn.LayerNorm(dim)  # for the latents (queries)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # keys and values in one matmul
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, heads * dim_head) -> (batch, heads, length, dim_head)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (batch, n_features, dim) image features; latents: (batch, n_queries, dim)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        batch, n_queries, _ = latents.shape

        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)

        scale = self.dim_head ** -0.25
        scores = (q * scale) @ (k * scale).transpose(-2, -1)
        # Softmax in float32 even when the module runs in half precision.
        weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, n_queries, -1)
        return self.to_out(out)


class Resampler(nn.Module):
    """IP-Adapter Plus's projection: `num_queries` learned tokens read the image's patch features.

    Shapes: (batch, n_features, embedding_dim) -> (batch, num_queries, output_dim).
    For SD 1.5 Plus: Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16,
    embedding_dim=1280, output_dim=768, ff_mult=4), 29,918,208 parameters, fed with the ViT-H
    encoder's penultimate hidden states (257 tokens x 1280).

    Each of the `depth` layers is [PerceiverAttention, feed_forward], both residual; the
    features are projected once to `dim` (proj_in) and the result once to `output_dim`
    (proj_out + norm_out). The constructor defaults are the original's, not SD 1.5's.
    """

    def __init__(self, dim: int = 1024, depth: int = 8, dim_head: int = 64, heads: int = 16,
                 num_queries: int = 8, embedding_dim: int = 768, output_dim: int = 1024,
                 ff_mult: float = 4):
        super().__init__()
        self.embedding_dim = embedding_dim
        # The learned queries: small random vectors (std 1/sqrt(dim)), one set shared by all images.
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                           feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map image features (batch, n_features, embedding_dim) to (batch, num_queries, output_dim)."""
        if x.ndim != 3 or x.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"Resampler expects image features of shape (batch, tokens, {self.embedding_dim}) "
                f"(the image encoder's hidden states), got {tuple(x.shape)}"
            )
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents  # residual around attention
            latents = ff(latents) + latents  # and around the MLP
        return self.norm_out(self.proj_out(latents))


# ---------------------------------------------------------------------------------------------
# What a projection reads and makes, and how to build one for a given UNet and image encoder
# ---------------------------------------------------------------------------------------------
def num_tokens_of(image_proj_model: nn.Module) -> int:
    """How many image tokens the projection produces (4 for the base model, 16 for Plus).

    The processors must take exactly this many tokens off the end of the encoder states
    (`IPAttnProcessor.num_tokens`), or they would cut text and image at the wrong place.
    """
    if hasattr(image_proj_model, "clip_extra_context_tokens"):  # ImageProjModel
        return int(image_proj_model.clip_extra_context_tokens)
    if isinstance(getattr(image_proj_model, "latents", None), torch.Tensor):  # Resampler: one token per query
        return int(image_proj_model.latents.shape[1])
    if isinstance(getattr(image_proj_model, "num_tokens", None), int):  # FaceID's projections
        return int(image_proj_model.num_tokens)
    raise TypeError(f"cannot tell how many tokens a {type(image_proj_model).__name__} makes: expected an "
                    "ImageProjModel (clip_extra_context_tokens), a Resampler (latents) or a FaceID projection "
                    "(num_tokens); Full-face's MLPProjModel makes one per encoder token (257 for ViT-H/14)")


def is_plus(image_proj_model: nn.Module) -> bool:
    """Plus (Resampler) reads the encoder's patch features; the base model its pooled embedding."""
    return isinstance(image_proj_model, Resampler)


def build_image_projection(unet_config: dict, encoder_config: dict, variant: str = "base",
                           num_tokens: int | None = None) -> nn.Module:
    """The projection IP-Adapter would train for this UNet and image encoder (their config dicts).

    base: ImageProjModel(projection_dim -> num_tokens (4) x cross_attention_dim).
    plus: Resampler(depth 4, dim_head 64, num_tokens (16) queries) reading the encoder's
    hidden states, as the original builds it: `IPAdapterPlus` (and tutorial_train_plus.py) use
    dim = cross_attention_dim and 12 heads whatever the width (768 for SD 1.5, 64 for the toy),
    `IPAdapterPlusXL` dim 1280 and 20 heads. The heads are not stored in a checkpoint, only
    heads x dim_head (the rows of to_q): a Resampler built with other heads does not load in the
    unmodified original.
    Built on the current default device: inside `with torch.device("meta")` it costs no memory.
    """
    cross_dim = unet_config["cross_attention_dim"]
    if variant == "base":
        return ImageProjModel(cross_attention_dim=cross_dim, clip_embeddings_dim=encoder_config["projection_dim"],
                              clip_extra_context_tokens=num_tokens or 4)
    if variant == "plus":
        dim, heads = (cross_dim, 12) if cross_dim <= 1024 else (1280, 20)  # IPAdapterPlus / IPAdapterPlusXL
        return Resampler(dim=dim, depth=4, dim_head=64, heads=heads, num_queries=num_tokens or 16,
                         embedding_dim=encoder_config["hidden_size"], output_dim=cross_dim, ff_mult=4)
    raise ValueError(f"unknown variant {variant!r}: use 'base' or 'plus'")
