"""Notebook 01, the image projection: an image embedding becomes a few tokens.

The learner builds `ImageProjModel` (Linear -> reshape -> LayerNorm) as an `nn.Module`; the
checker builds it at several sizes, checks that its parameters carry the original's names (so
the original checkpoints load into it), gives it the weights of diffusers' `ImageProjection`
and compares the two outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .core import (CheckFailed, LearnerFunction, LearnerRaised, builds, expect, expect_close, expect_shape, first_line,
                   learner_code)

# (cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens, what): the notebook's toy
# first, then sizes where a hard-coded 64, 32 or 4 shows, then SD 1.5 with ViT-H/14.
_SIZES = [(64, 32, 4, "the toy (32 -> 4 tokens x 64)"), (16, 48, 6, "48 -> 6 tokens x 16"),
          (768, 1024, 4, "SD 1.5 with ViT-H/14 (1024 -> 4 tokens x 768)")]
_ARGS = "cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens"


def _build(cls: LearnerFunction, dim: int, embed_dim: int, tokens: int, seed: int):
    """The learner's module at one size, built with keyword arguments as the original is."""
    with torch.random.fork_rng():  # the learner's random init must not move the notebook's seed
        torch.manual_seed(seed)
        try:
            model = cls(cross_attention_dim=dim, clip_embeddings_dim=embed_dim, clip_extra_context_tokens=tokens)
        except LearnerRaised as e:
            if isinstance(e.error, TypeError) and "argument" in str(e.error):
                raise CheckFailed(f"building ImageProjModel({_args(dim, embed_dim, tokens)}) raised "
                                  f"{first_line(e.error)}: __init__ takes the keyword arguments {_ARGS}, "
                                  "the original's names") from None
            raise
    expect(isinstance(model, nn.Module), f"ImageProjModel(...) gave {type(model).__name__}, not an nn.Module: "
           "subclass nn.Module and call super().__init__() first")
    return model


def _args(dim: int, embed_dim: int, tokens: int) -> str:
    return f"cross_attention_dim={dim}, clip_embeddings_dim={embed_dim}, clip_extra_context_tokens={tokens}"


def _expected_shapes(dim: int, embed_dim: int, tokens: int) -> dict:
    """The original's parameters: one Linear (all tokens at once) and one LayerNorm (per token)."""
    return {"proj.weight": (tokens * dim, embed_dim), "proj.bias": (tokens * dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}


def _check_parameters(model: nn.Module, dim: int, embed_dim: int, tokens: int, what: str) -> None:
    """Exactly proj.weight, proj.bias, norm.weight, norm.bias, each with the original's shape."""
    got = {name: tuple(p.shape) for name, p in model.named_parameters()}
    want = _expected_shapes(dim, embed_dim, tokens)
    missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
    sizes = f"with {_args(dim, embed_dim, tokens)}"
    expect(missing != ["proj.bias"], f"{sizes}, proj has no bias: keep nn.Linear's bias (bias=True, the "
           "default); the original has proj.bias, and its checkpoints would not load without it")
    expect(not (missing == ["norm.weight", "norm.bias"] and not extra), f"{sizes}, your module has no LayerNorm: "
           "add self.norm = nn.LayerNorm(cross_attention_dim), applied to each token after the reshape")
    if not missing and extra:
        count = sum(model.get_parameter(n).numel() for n in extra)
        listed = ", ".join(f"{n} {got[n]}" for n in extra[:4])
        raise CheckFailed(f"{sizes}, your module has parameters the original has not: {listed} (+{count:,} "
                          "parameters). ImageProjModel is one nn.Linear and one nn.LayerNorm, nothing more")
    if missing:
        raise CheckFailed(f"your parameters are named {', '.join(got) or 'nothing'}; expected exactly "
                          f"{', '.join(want)}: call the layers self.proj and self.norm, so checkpoints of the "
                          "original IP-Adapter load into your module")
    _check_shapes(got, want, dim, embed_dim, tokens, sizes)


def _check_shapes(got: dict, want: dict, dim: int, embed_dim: int, tokens: int, sizes: str) -> None:
    """Each parameter's shape, naming the usual reasons it is off."""
    toy = _expected_shapes(*_SIZES[0][:3])
    expect(not (got != want and got == toy), f"{sizes}, your parameters have the toy's shapes "
           f"({', '.join(f'{n} {s}' for n, s in got.items())}): you hard-coded 64, 32 or 4; use the arguments")
    expect(got["norm.weight"] != (tokens * dim,), f"{sizes}, the LayerNorm is {tokens * dim} wide "
           f"(num_tokens x dim): it normalises each token on its own, so nn.LayerNorm(cross_attention_dim)")
    expect(got["proj.weight"] != want["proj.weight"][::-1], f"{sizes}, proj.weight has shape "
           f"{got['proj.weight']}, expected {want['proj.weight']}: nn.Linear(in_features, out_features) takes "
           "the input width first, nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)")
    for name, shape in want.items():
        expect(got[name] == shape, f"{sizes}, {name} has shape {got[name]}, expected {shape}")


def _diffusers_twin(model: nn.Module, dim: int, embed_dim: int, tokens: int, seed: int):
    """diffusers' ImageProjection at the same size, its weights copied into the learner's module.

    The LayerNorm gets a weight and bias away from 1 and 0, so a missing norm shows."""
    from diffusers.models.embeddings import ImageProjection

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        twin = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=dim, num_image_text_embeds=tokens)
        with torch.no_grad():
            twin.norm.weight.add_(torch.randn(dim) * 0.3)
            twin.norm.bias.add_(torch.randn(dim) * 0.3)
    weights = {"proj.weight": twin.image_embeds.weight, "proj.bias": twin.image_embeds.bias,
               "norm.weight": twin.norm.weight, "norm.bias": twin.norm.bias}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return twin


