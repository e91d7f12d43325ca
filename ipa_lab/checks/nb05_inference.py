"""Notebook 05, inference: what the UNet reads in each branch of classifier-free guidance.

The conditional and unconditional token sequences, the 'no image' tokens, and the guidance step.
"""
from __future__ import annotations

import torch

from .core import CheckFailed, checker, expect, expect_close, expect_shape


@checker
def compose_prompt_embeds(fn) -> str:
    """fn(text, negative_text, image_tokens, uncond_image_tokens) -> (prompt_embeds, negative_prompt_embeds)."""
    gen = torch.Generator().manual_seed(2)
    batch, length, tokens, dim = 2, 16, 4, 64
    text, negative = torch.randn(batch, length, dim, generator=gen), torch.randn(batch, length, dim, generator=gen)
    image, uncond = torch.randn(batch, tokens, dim, generator=gen), torch.randn(batch, tokens, dim, generator=gen)
    got = fn(text, negative, image, uncond)
    expect(not isinstance(got, torch.Tensor), "you returned one tensor; return a pair (prompt_embeds, "
           "negative_prompt_embeds): one sequence for the conditional branch, one for the unconditional")
    try:
        cond_got, uncond_got = got
    except (TypeError, ValueError):
        raise CheckFailed(f"return a pair (prompt_embeds, negative_prompt_embeds), got {type(got).__name__}") from None
    want_cond, want_uncond = torch.cat([text, image], 1), torch.cat([negative, uncond], 1)
    for t, what in ((cond_got, "prompt_embeds"), (uncond_got, "negative_prompt_embeds")):
        expect(isinstance(t, torch.Tensor), f"{what} should be a torch.Tensor, got {type(t).__name__}")
        expect(tuple(t.shape) != (batch, length, dim + tokens) and tuple(t.shape) != (batch, length, 2 * dim),
               f"{what} has shape {tuple(t.shape)}: the tokens were joined along the features (dim 2); append the "
               "image tokens along the sequence, dim 1")
        expect_shape(t, want_cond.shape, f"{what} (text tokens then image tokens, along dim 1)")
    if torch.equal(cond_got, want_uncond) and torch.equal(uncond_got, want_cond):
        raise CheckFailed("the two results are swapped: first the conditional [text; image tokens], then the "
                          "unconditional [negative text; unconditional image tokens]")
    expect(not torch.equal(cond_got, torch.cat([image, text], 1)), "prompt_embeds has the image tokens first; "
           "IPAttnProcessor takes the LAST num_tokens tokens as the image, so they go after the text")
    expect(torch.equal(cond_got, want_cond), "prompt_embeds should be torch.cat([text, image_tokens], dim=1)")
    expect(not torch.equal(uncond_got, torch.cat([negative, image], 1)), "negative_prompt_embeds carries the image "
           "tokens; the unconditional branch gets the unconditional image tokens (the 'no image' the model saw "
           "in training), otherwise guidance cancels the image out")
    expect(not torch.equal(uncond_got, torch.cat([uncond, negative], 1)), "negative_prompt_embeds has the image "
           "tokens first; they go after the text")
    expect(torch.equal(uncond_got, want_uncond),
           "negative_prompt_embeds should be torch.cat([negative_text, uncond_image_tokens], dim=1)")
    return "[text; image] for the conditional branch, [negative text; 'no image'] for the unconditional one."


@checker
def unconditional_image_tokens(fn) -> str:
    """fn(image_proj_model) -> the 'no image' tokens of the base model, (1, num_tokens, dim)."""
    from ..projection import ImageProjModel

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = ImageProjModel(cross_attention_dim=64, clip_embeddings_dim=32, clip_extra_context_tokens=4)
        with torch.no_grad():
            model.proj.bias.normal_(0, 0.5)
            model.norm.weight.normal_(1, 0.3)
            model.norm.bias.normal_(0, 0.3)
    with torch.no_grad():
        want = model(torch.zeros(1, 32))
        got = fn(model)
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect(got.numel() == want.numel(), f"the tokens have shape {tuple(got.shape)}, expected {tuple(want.shape)}: "
           "one image's worth of tokens (num_tokens x cross_attention_dim)")
    got = got.detach().reshape(want.shape)
    expect(bool(got.abs().sum() > 0), "you returned all-zero tokens; in training a dropped image was a zero "
           "*embedding*, passed through the projection: proj(0) is proj's bias, and the LayerNorm then gives "
           "tokens that are not zero. Project torch.zeros(1, clip_embeddings_dim)")
    expect(not torch.allclose(got, model.proj.bias.detach().reshape(want.shape), atol=1e-5),
           "you returned proj's bias without the LayerNorm; run the whole projection on a zero embedding")
    expect_close(got, want, "the unconditional tokens", atol=1e-5)
    return "the projection of a zero image embedding: exactly what the model saw whenever an image was dropped."


@checker
def guidance(fn) -> str:
    """fn(noise_uncond, noise_cond, guidance_scale) -> the classifier-free guided noise prediction."""
    gen = torch.Generator().manual_seed(4)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for w in (7.5, 1.0, 0.0, 5.0):
        got = fn(uncond.clone(), cond.clone(), w)
        want = uncond + w * (cond - uncond)
        what = f"the guided prediction at guidance_scale={w}"
        expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
        expect_shape(got, want.shape, what)
        if torch.allclose(got, want, atol=1e-5):
            continue
        expect(not torch.allclose(got, cond + w * (cond - uncond), atol=1e-5), f"{what}: start from the "
               "unconditional prediction, uncond + w * (cond - uncond); at w = 1 that gives cond exactly")
        expect(not torch.allclose(got, uncond + w * (uncond - cond), atol=1e-5), f"{what}: the difference points "
               "the wrong way; move from uncond towards cond: uncond + w * (cond - uncond)")
        expect_close(got, want, what)
    return "uncond + w * (cond - uncond): w = 1 is the conditional prediction, w > 1 pushes past it."
