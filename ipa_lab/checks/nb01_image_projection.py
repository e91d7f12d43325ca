"""Notebook 01, the image projection: an image embedding becomes a few tokens.

The forward pass of ImageProjModel (Linear -> reshape -> LayerNorm) and its parameter count.
"""
from __future__ import annotations

import torch

from .core import (CheckFailed, LearnerRaised, as_whole_number, checker, expect, expect_close, expect_shape,
                   first_line)


@checker
def image_proj_forward(fn) -> str:
    """fn(image_embeds, proj, norm, num_tokens) -> (batch, num_tokens, cross_attention_dim) tokens."""
    from ..projection import ImageProjModel

    gen = torch.Generator().manual_seed(0)
    for batch, embed_dim, dim, tokens in [(2, 32, 64, 4), (3, 48, 16, 6), (1, 1024, 768, 4)]:
        with torch.random.fork_rng():
            torch.manual_seed(batch)
            model = ImageProjModel(cross_attention_dim=dim, clip_embeddings_dim=embed_dim, clip_extra_context_tokens=tokens)
        with torch.no_grad():  # a LayerNorm that is not the identity, so forgetting it shows
            model.norm.weight.add_(torch.randn(dim, generator=gen) * 0.3)
            model.norm.bias.add_(torch.randn(dim, generator=gen) * 0.3)
        x = torch.randn(batch, embed_dim, generator=gen)
        want = model(x)
        what = f"the output for {batch} embeddings of width {embed_dim} ({tokens} tokens x {dim})"
        try:
            got = fn(x, model.proj, model.norm, tokens)
        except LearnerRaised as e:
            if (tokens, dim) == (4, 64):  # the notebook's own sizes: a plain crash
                raise
            raise CheckFailed(f"with num_tokens={tokens} and cross_attention_dim={dim} your code raised "
                              f"{first_line(e.error)}. Did you hard-code 4 tokens or 64 features? Take them "
                              "from num_tokens and the shapes") from None
        expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
        expect(tuple(got.shape) != (batch, tokens * dim), f"{what} has shape {tuple(got.shape)}: one long vector "
               f"per image; reshape it into (batch, num_tokens, cross_attention_dim) = {(batch, tokens, dim)}")
        expect_shape(got, want.shape, what)
        with torch.no_grad():
            flat = model.proj(x)
            no_norm = flat.reshape(batch, tokens, dim)
            wrong_order = model.norm(flat.reshape(batch, dim, tokens).transpose(1, 2))
        expect(not torch.allclose(got, no_norm, atol=1e-5), f"{what} is the reshaped linear output without the "
               "LayerNorm: apply norm to each token after the reshape")
        expect(not torch.allclose(got, wrong_order, atol=1e-5), f"{what} is cut into tokens in the wrong order: token i "
               "is the i-th run of cross_attention_dim consecutive outputs, so reshape to (batch, num_tokens, dim) directly")
        expect_close(got, want, what, atol=1e-4)
        expect(got.requires_grad, "your output carries no gradient (torch.no_grad() or .detach()?): the projection "
               "is what IP-Adapter trains, its forward must let gradients through")
    return "Linear -> reshape to (batch, tokens, dim) -> LayerNorm, exactly ImageProjModel.forward."


@checker
def projection_parameters(fn) -> str:
    """fn(clip_embeddings_dim, cross_attention_dim, num_tokens) -> parameters of ImageProjModel."""
    from ..adapter import count_parameters
    from ..projection import ImageProjModel

    cases = [("the toy (32 -> 4 x 64)", 32, 64, 4), ("SD 1.5 with ViT-H/14 (1024 -> 4 x 768)", 1024, 768, 4),
             ("SDXL with ViT-bigG/14 (1280 -> 4 x 2048)", 1280, 2048, 4), ("16 tokens (1024 -> 16 x 768)", 1024, 768, 16)]
    for what, embed_dim, dim, tokens in cases:
        with torch.device("meta"):  # shapes only: nothing allocated
            want = count_parameters(ImageProjModel(dim, embed_dim, tokens))
        got = fn(embed_dim, dim, tokens)
        number = as_whole_number(got)
        expect(number is not None, f"return a whole number, got {got!r}")
        got = number
        hints = {tokens * dim: f"proj's bias ({tokens} x {dim} = {tokens * dim:,}, one per output)",
                 2 * dim: f"the LayerNorm's weight and bias (2 x {dim} = {2 * dim:,})",
                 tokens * dim + 2 * dim: "the bias of proj and the LayerNorm's weight and bias"}
        missing = want - got
        expect(missing not in hints, f"for {what} you get {got:,}, expected {want:,}: you left out {hints.get(missing)}")
        expect(got - want != 2 * dim * (tokens - 1), f"for {what} you get {got:,}, expected {want:,}: there is one "
               f"LayerNorm shared by all {tokens} tokens, so it holds 2 x {dim}, not 2 x {dim} per token")
        expect(got == want, f"for {what} you get {got:,}, expected {want:,} (off by {got - want:+,})")
    return "D*T*C + T*C + 2*C (linear weight, its bias, LayerNorm): 3,150,336 for SD 1.5 with ViT-H."