def _forward(cls: LearnerFunction, model: nn.Module, x: torch.Tensor, dim: int, tokens: int) -> torch.Tensor:
    """The learner's forward; a crash away from the toy's sizes is most likely a hard-coded size."""
    try:
        return learner_code(model, owner=cls)(x)
    except LearnerRaised as e:
        if (dim, tokens) == (64, 4):  # the notebook's own sizes: a plain crash
            raise
        raise CheckFailed(f"with clip_extra_context_tokens={tokens} and cross_attention_dim={dim} your forward "
                          f"raised {first_line(e.error)}. Did you hard-code 4 tokens or 64 features? Keep the "
                          "constructor's sizes as attributes and reshape with those") from None


def _check_output(got, twin: nn.Module, x: torch.Tensor, dim: int, tokens: int, what: str) -> None:
    """Compare with diffusers' output; name the plausible mistakes before the bare difference."""
    batch = x.shape[0]
    expect(isinstance(got, torch.Tensor), f"forward should return a torch.Tensor, got {type(got).__name__}")
    expect(tuple(got.shape) != (batch, tokens * dim), f"{what} has shape {tuple(got.shape)}: one long vector per "
           f"image; reshape it into (batch, clip_extra_context_tokens, cross_attention_dim) = {(batch, tokens, dim)}")
    with torch.no_grad():
        want = twin(x)
        flat = twin.image_embeds(x)
        no_norm = flat.reshape(batch, tokens, dim)
        wrong_order = twin.norm(flat.reshape(batch, dim, tokens).transpose(1, 2))
    expect_shape(got, want.shape, what)
    expect(got.dtype == want.dtype, f"{what} has dtype {got.dtype}, expected {want.dtype}, the input's")
    expect(not torch.allclose(got, no_norm, atol=1e-5), f"{what} is the reshaped linear output without the "
           "LayerNorm: apply self.norm to the tokens after the reshape")
    expect(not torch.allclose(got, wrong_order, atol=1e-5), f"{what} is cut into tokens in the wrong order: token i "
           "is the i-th run of cross_attention_dim consecutive outputs, so reshape to (batch, tokens, dim) directly")
    expect_close(got, want, what, atol=1e-5)
    expect(got.requires_grad, "your output carries no gradient (torch.no_grad() or .detach() in forward?): the "
           "projection is what IP-Adapter trains, so its forward must let gradients through")


@builds("projection.ImageProjModel")
def image_proj_model(cls) -> str:
    """cls(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens): a module, embeddings -> tokens.

    Built with keyword arguments; forward maps (batch, clip_embeddings_dim) image embeddings to
    (batch, clip_extra_context_tokens, cross_attention_dim) tokens."""
    gen = torch.Generator().manual_seed(0)
    for seed, (dim, embed_dim, tokens, what) in enumerate(_SIZES):
        model = _build(cls, dim, embed_dim, tokens, seed)
        _check_parameters(model, dim, embed_dim, tokens, what)
        twin = _diffusers_twin(model, dim, embed_dim, tokens, seed)
        x = torch.randn(2 + seed % 2, embed_dim, generator=gen)  # batches of 2 and 3
        got = _forward(cls, model, x, dim, tokens)
        _check_output(got, twin, x, dim, tokens, f"the output for {what}")
    return ("proj -> reshape to (batch, tokens, dim) -> norm per token, with the original's parameter names "
            "(its checkpoints load); checked against diffusers' ImageProjection with the same weights.")
