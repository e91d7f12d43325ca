"""Notebook 06, IP-Adapter Plus: the Perceiver Resampler's attention and size.

What the Resampler's keys and values are made from, how its scores are scaled, how many
parameters it has.
"""
from __future__ import annotations

import torch

from .core import CheckFailed, as_whole_number, checker, expect, expect_close, expect_shape


@checker
def perceiver_kv_input(fn) -> str:
    """fn(features, latents) -> the sequence the Resampler's keys and values are computed from."""
    gen = torch.Generator().manual_seed(5)
    features, latents = torch.randn(2, 65, 32, generator=gen), torch.randn(2, 16, 32, generator=gen)
    got = fn(features, latents)
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect(tuple(got.shape) != (2, 65, 32) or not torch.equal(got, features), "you returned the features alone; "
           "the keys and values also come from the latents, so each query can attend to the image and to the "
           "other queries in one step: concatenate them")
    expect(tuple(got.shape) != (2, 16, 32) or not torch.equal(got, latents), "you returned the latents alone: "
           "then the queries never see the image. Concatenate the features and the latents")
    expect_shape(got, (2, 81, 32), "the keys/values input for 65 features and 16 latents (concatenate along the "
                 "token axis, dim -2)")
    if torch.equal(got, torch.cat([latents, features], -2)):
        return ("[latents; features] along the tokens. The original puts the features first; softmax attention does "
                "not depend on the order of the keys, so both orders give the same result.")
    expect(torch.equal(got, torch.cat([features, latents], -2)), "expected torch.cat([features, latents], dim=-2)")
    return "[features; latents] along the tokens: 65 + 16 = 81 keys and values for 16 queries."


@checker
def perceiver_scores(fn) -> str:
    """fn(q, k, dim_head) -> the attention scores (before the softmax) of the Resampler."""
    gen = torch.Generator().manual_seed(6)
    for dim_head in (64, 16):
        q, k = torch.randn(2, 4, 16, dim_head, generator=gen) * 3, torch.randn(2, 4, 81, dim_head, generator=gen) * 3
        want = (q * dim_head ** -0.25) @ (k * dim_head ** -0.25).transpose(-2, -1)
        got = fn(q.clone(), k.clone(), dim_head)
        what = f"the scores for dim_head={dim_head}"
        expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
        expect(tuple(got.shape) != (2, 4, dim_head, dim_head), f"{what} have shape {tuple(got.shape)}: transpose "
               "the last two dimensions of k, not q (queries x keys)")
        expect_shape(got, want.shape, f"{what} (batch, heads, queries, keys)")
        if torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            continue
        raw = q @ k.transpose(-2, -1)
        expect(not torch.allclose(got, raw, rtol=1e-4, atol=1e-4), f"{what} are not scaled: without the factor "
               "the softmax saturates as dim_head grows; scale q and k by dim_head ** -0.25 each")
        expect(not torch.allclose(got, raw / dim_head, rtol=1e-4, atol=1e-4), f"{what} are scaled by 1/dim_head: "
               f"each of q and k gets dim_head ** -0.25 (the product then gets dim_head ** -0.5), not -0.5 each")
        expect_close(got, want, what, atol=1e-4)
    return "(q * d^-1/4) @ (k * d^-1/4)^T = q k^T / sqrt(d): the usual scale, split between q and k."


@checker
def resampler_parameters(fn) -> str:
    """fn(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult) -> Resampler parameters."""
    from ..adapter import count_parameters
    from ..projection import Resampler

    cases = [("SD 1.5 Plus (dim 768, depth 4, 12 heads of 64, 16 queries, ViT-H 1280 -> 768)",
              dict(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768, ff_mult=4)),
             ("the toy Plus (dim 64, depth 4, 12 heads of 64, 16 queries, 64 -> 64)",
              dict(dim=64, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=64, output_dim=64, ff_mult=4)),
             ("an odd one (dim 96, depth 3, 3 heads of 16, 8 queries, 48 -> 80, ff_mult 2)",
              dict(dim=96, depth=3, dim_head=16, heads=3, num_queries=8, embedding_dim=48, output_dim=80, ff_mult=2))]
    failures = []  # (what, got, want, the hints that explain the difference)
    for what, kw in cases:
        with torch.device("meta"):
            want = count_parameters(Resampler(**kw))
        got = fn(**kw)
        number = as_whole_number(got)
        expect(number is not None, f"return a whole number, got {got!r}")
        got = number
        dim, depth, inner = kw["dim"], kw["depth"], kw["dim_head"] * kw["heads"]
        hints = [
            (kw["num_queries"] * dim, "the learned latents (num_queries x dim): the queries are parameters too"),
            (dim, "proj_in's bias"),
            (kw["output_dim"], "proj_out's bias"),
            (2 * kw["output_dim"], "norm_out (the final LayerNorm's weight and bias)"),
            (depth * 4 * dim, "the two LayerNorms of each attention layer (norm1 for the features, norm2 for the latents)"),
            (depth * 2 * dim, "the LayerNorm at the start of each feed-forward block"),
            (depth * inner * dim, "the values (to_kv makes keys AND values: 2 x heads x dim_head outputs)"),
        ]
        if got != want:
            failures.append((what, got, want, {text for amount, text in hints if amount == want - got}))
    if failures:
        what, got, want, _ = failures[0]
        common = set.intersection(*(f[3] for f in failures))
        reason = f": you left out {common.pop()}" if len(common) == 1 else f" (off by {got - want:+,})"
        raise CheckFailed(f"for {what} you get {got:,}, expected {want:,}{reason}")
    return "latents + proj_in + depth x (attention + feed-forward) + proj_out + norm_out: 29,918,208 for SD 1.5 Plus."
